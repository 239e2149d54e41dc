"""Fan-out: one `/classify` (or `/classify-chat`) call that names several tasks in `tasks`.

Applications often ask several classifiers about the same text (moderation, intent, language); one
call instead of one per task saves the round trips and validates the items once. Each task runs
through the classifier exactly as a call of its own would (its cache, batching lane, canary,
fallbacks), concurrently, so the call takes as long as its slowest task, not their sum.

A task that fails does not fail the others: its place in the answer holds the error it would have
answered alone, and the call answers 200. Only when every task fails does the call answer with an
error status (the first task's), since there is then nothing to return.

What is checked before any task runs, so that a mistake costs no upstream work: the number of
tasks (GATEWAY_MAX_FANOUT, 413), duplicates (422), unknown names (404) and kinds (400: a text task
on the chat route, or a mix, is named).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from starlette.requests import Request

from service.gateway.classifier import Outcome
from service.gateway.errors import (
    GatewayError,
    InvalidField,
    InvalidRequest,
    PayloadTooLarge,
    UnknownTask,
)
from service.gateway.middleware import TASK_LABEL
from service.gateway.registry import Registry, TaskKind, TaskSpec, UpstreamSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes.resolve import KIND_ROUTES
from service.gateway.settings import Settings

log = logging.getLogger("service.gateway.routes.fanout")

#: The `task` label of a fan-out call's request metrics (gateway_requests_total and its duration):
#: one fixed value rather than the set of names, which would multiply the series by every
#: combination callers send. Each task's items are still counted under its own name.
FANOUT_LABEL = "(fanout)"


def resolve_tasks(request: Request, registry: Registry, names: Sequence[str], kind: TaskKind,
                  settings: Settings) -> list[tuple[TaskSpec, UpstreamSpec]]:
    """The tasks `names` asks for, checked as a whole before any of them runs."""
    setattr(request.state, TASK_LABEL, FANOUT_LABEL)
    if len(names) > settings.max_fanout:
        raise PayloadTooLarge(
            f"tasks names {len(names)} tasks; the limit is {settings.max_fanout} per request "
            "(GATEWAY_MAX_FANOUT). Split them into several requests.")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise InvalidField(f"tasks[{index}] repeats {name!r} (already tasks[{seen[name]}]); "
                               "name each task once.", loc=("tasks", index))
        seen[name] = index
    unknown = [f"tasks[{i}] {name!r}" for i, name in enumerate(names) if registry.task(name) is None]
    if unknown:
        known = ", ".join(sorted(registry.tasks)) or "none"
        raise UnknownTask(f"Unknown task {', '.join(unknown)}; known tasks: {known}.")
    tasks = [registry.tasks[name] for name in names]
    wrong = [task.name for task in tasks if task.kind != kind]
    if wrong:
        right = [task.name for task in tasks if task.kind == kind]
        other = "chat" if kind == "text" else "text"
        if right:
            raise InvalidRequest(
                f"tasks mixes {kind} tasks ({', '.join(right)}) with {other} tasks "
                f"({', '.join(wrong)}); one call classifies one kind of input. Send the {other} "
                f"tasks to {KIND_ROUTES[other]} in a call of their own.")
        raise InvalidRequest(
            f"tasks {', '.join(wrong)} classify {other} inputs; send them to "
            f"{KIND_ROUTES[other]} instead.")
    return [(task, registry.upstreams[task.upstream]) for task in tasks]


class SharedDisconnect:
    """One watch on the client's connection for every task of the call.

    Each task's classifier watches for a disconnect while its items wait in a queue; with several
    tasks, several readers of one ASGI `receive` channel would race for its one message. Here a
    single reader waits for it, and every task waits on that reader."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._watch: asyncio.Future[None] | None = None

    async def _read(self) -> None:
        while (await self._request.receive())["type"] != "http.disconnect":
            pass

    async def wait(self) -> None:
        """A `Disconnected`: returns once the client has gone."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._read())
        await asyncio.shield(self._watch)

    async def close(self) -> None:
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch


def as_error(task: TaskSpec, exc: BaseException) -> GatewayError:
    """The error a task's failure answers in its place (an unexpected one as a 500, logged)."""
    if isinstance(exc, GatewayError):
        return exc
    log.error("task %s failed unexpectedly in a fan-out call", task.name, exc_info=exc)
    return GatewayError("The gateway failed unexpectedly; the cause is in its log.")


def error_body(error: GatewayError) -> dict[str, Any]:
    return {"error": {"type": error.error_type, "message": error.message}}


def respond(tasks: Sequence[TaskSpec], done: Sequence[Outcome | BaseException],
            answer: Callable[[TaskSpec, Outcome], dict[str, Any]]) -> JSONResponse:
    """`{"tasks": {name: answer or {"error": ...}}}` with 200 while any task answered; else the
    first task's error status, with every task's message.

    `answer(task, outcome)` is the body `/classify` gives one task's outcome. Headers sum up the
    tasks that answered: `X-Cache` (hit only when all hit), `X-Model` (every model, in task
    order), `X-Fallback-From` (when any fallback answered)."""
    body: dict[str, Any] = {}
    errors: list[tuple[TaskSpec, GatewayError]] = []
    outcomes: list[Outcome] = []
    for task, result in zip(tasks, done, strict=True):
        if isinstance(result, Outcome):
            body[task.name] = answer(task, result)
            outcomes.append(result)
        else:
            error = as_error(task, result)
            errors.append((task, error))
            body[task.name] = error_body(error)
    if not outcomes:
        first = errors[0][1]
        message = "Every task failed: " + "; ".join(
            f"{task.name}: {error.message}" for task, error in errors)
        retry = [e.retry_after_s for _, e in errors if e.retry_after_s is not None]
        headers = GatewayError("", retry_after_s=max(retry) if retry else None).headers()
        return JSONResponse({"error": {"type": first.error_type, "message": message}},
                            status_code=first.status_code, headers=headers)
    statuses = {outcome.cache_status for outcome in outcomes}
    headers = {"X-Cache": statuses.pop() if len(statuses) == 1 else "partial",
               "X-Model": ", ".join(dict.fromkeys(m for o in outcomes for m in o.models))}
    failed_from = [o.fallback_from for o in outcomes if o.fallback_from is not None]
    if failed_from:
        headers["X-Fallback-From"] = ", ".join(dict.fromkeys(failed_from))
    return JSONResponse({"tasks": body}, headers=headers)
