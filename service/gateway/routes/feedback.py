"""`POST /feedback` (corrected labels), `GET /feedback/{task}` and `GET /review/{task}` (the
streams, page by page, for `classifier-gateway feedback export` / `review export`). feedback.py
says how they are kept."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request

from service.gateway.errors import GatewayError, InvalidRequest, UnknownTask
from service.gateway.feedback import FeedbackBook, FeedbackUnavailable, label_sets
from service.gateway.middleware import IDENTITY
from service.gateway.registry import TaskSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes.body import openapi_body, parse_body
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.openapi import error_responses
from service.gateway.routes.resolve import known_task
from service.gateway.runtime import Runtime, RuntimeDep, runtime_of
from service.gateway.tenants import STATIC_IDENTITY, TENANT_PATTERN, Identity
from service.wire import Conversation

router = APIRouter(tags=["feedback"])


class FeedbackRequest(BaseModel):
    """Name the item by `id` and `index` (tasks with `feedback: true`), or by `task` and `input`.
    `labels` maps each corrected target to its label (a list for a multi-label target)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, min_length=1, description="An earlier response's id.")
    index: int | None = Field(default=None, ge=0, description="The item's index in that response.")
    task: str | None = Field(default=None, min_length=1)
    input: str | Conversation | None = None
    labels: dict[str, str | list[str]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_way(self) -> FeedbackRequest:
        by_id = self.id is not None or self.index is not None
        by_input = self.task is not None or self.input is not None
        if by_id == by_input or (by_id and (self.id is None or self.index is None)) or (
                by_input and (self.task is None or self.input is None)):
            raise ValueError("name the item either by `id` and `index` (of an earlier response) "
                             "or by `task` and `input`, not both")
        return self


class FeedbackAck(BaseModel):
    id: str = Field(description="The correction's id in the task's feedback stream.")
    task: str
    duplicate: bool = Field(description="An earlier correction of the same item is replaced.")


class StreamPage(BaseModel):
    model_config = ConfigDict(extra="allow")

    task: str
    kind: str
    entries: list[dict[str, Any]]
    next: str | None = Field(description="Pass as `after` for the next page; null at the end.")


def _book(runtime: Runtime) -> FeedbackBook:
    if runtime.feedback is None or not runtime.feedback.enabled:
        raise FeedbackOff("Feedback and the review queue need Redis: set "
                          "GATEWAY_FEEDBACK_REDIS_URL (or GATEWAY_REDIS_URL).", retry_after_s=60)
    return runtime.feedback


class FeedbackOff(GatewayError):
    status_code = 503
    error_type = "feedback_unavailable"


def _check_labels(labels: dict[str, str | list[str]], known: dict[str, set[str]]) -> None:
    """Every corrected target and label must be the model's: a typo must not become data."""
    for target, value in labels.items():
        if target not in known:
            raise InvalidRequest(f"labels.{target}: the model has no target {target!r}; its "
                                 f"targets: {', '.join(sorted(known))}.")
        for label in [value] if isinstance(value, str) else value:
            if label not in known[target]:
                raise InvalidRequest(f"labels.{target}: {label!r} is not a label of the model; "
                                     f"its labels: {', '.join(sorted(known[target]))}.")


def _task(runtime: Runtime, name: str) -> TaskSpec:
    return known_task(runtime.registry.current, name)


@router.post("/feedback", summary="The correct labels of an item the gateway answered",
             responses={200: {"model": FeedbackAck}, **error_responses(400, 401, 404, 413, 422,
                                                                        502, 503, 504)},
             openapi_extra=openapi_body(FeedbackRequest))
async def post_feedback(request: Request) -> JSONResponse:
    body = await parse_body(request, FeedbackRequest)
    runtime = runtime_of(request)
    book = _book(runtime)
    identity: Identity = getattr(request.state, IDENTITY, STATIC_IDENTITY)
    item: Any
    try:
        if body.id is not None and body.index is not None:
            seen = await book.recall(body.id)
            if seen is None:
                raise UnknownTask(
                    f"Unknown response id {body.id!r}: responses are remembered for "
                    f"{runtime.settings.feedback_window_s} s, and only for tasks with "
                    "`feedback: true`; send `task` and `input` instead.")
            if body.index >= len(seen.items):
                raise InvalidRequest(f"index: response {body.id!r} has {len(seen.items)} items "
                                     f"(indexes 0 to {len(seen.items) - 1}).")
            task_name, item, model = seen.task, seen.items[body.index], seen.models[body.index]
            known = {t: set(labels) for t, labels in seen.labels[body.index].items()}
        else:
            assert body.task is not None and body.input is not None
            task = _task(runtime, body.task)
            if isinstance(body.input, str) != (task.kind == "text"):
                raise InvalidRequest(f"input: task {task.name!r} classifies {task.kind} inputs; "
                                     "send " + ("a string." if task.kind == "text"
                                                else "a conversation ({\"messages\": [...]})."))
            if isinstance(body.input, str):
                check_texts([body.input], runtime.settings)
                item = body.input
            else:
                item = conversations_payload([body.input], runtime.settings)[0]
            # The model's targets and labels, from its own answer (usually a cache hit).
            upstream = runtime.registry.current.upstreams[task.upstream]
            outcome = await runtime.classifier.classify(task, upstream, [item],
                                                        tenant=identity.tenant)
            task_name, model = task.name, outcome.model
            known = label_sets(outcome.results[0])
        _check_labels(body.labels, known)
        stream_id, duplicate = await book.add(task_name, item, body.labels, model, body.id,
                                              body.index, key_id=identity.key_id,
                                              tenant=identity.tenant)
    except FeedbackUnavailable as exc:
        raise FeedbackOff(f"Feedback not stored: {exc}.", retry_after_s=5) from None
    return JSONResponse({"id": stream_id, "task": task_name, "duplicate": duplicate})


async def _page(runtime: Runtime, what: str, name: str, after: str, limit: int,
                tenant: str | None) -> JSONResponse:
    book = _book(runtime)
    task = _task(runtime, name)
    try:
        entries, cursor = await book.page(what, task.name, after, limit, tenant)
    except FeedbackUnavailable as exc:
        raise FeedbackOff(f"{exc}.", retry_after_s=5) from None
    return JSONResponse({"task": task.name, "kind": task.kind, "entries": entries,
                         "next": cursor})


AFTER = Query(default="0", pattern=r"^\d+(-\d+)?$",
              description="A stream id: entries after it (`next` of the previous page).")
LIMIT = Query(default=500, ge=1, le=5000)
TENANT = Query(default=None, pattern=TENANT_PATTERN,
               description="Only the entries this tenant's keys produced.")


@router.get("/feedback/{task}", summary="A task's corrected labels, latest per item",
            responses={200: {"model": StreamPage}, **error_responses(401, 404, 422, 503)})
async def get_feedback(task: str, runtime: RuntimeDep, after: str = AFTER,
                       limit: int = LIMIT, tenant: str | None = TENANT) -> JSONResponse:
    return await _page(runtime, "feedback", task, after, limit, tenant)


@router.get("/review/{task}", summary="A task's review queue: unsure answers and a control share",
            responses={200: {"model": StreamPage}, **error_responses(401, 404, 422, 503)})
async def get_review(task: str, runtime: RuntimeDep, after: str = AFTER,
                     limit: int = LIMIT, tenant: str | None = TENANT) -> JSONResponse:
    return await _page(runtime, "review", task, after, limit, tenant)


SINCE = Query(default=None, pattern=r"^\d+(\.\d+)?[smhd]$",
              description="Only entries younger than this (`90s`, `30m`, `2h`, `7d`); ignored "
                          "when `after` is given.")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@router.get("/predictions/{task}", summary="A task's sampled prediction log",
            responses={200: {"model": StreamPage}, **error_responses(401, 404, 422, 503)})
async def get_predictions(task: str, runtime: RuntimeDep, after: str = AFTER,
                          since: str | None = SINCE, limit: int = LIMIT) -> JSONResponse:
    """The entries the task's `log` sampled (service/gateway/predictions.py), oldest first, in
    the same pages as GET /feedback/{task}."""
    log = runtime.predictions
    if log is None or not log.enabled:
        raise FeedbackOff("The prediction log needs Redis: set GATEWAY_FEEDBACK_REDIS_URL (or "
                          "GATEWAY_REDIS_URL).", retry_after_s=60)
    spec = _task(runtime, task)
    since_s = float(since[:-1]) * _UNITS[since[-1]] if since else None
    try:
        entries, cursor = await log.page(spec.name, after, since_s, limit)
    except Exception as exc:
        raise FeedbackOff(f"Redis did not answer ({type(exc).__name__}).",
                          retry_after_s=5) from None
    return JSONResponse({"task": spec.name, "kind": spec.kind, "entries": entries,
                         "next": cursor})
