"""What the OpenAPI document says each route answers: every status a client can get, with its schema.

The routes render their bodies themselves (`JSONResponse`, errors through `errors.render_error`), so
FastAPI cannot infer these; they are declared here once and attached to each route by `responses`.
A client generated from the document then knows every error the docs list (docs/api.md, Errors),
and tests/integration/test_gateway_schemathesis.py checks that no answer falls outside them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.wire import ClassificationResponse


class ErrorInfo(BaseModel):
    type: str = Field(description="Stable machine-readable kind, e.g. `unknown_task`.")
    message: str = Field(description="What went wrong and what to do about it.")


class ErrorResponse(BaseModel):
    """Every error body: `{"error": {"type", "message"}}`."""

    error: ErrorInfo


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(ErrorResponse):
    """A 422 also carries FastAPI's (and Mistral's) `detail` list, which the official SDK reads."""

    detail: list[ValidationIssue]


class LabelledTarget(BaseModel):
    model_config = ConfigDict(extra="allow")

    scores: dict[str, float]
    label: str | None = Field(default=None, description="The top label (single-label target).")
    labels: list[str] | None = Field(
        default=None, description="Labels at or over the task's threshold (multi-label target).")


class ClassifyResponse(BaseModel):
    id: str
    task: str
    model: str = Field(description="The model that answered (a canary's or a fallback's when "
                       "one did); the first item's when items split between models.")
    models: list[str] | None = Field(
        default=None, description="Only when items split between the task's model and its "
        "canary (or a fallback): the model that answered each item, in input order.")
    results: list[dict[str, LabelledTarget]] = Field(description="One per input, in input order.")


class ClassifyTasksResponse(BaseModel):
    """A fan-out call's answer (the body named `tasks`)."""

    tasks: dict[str, ClassifyResponse | ErrorResponse] = Field(
        description="Per task named, in the order named: what `/classify` answers for it alone, "
        "or, when it failed, its error (`{\"error\": {type, message}}`); the call answers 200 "
        "while any task answered.")


#: What /classify and /classify-chat answer with 200: one task's answer, or a fan-out's.
ClassifyAnswer = ClassifyResponse | ClassifyTasksResponse


class ShadowTarget(BaseModel):
    compared: int
    agreed: int
    agreement: float | None = Field(description="agreed / compared; null before any comparison.")
    confusion: dict[str, dict[str, int]] = Field(
        description="Counts by the task model's top label, then the shadow's top label.")


class ShadowReport(BaseModel):
    task: str
    model: str
    shadow: dict[str, Any]
    shared: bool = Field(description="Whether the counts live in Redis, shared by every replica "
                         "(else in this process only).")
    targets: dict[str, ShadowTarget]


class CascadeStats(BaseModel):
    items: int = Field(description="Items the cascade answered over the window (a day for "
                       "`GET /tasks/{name}`) since its stages last changed: every replica's when "
                       "the gateway has Redis, else this replica's.")
    answered: list[int] = Field(description="How many of them each stage answered, in order.")
    escalated_share: float | None = Field(
        description="The share the first stage handed on; null before any item.")


class DriftReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    task: str
    model: str
    threshold: float = Field(description="The population stability index above which a "
                             "target's answers count as drifted.")
    scope: str = Field(description="Where the counts come from: `all replicas` (Redis, "
                       "shared by every replica) or `this replica` (its memory, without Redis).")
    targets: dict[str, dict[str, Any]] = Field(
        description="Per target: `hour`, `day` and `reference` distributions, `psi` (the hour "
                    "against the reference), `drifted`, the labels that `moved` most, and "
                    "`training` (a factory model's training label mix, with `psi_hour` and "
                    "`psi_day` against it; null elsewhere).")
    cascade: dict[str, CascadeStats] | None = Field(
        default=None, description="Only for a task with a cascade: `hour` and `day`, the items "
        "each stage answered and the share the first stage handed on.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = Field(description="`ready`, `degraded` (serving without the cache) or `not ready`.")
    problems: list[str]


class TaskDescription(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    model: str
    cascade_stats: CascadeStats | None = Field(
        default=None, description="Only `GET /tasks/{name}` of a task with a cascade.")


class TaskList(BaseModel):
    tasks: list[TaskDescription]
    last_reload_error: str | None
    tasks_file: str = Field(description="The tasks file served, as an absolute path (symlinks "
                                        "kept), so a client can tell whether it wrote this file.")
    tasks_file_watched: bool = Field(description="Whether a watch on the file's directory "
                                                 "reports changes at once (else only polling).")
    tasks_poll_interval_s: float = Field(description="How often the file is also checked.")


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                "schema": {"type": "integer"}}}
#: draft-ietf-httpapi-ratelimit-headers, on answers that went through a quota (docs/tenants.md).
RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": {"description": "The quotas that applied, one per bucket: "
                         '`"key.items_per_minute";q=300;w=60`.', "schema": {"type": "string"}},
    "RateLimit": {"description": "What is left of each (`r`) and the seconds until it is full "
                  "again (`t`).", "schema": {"type": "string"}},
}

ERRORS: dict[int, tuple[str, type[BaseModel], bool]] = {
    400: ("A text task on the chat route, or the reverse; text and chat tasks mixed in `tasks`; "
          "both `task` and `tasks`.", ErrorResponse, False),
    401: ("Missing, malformed, unknown, revoked or expired key (`Authorization: Bearer <key>`: "
          "an issued key or one of GATEWAY_API_KEYS; GATEWAY_ADMIN_KEY on /admin/ routes); "
          "one body whatever the reason.", ErrorResponse, False),
    403: ("The key may not call this task (its `tasks`).", ErrorResponse, False),
    404: ("Unknown task or model (the message lists the known ones; for `tasks`, a call fails "
          "whole when it names one), or a task without the shadow model asked about.",
          ErrorResponse, False),
    408: ("The request head or body did not arrive within GATEWAY_HEAD_TIMEOUT_S / "
          "GATEWAY_BODY_TIMEOUT_S; the connection is closed.", ErrorResponse, False),
    413: ("Body over GATEWAY_MAX_BODY_BYTES, too many items, an item too long, or more tasks "
          "than GATEWAY_MAX_FANOUT.",
          ErrorResponse, False),
    422: ("Malformed body, wrong types, or empty input.", ValidationErrorResponse, False),
    429: ("The model's batch queue is full (`queue_full`), or a quota of the key or its tenant "
          "is used up (`quota_exceeded`, naming the quota, with RateLimit headers).",
          ErrorResponse, True),
    502: ("The upstream rejected the request (4xx) or answered something that is not a "
          "classification response.", ErrorResponse, False),
    503: ("The upstream is unavailable (down, circuit open, overloaded after retries), the "
          "gateway is shutting down, or it holds its maximum of busy connections; on /admin/ "
          "routes: the Redis that keeps keys did not answer.",
          ErrorResponse, True),
    504: ("No answer within the task's deadline.", ErrorResponse, False),
}
CLASSIFY_ERRORS = (400, 401, 403, 404, 408, 413, 422, 429, 502, 503, 504)
ADMIN_ERRORS = (401, 404, 422, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses` for these error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, model, retry_after = ERRORS[status]
        entry: dict[str, Any] = {"description": description, "model": model}
        if retry_after:
            entry["headers"] = ({**_RETRY_AFTER, **RATE_LIMIT_HEADERS} if status == 429
                                else _RETRY_AFTER)
        out[status] = entry
    return out


def classify_responses(model: Any) -> dict[int | str, dict[str, Any]]:
    """A hot classification route: `model` on 200, with its headers, and every error."""
    ok = {"description": "One result per input, in input order (per task, for `tasks`).",
          "model": model, "headers": {
        "X-Cache": {"description": "`hit`, `miss` or `partial` (over every task that answered, "
                    "for `tasks`).", "schema": {"type": "string"}},
        "X-Model": {"description": "The model that answered (comma-separated when items split "
                    "between models, or several tasks answered).", "schema": {"type": "string"}},
        "X-Fallback-From": {"description": "Only when a fallback answered: the model that "
                            "failed.", "schema": {"type": "string"}},
        **RATE_LIMIT_HEADERS}}
    return {200: ok, **error_responses(*CLASSIFY_ERRORS)}


METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "Prometheus text exposition format.",
    "content": {"text/plain": {"schema": {"type": "string"}}}}}

__all__ = ["ADMIN_ERRORS", "ClassificationResponse", "ClassifyAnswer", "ClassifyResponse",
           "ClassifyTasksResponse", "ErrorResponse", "Health", "Readiness",
           "ShadowReport",
           "TaskDescription", "TaskList",
           "ValidationErrorResponse", "classify_responses", "error_responses"]
