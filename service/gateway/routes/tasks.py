"""`GET /tasks`, `GET /tasks/{name}`: what the registry serves. Never a key, only the name of the
environment variable that holds it; never a proxy's credentials."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.gateway.errors import UnknownTask
from service.gateway.registry import Registry, TaskSpec
from service.gateway.responses import JSONResponse
from service.gateway.runtime import RuntimeDep
from service.gateway.scrub import scrub

router = APIRouter(tags=["tasks"])


def describe(task: TaskSpec, registry: Registry, default_ttl_s: int,
             default_timeout_s: float) -> dict[str, Any]:
    upstream = registry.upstreams[task.upstream]
    secrets = upstream.secrets()
    return {
        "name": task.name,
        "kind": task.kind,
        "model": task.model,
        # Scrubbed too: an operator may have pasted the key into a URL (`?key=...`).
        "upstream": {"name": upstream.name, "base_url": scrub(upstream.base_url, secrets),
                     "api_key_env": upstream.api_key_env,
                     "proxy": scrub(upstream.proxy_shown, secrets) if upstream.proxy_shown else None},
        "cache_ttl_s": default_ttl_s if task.cache_ttl_s is None else task.cache_ttl_s,
        "timeout_s": task.timeout_s or default_timeout_s,
        "threshold": task.threshold,
        "multi_label_targets": list(task.multi_label_targets),
    }


@router.get("/tasks", summary="Every task the gateway serves")
async def list_tasks(runtime: RuntimeDep) -> JSONResponse:
    registry = runtime.registry.current
    s = runtime.settings
    return JSONResponse({
        "tasks": [describe(t, registry, s.cache_ttl_s, s.timeout_s)
                  for _, t in sorted(registry.tasks.items())],
        "last_reload_error": runtime.registry.last_error,
    })


@router.get("/tasks/{name}", summary="One task")
async def get_task(name: str, runtime: RuntimeDep) -> JSONResponse:
    registry = runtime.registry.current
    task = registry.task(name)
    if task is None:
        known = ", ".join(sorted(registry.tasks)) or "none"
        raise UnknownTask(f"Unknown task {name!r}; known tasks: {known}.")
    s = runtime.settings
    return JSONResponse(describe(task, registry, s.cache_ttl_s, s.timeout_s))
