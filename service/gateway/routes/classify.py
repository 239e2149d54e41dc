"""`POST /classify` and `POST /classify-chat`: the gateway's own API, by task name.

The routes themselves (paths, docs) are declared in hot.py."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from service.gateway.classifier import Disconnected, Outcome, decorate
from service.gateway.errors import Forbidden, InvalidField, InvalidRequest, QuotaExceeded
from service.gateway.metrics import GatewayMetrics
from service.gateway.middleware import EXTRA_HEADERS, IDENTITY, USAGE
from service.gateway.quotas import Bucket, Charge, QuotaChecker
from service.gateway.registry import TaskSpec, UpstreamSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes import fanout
from service.gateway.routes.body import parse_body
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.resolve import resolve_task
from service.gateway.runtime import Runtime, runtime_of
from service.gateway.tenants import STATIC_IDENTITY, Identity, TenantStore
from service.wire import Conversation

TaskName = Annotated[str, Field(min_length=1)]
TASK_DOC = "A task name from the tasks file."
TASKS_DOC = ("Several task names (fan-out), instead of `task`: each classifies every input, "
             "concurrently, and the answer is `{\"tasks\": {name: answer}}`. At most "
             "GATEWAY_MAX_FANOUT (default 8).")


def _task_or_tasks_schema(schema: dict[str, Any]) -> None:
    """Either `task` or `tasks`, as the OpenAPI document says it. The fields default to empty
    values rather than None, so that a wrong type reads "must be a list of strings" without a
    "or null" branch; those defaults (never valid when sent) are not documented."""
    for name in ("task", "tasks"):
        schema["properties"][name].pop("default", None)
    schema["oneOf"] = [{"required": ["task"]}, {"required": ["tasks"]}]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_task_or_tasks_schema)

    task: TaskName = Field(default="", description=TASK_DOC)
    tasks: list[TaskName] = Field(default=[], min_length=1, description=TASKS_DOC)
    input: str | list[str]


class ClassifyChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_task_or_tasks_schema)

    task: TaskName = Field(default="", description=TASK_DOC)
    tasks: list[TaskName] = Field(default=[], min_length=1, description=TASKS_DOC)
    input: Conversation | list[Conversation]


def task_or_tasks(body: ClassifyRequest | ClassifyChatRequest) -> str | list[str]:
    """The one task named, or the list of them (fan-out); a 4xx naming both fields otherwise.
    An empty value is one not sent (a sent one is at least one long)."""
    if body.task:
        if body.tasks:
            raise InvalidRequest("The body has both `task` and `tasks`; send `task` for one task "
                                 "or `tasks` for several, not both.")
        return body.task
    if not body.tasks:
        raise InvalidField("`task` is missing: send `task` (one task name) or `tasks` (a list "
                           "of task names).", loc=("task",))
    return body.tasks


def reads_cache(cache_control: str | None) -> bool:
    return not (cache_control and "no-cache" in cache_control.lower())


async def run(runtime: Runtime, request: Request, task: TaskSpec, upstream: UpstreamSpec,
              items: Sequence[Any], disconnected: Disconnected | None = None) -> Outcome:
    """The part every classification route shares, once the items are validated: admitted
    (the key's tasks, its quotas charged), then classified. `disconnected`: the call's watch on
    the client (fan-out shares one, and charges each of its tasks here); default: its own.

    The quota charge is sent before the cache lookup and over the same connection when both
    live in one Redis, in one write (quotas.Charge): the classifier awaits the decision before
    any item goes upstream and before the answer is counted anywhere, so a request refused by
    its quota reaches no upstream and no shadow, drift or review count; only its cache lookup
    has happened."""
    state = request.scope.setdefault("state", {})
    identity, admission = admit(runtime, state, task, len(items))
    if admission is not None and not admission.start():
        await admission.start_after_lookup()

    started = time.perf_counter() if task.log is not None else 0.0

    async def read_until_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    outcome = await runtime.classifier.classify(task, upstream, items, tenant=identity.tenant,
                                                read_cache=reads_cache(
                                                    request.headers.get("cache-control")),
                                                disconnected=disconnected or read_until_disconnect,
                                                admitted=admission, response_id=response_id())
    issued = identity is not STATIC_IDENTITY
    if admission is not None:
        await admission()  # decided by now (the classifier awaited it); raises a 429
    if issued:  # usage is counted per issued key (middleware.py)
        state[USAGE] = (len(items), outcome.hits)
    if runtime.feedback is not None:
        runtime.feedback.after(outcome.id, task, items, outcome, key_id=identity.key_id,
                               tenant=identity.tenant)
    if task.log is not None and runtime.predictions is not None:
        runtime.predictions.offer(task, items, outcome, time.perf_counter() - started,
                                  key_id=identity.key_id if issued else None,
                                  tenant=identity.tenant if issued else None)
    if outcome.hits and admission is not None and runtime.quotas is not None and \
            not runtime.settings.quota_charge_cache_hits:
        await runtime.quotas.refund(admission.buckets, outcome.hits)
    return outcome


class Admission:
    """A request's quota charge and the gate the classifier awaits (classifier.Admitted): the
    decision, a 429 when the request does not fit; on the way in, the RateLimit headers for the
    answer and the tenant's item count."""

    __slots__ = (
        "_charge",
        "_done",
        "_identity",
        "_items",
        "_metrics",
        "_quotas",
        "_state",
        "_task",
        "_tenants",
    )

    def __init__(self, quotas: QuotaChecker, tenants: TenantStore, identity: Identity,
                 state: dict[str, Any], metrics: GatewayMetrics, task: str, items: int) -> None:
        self._quotas = quotas
        self._tenants = tenants
        self._identity = identity
        self._state = state
        self._metrics = metrics
        self._task = task
        self._items = items
        self._charge: Charge | None = None
        self._done = False

    def start(self) -> bool:
        """Send the charge now, when the tenant's quotas are known locally (the common case:
        no coroutine); False when they must be read from Redis first."""
        tenant_quotas = self._tenants.cached_tenant_quotas(self._identity.tenant)
        if tenant_quotas is None:
            return False
        self._charge = self._quotas.start(self._identity, tenant_quotas, self._items)
        return True

    async def start_after_lookup(self) -> None:
        tenant_quotas = await self._tenants.tenant_quotas(self._identity.tenant)
        self._charge = self._quotas.start(self._identity, tenant_quotas, self._items)

    @property
    def buckets(self) -> list[Bucket]:
        return [] if self._charge is None else self._charge.buckets

    async def __call__(self) -> None:
        assert self._charge is not None, "Admission awaited before it was started"
        decision = await self._charge.decision()
        if not decision.allowed:
            raise QuotaExceeded(decision.message, decision.headers)
        if not self._done:
            self._done = True
            if decision.headers:
                self._state[EXTRA_HEADERS] = decision.headers
            self._metrics.child(self._metrics.tenant_items, self._identity.tenant,
                                self._task).inc(self._items)


def admit(runtime: Runtime, state: dict[str, Any], task: TaskSpec, items: int
          ) -> tuple[Identity, Admission | None]:
    """Who is calling, and may it call `task`? 403 for a task outside the key's `tasks`, at
    once. A key with quotas gets an Admission (start it, then await it: quotas.py); keys from
    GATEWAY_API_KEYS, and everyone when no key is configured, have no quota: their items are
    counted here, with no coroutine on their path."""
    identity: Identity = state.get(IDENTITY, STATIC_IDENTITY)
    if identity.tasks is not None and task.name not in identity.tasks:
        raise Forbidden(f"This key may not call task {task.name!r}; its tasks are set by "
                        "PATCH /admin/keys/{id}.")
    quotas, tenants, metrics = runtime.quotas, runtime.tenants, runtime.metrics
    if quotas is None or tenants is None or identity is STATIC_IDENTITY:
        metrics.child(metrics.tenant_items, identity.tenant, task.name).inc(items)
        return identity, None
    return identity, Admission(quotas, tenants, identity, state, metrics, task.name, items)


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


def answer_body(task: TaskSpec, outcome: Outcome) -> dict[str, Any]:
    """What `/classify` answers for one task (also each task's entry in a fan-out answer)."""
    body: dict[str, Any] = {
        "id": outcome.id,
        "task": task.name,
        "model": outcome.model,
        "results": [decorate(task, result) for result in outcome.results],
    }
    if outcome.split:
        body["models"] = outcome.models
    return body


def respond(task: TaskSpec, outcome: Outcome) -> JSONResponse:
    return JSONResponse(answer_body(task, outcome), headers=answer_headers(outcome))


async def run_many(runtime: Runtime, request: Request,
                   tasks: Sequence[tuple[TaskSpec, UpstreamSpec]],
                   items: Sequence[Any]) -> JSONResponse:
    """Fan-out (routes/fanout.py): every task on the same items, concurrently, each failing on
    its own."""
    watch = fanout.SharedDisconnect(request)
    try:
        done = await asyncio.gather(
            *(run(runtime, request, task, upstream, items, watch.wait)
              for task, upstream in tasks), return_exceptions=True)
    finally:
        await watch.close()
    return fanout.respond([task for task, _ in tasks], done, answer_body)


CACHE_CONTROL_DOC = {"parameters": [{
    "name": "Cache-Control", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "`no-cache` skips the cache read (the fresh result is still written).",
}]}


async def classify(request: Request) -> JSONResponse:
    body = await parse_body(request, ClassifyRequest)
    runtime = runtime_of(request)
    name = task_or_tasks(body)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not isinstance(name, str):
        tasks = fanout.resolve_tasks(request, runtime.registry.current, name, "text",
                                     runtime.settings)
        check_texts(texts, runtime.settings)
        return await run_many(runtime, request, tasks, texts)
    task, upstream = resolve_task(request, runtime.registry.current, name, "text")
    check_texts(texts, runtime.settings)
    outcome = await run(runtime, request, task, upstream, texts)
    return respond(task, outcome)


async def classify_chat(request: Request) -> JSONResponse:
    body = await parse_body(request, ClassifyChatRequest)
    runtime = runtime_of(request)
    name = task_or_tasks(body)
    conversations = [body.input] if isinstance(body.input, Conversation) else body.input
    if not isinstance(name, str):
        tasks = fanout.resolve_tasks(request, runtime.registry.current, name, "chat",
                                     runtime.settings)
        return await run_many(runtime, request, tasks,
                              conversations_payload(conversations, runtime.settings))
    task, upstream = resolve_task(request, runtime.registry.current, name, "chat")
    payload = conversations_payload(conversations, runtime.settings)
    outcome = await run(runtime, request, task, upstream, payload)
    return respond(task, outcome)
