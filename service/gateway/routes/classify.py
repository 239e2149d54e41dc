"""`POST /classify` and `POST /classify-chat`: the gateway's own API, by task name.

The routes themselves (paths, docs) are declared in hot.py."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from service.gateway.classifier import Outcome, decorate
from service.gateway.errors import Forbidden, QuotaExceeded
from service.gateway.middleware import EXTRA_HEADERS, IDENTITY, USAGE
from service.gateway.quotas import Bucket
from service.gateway.registry import TaskSpec, UpstreamSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes.body import parse_body
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.resolve import resolve_task
from service.gateway.runtime import Runtime, runtime_of
from service.gateway.tenants import STATIC_IDENTITY, Identity
from service.wire import Conversation


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, description="A task name from the tasks file.")
    input: str | list[str]


class ClassifyChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    input: Conversation | list[Conversation]


def reads_cache(cache_control: str | None) -> bool:
    return not (cache_control and "no-cache" in cache_control.lower())


async def run(runtime: Runtime, request: Request, task: TaskSpec, upstream: UpstreamSpec,
              items: Sequence[Any]) -> Outcome:
    """The part every classification route shares, once the items are validated."""
    identity, charged = await admit(runtime, request, task, len(items))
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    outcome = await runtime.classifier.classify(task, upstream, items, tenant=identity.tenant,
                                                read_cache=reads_cache(
                                                    request.headers.get("cache-control")),
                                                disconnected=disconnected)
    outcome = dataclasses.replace(outcome, id=response_id())
    if charged and outcome.hits and runtime.quotas is not None and \
            not runtime.settings.quota_charge_cache_hits:
        await runtime.quotas.refund(charged, outcome.hits)
    setattr(request.state, USAGE, (len(items), outcome.hits))
    if runtime.feedback is not None:
        runtime.feedback.after(outcome.id, task, items, outcome, key_id=identity.key_id,
                               tenant=identity.tenant)
    return outcome


async def admit(runtime: Runtime, request: Request, task: TaskSpec, items: int
                ) -> tuple[Identity, list[Bucket]]:
    """May this caller run `items` items of `task` now? 403 for a task outside the key's `tasks`,
    429 over a quota (charged up front, all buckets at once: quotas.py); the quota's RateLimit
    headers go onto the answer. Keys from GATEWAY_API_KEYS have no quota. Returns the caller and
    the buckets charged."""
    identity: Identity = getattr(request.state, IDENTITY, STATIC_IDENTITY)
    buckets: list[Bucket] = []
    if not identity.may_call(task.name):
        raise Forbidden(f"This key may not call task {task.name!r}; its tasks are set by "
                        "PATCH /admin/keys/{id}.")
    if (runtime.quotas is not None and runtime.tenants is not None
            and identity.key_id != STATIC_IDENTITY.key_id):
        tenant_quotas = await runtime.tenants.tenant_quotas(identity.tenant)
        buckets = runtime.quotas.buckets(identity, tenant_quotas, items)
        decision = await runtime.quotas.charge(buckets, identity.tenant)
        if not decision.allowed:
            raise QuotaExceeded(decision.message, decision.headers)
        if decision.headers:
            setattr(request.state, EXTRA_HEADERS, decision.headers)
    metrics = runtime.metrics
    metrics.child(metrics.tenant_items, identity.tenant, task.name).inc(items)
    return identity, buckets


_ids = random.Random()  # seeded from the OS; ids need to be unique, not secret
os.register_at_fork(after_in_child=_ids.seed)  # forked workers must not repeat each other's ids


def response_id() -> str:
    """32 hex digits like a uuid4's, without a getrandom() system call per response."""
    return f"{_ids.getrandbits(128):032x}"


def answer_headers(outcome: Outcome) -> dict[str, str]:
    """`X-Cache`; `X-Model`, the model that answered (a canary's or a fallback's when one did;
    comma-separated when items split between models), and `X-Fallback-From`, the model that
    failed, when a fallback answered."""
    headers = {"X-Cache": outcome.cache_status,
               "X-Model": ", ".join(dict.fromkeys(outcome.models))}
    if outcome.fallback_from is not None:
        headers["X-Fallback-From"] = outcome.fallback_from
    return headers


def respond(task: TaskSpec, outcome: Outcome) -> JSONResponse:
    body: dict[str, Any] = {
        "id": outcome.id,
        "task": task.name,
        "model": outcome.model,
        "results": [decorate(task, result) for result in outcome.results],
    }
    if outcome.split:
        body["models"] = outcome.models
    return JSONResponse(body, headers=answer_headers(outcome))


CACHE_CONTROL_DOC = {"parameters": [{
    "name": "Cache-Control", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "`no-cache` skips the cache read (the fresh result is still written).",
}]}


async def classify(request: Request) -> JSONResponse:
    body = await parse_body(request, ClassifyRequest)
    runtime = runtime_of(request)
    task, upstream = resolve_task(request, runtime.registry.current, body.task, "text")
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_texts(texts, runtime.settings)
    outcome = await run(runtime, request, task, upstream, texts)
    return respond(task, outcome)


async def classify_chat(request: Request) -> JSONResponse:
    body = await parse_body(request, ClassifyChatRequest)
    runtime = runtime_of(request)
    task, upstream = resolve_task(request, runtime.registry.current, body.task, "chat")
    conversations = [body.input] if isinstance(body.input, Conversation) else body.input
    payload = conversations_payload(conversations, runtime.settings)
    outcome = await run(runtime, request, task, upstream, payload)
    return respond(task, outcome)
