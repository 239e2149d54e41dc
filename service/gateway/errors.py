"""The gateway's error tree and the one place that turns it into HTTP responses.

Every error a caller can see is a `GatewayError` with a status, a stable `type` and a message that tells
the reader what to do. Handlers raise; `install_error_handlers` renders `{"error": {"type", "message"}}`
so that no route formats errors of its own.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.gateway.responses import JSONResponse
from service.plain_errors import describe

log = logging.getLogger("service.gateway")


class GatewayError(Exception):
    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request"


class Unauthorized(GatewayError):
    status_code = 401
    error_type = "unauthorized"


class Forbidden(GatewayError):
    """A valid key that may not do this (a task outside the key's `tasks`)."""

    status_code = 403
    error_type = "forbidden"


class NotFound(GatewayError):
    status_code = 404
    error_type = "not_found"


class QuotaExceeded(GatewayError):
    """Over a key's or tenant's quota: the message names it; Retry-After and the IETF RateLimit
    headers say when to come back."""

    status_code = 429
    error_type = "quota_exceeded"

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return dict(self._headers)


class UnknownTask(GatewayError):
    status_code = 404
    error_type = "unknown_task"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "payload_too_large"


class InvalidField(GatewayError):
    """A 422 about one field of the body (`loc`, after "body"), found by the route rather than by
    pydantic. Rendered with FastAPI's `detail` list too, like every 422, so that the official SDK
    raises its HTTPValidationError."""

    status_code = 422
    error_type = "invalid_request"

    def __init__(self, message: str, *, loc: tuple[str | int, ...]) -> None:
        super().__init__(message)
        self.loc = loc


class EmptyInput(InvalidField):
    """`input` (or one of its items) is empty."""

    def __init__(self, message: str) -> None:
        super().__init__(message, loc=("input",))


class ClientGone(GatewayError):
    """The caller disconnected before its answer was ready (nginx's 499); nobody reads this."""

    status_code = 499
    error_type = "client_closed_request"


class QueueFull(GatewayError):
    status_code = 429
    error_type = "queue_full"


class UpstreamError(GatewayError):
    """Base of everything that went wrong on the far side of the gateway."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamRejected(UpstreamError):
    """The upstream answered 4xx (other than 429): retrying will not help."""

    status_code = 502
    error_type = "upstream_rejected"

    def __init__(self, message: str, *, upstream_status: int) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class UpstreamBadResponse(UpstreamError):
    """The upstream answered 2xx with a body that breaks the contract (e.g. wrong result count)."""

    status_code = 502
    error_type = "upstream_bad_response"


class UpstreamUnavailable(UpstreamError):
    """Down, overloaded (429 or 5xx after retries) or fenced off by the circuit breaker."""

    status_code = 503
    error_type = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    error_type = "upstream_timeout"


class ShuttingDown(GatewayError):
    status_code = 503
    error_type = "shutting_down"


def error_response(status: int, error_type: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"type": error_type, "message": message}}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    """Which field, which item, what was expected and what came: `input[1] must be a string, not
    a number (3)`, not pydantic's `input.list[str].1: Input should be a valid string`."""
    return describe(exc.errors())


def render_error(request: Request, exc: Exception) -> JSONResponse:
    """The response for any exception raised while handling `request`: the one place where errors
    become status codes, used by FastAPI's handlers and by the middleware's fast path alike."""
    if isinstance(exc, GatewayError):
        if exc.status_code >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status_code,
                        exc.error_type, exc.message)
        if isinstance(exc, InvalidField):
            detail = [{"loc": ["body", *exc.loc], "msg": exc.message, "type": "value_error"}]
            return error_response(422, exc.error_type, exc.message, detail=detail)
        return error_response(exc.status_code, exc.error_type, exc.message, exc.headers())
    if isinstance(exc, RequestValidationError):
        # `detail` keeps FastAPI's (and Mistral's) 422 shape, so the official SDK raises its
        # HTTPValidationError; `error` keeps the gateway's own contract.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return error_response(422, "invalid_request", _describe_validation(exc), detail=detail)
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail),
                              dict(exc.headers or {}))
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error",
                          "The gateway failed unexpectedly; the cause is in its log.")


def install_error_handlers(app: FastAPI) -> None:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return render_error(request, exc)

    for exc_type in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handler)
