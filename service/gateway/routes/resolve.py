"""From a name in a request to the task and upstream that serve it."""

from __future__ import annotations

from starlette.requests import Request

from service.gateway.errors import InvalidRequest, UnknownTask
from service.gateway.middleware import TASK_LABEL
from service.gateway.registry import Registry, TaskKind, TaskSpec, UpstreamSpec

KIND_ROUTES = {"text": "/classify", "chat": "/classify-chat"}


def known_task(registry: Registry, name: str) -> TaskSpec:
    """The task `name`, or a 404 that lists the known ones: for the routes that name a task in
    their path (GET /tasks/{name}, its stats, feedback and review)."""
    task = registry.task(name)
    if task is None:
        known = ", ".join(sorted(registry.tasks)) or "none"
        raise UnknownTask(f"Unknown task {name!r}; known tasks: {known}.")
    return task


def resolve_task(request: Request, registry: Registry, name: str, kind: TaskKind, *,
                 by_model: bool = False) -> tuple[TaskSpec, UpstreamSpec]:
    task = registry.resolve_model(name, kind) if by_model else registry.task(name)
    if task is None:
        known = ", ".join(sorted(registry.tasks)) or "none"
        what = "task or model" if by_model else "task"
        raise UnknownTask(f"Unknown {what} {name!r}; known tasks: {known}.")
    setattr(request.state, TASK_LABEL, task.name)  # read by the middleware for metric labels
    if task.kind != kind:
        raise InvalidRequest(
            f"Task {task.name!r} classifies {task.kind} inputs; send it to "
            f"{KIND_ROUTES[task.kind]} (or the matching /v1 endpoint) instead."
        )
    return task, registry.upstreams[task.upstream]
