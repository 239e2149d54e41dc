"""`GET /tasks`, `GET /tasks/{name}`: what the registry serves. Never a key, only the name of the
environment variable that holds it; never a proxy's credentials."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from redis.exceptions import RedisError

from service.gateway.drift import fetch_training_shares
from service.gateway.errors import GatewayError, UnknownTask
from service.gateway.registry import (
    CascadeStage,
    Registry,
    RoleField,
    TaskSpec,
    UpstreamSpec,
    role_fields,
)
from service.gateway.responses import JSONResponse
from service.gateway.routes.openapi import (
    DriftReport,
    ShadowReport,
    TaskDescription,
    TaskList,
    error_responses,
)
from service.gateway.routes.resolve import known_task
from service.gateway.runtime import Runtime, RuntimeDep
from service.gateway.scrub import scrub

router = APIRouter(tags=["tasks"])


def shown(upstream: UpstreamSpec) -> dict[str, Any]:
    secrets = upstream.secrets()
    # Scrubbed too: an operator may have pasted the key into a URL (`?key=...`).
    return {"name": upstream.name, "base_url": scrub(upstream.base_url, secrets),
            "protocol": upstream.protocol, "api_key_env": upstream.api_key_env,
            "proxy": scrub(upstream.proxy_shown, secrets) if upstream.proxy_shown else None}


def _role(task: TaskSpec, field: RoleField, registry: Registry) -> Any:
    """One role field as /tasks shows it: fallbacks (tried in turn) with their upstream in full,
    a canary or shadow with its share and the upstream it is asked on, `previous` as written."""
    entries = task.entries(field)
    if field.many:  # fallbacks, and a cascade's stages (with their `min_margin`)
        rows = []
        for entry in entries:
            upstream, route = (task.stage_route(entry) if isinstance(entry, CascadeStage)
                               else (entry.upstream, task.fallback_route(entry)))
            row: dict[str, Any] = {"upstream": shown(registry.upstreams[upstream]),
                                   "model": route.model, "target": route.target,
                                   "labels": list(route.labels)}
            if isinstance(entry, CascadeStage):
                row["min_margin"] = entry.min_margin
            rows.append(row)
        return rows
    if not entries:
        return None
    (entry,) = entries
    if field.share is None:
        return entry.model_dump(exclude_none=True)
    return {"model": entry.model, field.share: getattr(entry, field.share),
            "upstream": entry.upstream or task.upstream}


def describe(task: TaskSpec, registry: Registry, default_ttl_s: int,
             default_timeout_s: float) -> dict[str, Any]:
    upstream = registry.upstreams[task.upstream]
    route = task.route()
    return {
        "name": task.name,
        "kind": task.kind,
        "model": task.model,
        "upstream": shown(upstream),
        "target": route.target,
        "labels": list(route.labels),
        **{field.name: _role(task, field, registry) for field in role_fields()},
        "cache_ttl_s": default_ttl_s if task.cache_ttl_s is None else task.cache_ttl_s,
        "timeout_s": task.timeout_s or default_timeout_s,
        "threshold": task.threshold,
        "multi_label_targets": list(task.multi_label_targets),
    }


@router.get("/tasks", summary="Every task the gateway serves",
            responses={200: {"model": TaskList}, **error_responses(401)})
async def list_tasks(runtime: RuntimeDep) -> JSONResponse:
    registry = runtime.registry.current
    s = runtime.settings
    return JSONResponse({
        "tasks": [describe(t, registry, s.cache_ttl_s, s.timeout_s)
                  for _, t in sorted(registry.tasks.items())],
        "last_reload_error": runtime.registry.last_error,
        # Where the tasks come from, so that `classifier-gateway finetune` can tell whether the
        # file it wrote is the one served, and how soon a change is seen.
        "tasks_file": runtime.registry.absolute_path,
        "tasks_file_watched": runtime.registry.watching,
        "tasks_poll_interval_s": runtime.registry.poll_interval_s,
    })


@router.get("/tasks/{name}", summary="One task",
            responses={200: {"model": TaskDescription}, **error_responses(401, 404, 422)})
async def get_task(name: str, runtime: RuntimeDep) -> JSONResponse:
    registry = runtime.registry.current
    task = known_task(registry, name)
    s = runtime.settings
    body = describe(task, registry, s.cache_ttl_s, s.timeout_s)
    if task.cascade and runtime.drift is not None:
        # Escalation: the share of items the first stage handed on, over the last day (counted
        # in Redis, by every replica, when the gateway has one: drift.py).
        try:
            body["cascade_stats"] = await runtime.drift.cascade_report(task)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StatsUnavailable(_unavailable(runtime, exc), retry_after_s=5) from None
    return JSONResponse(body)


@router.get("/tasks/{name}/shadow", summary="How a task's shadow model agrees with its model",
            responses={200: {"model": ShadowReport}, **error_responses(401, 404, 422)})
async def get_shadow(name: str, runtime: RuntimeDep) -> JSONResponse:
    """Per target: items compared, how many top labels agreed, and the confusion table (the task
    model's top label, then the shadow's), counted since this pair of models was configured."""
    task = runtime.registry.current.task(name)
    if task is None or task.shadow is None:
        known = sorted(n for n, t in runtime.registry.current.tasks.items() if t.shadow)
        what = "Unknown task" if task is None else "No shadow model for task"
        raise UnknownTask(f"{what} {name!r}; tasks with a shadow: {', '.join(known) or 'none'}.")
    upstream, route = task.shadow_route()
    tables = await runtime.store.read(task.name, task.model, route.model)
    targets: dict[str, Any] = {}
    for target, table in sorted(tables.items()):
        compared = sum(table.values())
        agreed = sum(n for (ours, theirs), n in table.items() if ours == theirs)
        confusion: dict[str, dict[str, int]] = {}
        for (ours, theirs), n in sorted(table.items()):
            confusion.setdefault(ours, {})[theirs] = n
        targets[target] = {"compared": compared, "agreed": agreed,
                           "agreement": round(agreed / compared, 6) if compared else None,
                           "confusion": confusion}
    return JSONResponse({"task": task.name, "model": task.model,
                         "shadow": {"model": route.model, "upstream": upstream,
                                    "sample": task.shadow.sample},
                         "shared": runtime.store.shared, "targets": targets})


@router.get("/tasks/{name}/stats", summary="A task's label distribution and its drift",
            responses={200: {"model": DriftReport}, **error_responses(401, 404, 422)})
async def get_stats(name: str, runtime: RuntimeDep) -> JSONResponse:
    """Per target of the task's model: the top labels it answered over the last hour and day
    (every replica's, when the gateway has Redis; else this replica's), and the population
    stability index of the hour against the 23 hours before it; for a cascade, the items each
    stage answered over the hour and the day (service/gateway/drift.py, docs/observability.md)."""
    registry = runtime.registry.current
    task = known_task(registry, name)
    drift = runtime.drift
    if drift is None:
        return JSONResponse({"task": task.name, "model": task.model, "threshold": 0.0,
                             "scope": "none", "targets": {}})
    if task.model not in drift.training:  # kept once known; asked again while unknown
        found = await fetch_training_shares(registry.upstreams[task.upstream], task.model)
        if found:
            drift.training[task.model] = found
    try:
        return JSONResponse(await drift.stats(task))
    except (RedisError, OSError, TimeoutError) as exc:
        raise StatsUnavailable(_unavailable(runtime, exc), retry_after_s=5) from None


class StatsUnavailable(GatewayError):
    """The counts live in Redis (shared by the replicas) and Redis did not answer."""

    status_code = 503
    error_type = "stats_unavailable"


def _unavailable(runtime: Runtime, exc: BaseException) -> str:
    _, setting = runtime.settings.shared_redis()
    # The type only: a redis-py message may carry the host, never worth a key's risk.
    return (f"The task's counts are kept in Redis ({setting}), which did not answer "
            f"({type(exc).__name__}); retry, or check that Redis.")
