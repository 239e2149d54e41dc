"""The gateway's front door, as one pure ASGI middleware: client keys, body size, request metrics.

Pure ASGI rather than `BaseHTTPMiddleware`, because it runs on every request of a hot path and the
latter costs a task and a stream per request. Everything it rejects is rejected before the body is
parsed, so an oversized or unauthenticated request costs almost nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.gateway.errors import ClientGone, error_response, render_error
from service.gateway.metrics import UNKNOWN, GatewayMetrics
from service.gateway.tenants import STATIC_IDENTITY, Authenticator, Identity, KeyStoreRefused

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
ADMIN_PREFIX = "/admin/"
TASK_LABEL = "task_label"
#: Where the front door leaves the caller's `Identity` (tenants.py) for the routes.
IDENTITY = "identity"
#: Headers a route asks the front door to add to its answer (the quota's RateLimit headers).
EXTRA_HEADERS = "extra_headers"
#: (items answered, of which cache hits), left by the routes for the key's usage.
USAGE = "usage"
Handler = Callable[[Request], Awaitable[Response]]


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, keys: Authenticator, max_body_bytes: int,
                 metrics: GatewayMetrics, handlers: Mapping[str, Handler] | None = None,
                 exemplar: Callable[[], dict[str, str] | None] | None = None) -> None:
        self.app = app
        # Tracing on: the trace id that request_duration's observation carries as its exemplar.
        self.exemplar = exemplar
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        # The hot classification routes (routes/hot.py): counted per task, called directly.
        self.handlers = dict(handlers or {})

    async def _identify(self, scope: Scope, receive: Receive, send: Send) -> Identity | None:
        """The caller's identity; None once the refusal (401, or 503 when the key store refused
        the gateway) has been sent."""
        try:
            identity = await self.keys.identify(_header(scope, b"authorization"))
        except KeyStoreRefused as exc:
            await _key_store_refused(str(exc), scope, receive, send)
            return None
        if identity is None:
            await _unauthorized(scope, receive, send)
        return identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path not in self.handlers:  # not a classification route (routes/hot.py)
            if path.startswith(ADMIN_PREFIX):
                if not self.keys.is_admin(_header(scope, b"authorization")):
                    await _unauthorized(scope, receive, send, admin=True)
                    return
            elif path not in OPEN_PATHS:
                identity = await self._identify(scope, receive, send)
                if identity is None:
                    return
                scope.setdefault("state", {})[IDENTITY] = identity
            await self.app(scope, receive, send)
            return

        metrics = self.metrics
        metrics.inflight_requests.inc()
        started = time.perf_counter()
        status = 500
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = state.get(EXTRA_HEADERS)
                if extra:
                    message = {**message, "headers": [
                        *message.get("headers", []),
                        *((k.lower().encode(), v.encode()) for k, v in extra.items())]}
            await send(message)

        try:
            if self.keys.enabled:  # else everyone is the default tenant: no coroutine to await
                identity = await self._identify(scope, receive, send_wrapper)
                if identity is None:
                    return
                state[IDENTITY] = identity
            try:
                body = await self._read_body(scope, receive, send_wrapper)
            except _ClientLeft:  # gone before the body was complete: nothing to answer
                status = ClientGone.status_code
                return
            if body is None:
                return
            handler = self.handlers.get(path)
            if handler is None or scope["method"] != "POST":
                await self.app(scope, _replay(body, receive), send_wrapper)
                return
            # The fast path: the same handler FastAPI routes to, called directly. The framework's
            # layers in between (exception middleware, router, dependency solving) cost more per
            # request than a cache hit; errors are rendered by the same function FastAPI uses.
            request = Request(scope, _replay(body, receive))
            try:
                response = await handler(request)
            except Exception as exc:
                response = render_error(request, exc)
            await response(scope, receive, send_wrapper)
        finally:
            who = state.get(IDENTITY)
            if who is not None and who is not STATIC_IDENTITY:  # an issued key: its usage
                usage = self.keys.usage
                if usage is not None:
                    items, hits = state.get(USAGE, (0, 0))
                    usage.record(who.key_id, status, items, hits)
            task = state.get(TASK_LABEL, UNKNOWN)
            metrics.inflight_requests.dec()
            metrics.child(metrics.requests, path, task, str(status)).inc()
            metrics.child(metrics.request_duration, path, task).observe(
                time.perf_counter() - started,
                self.exemplar() if self.exemplar is not None else None)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (Content-Length first, then the bytes)."""
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit, scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientLeft
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(limit, scope, receive, send,
                                 body_done=not message.get("more_body", False))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _ClientLeft(Exception):
    """The client disconnected while its body was being read."""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the app the body already read, then the real channel (which reports disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# Reading and dropping the rest of a refused body costs about a millisecond per megabyte on loopback,
# and GATEWAY_BODY_TIMEOUT_S bounds its time; past 64 MiB (64x the default body limit) answering at
# once with `Connection: close` is the better deal: the gateway's server (connections.py) then sends
# the answer and a FIN and drops the rest unparsed, so the client, done sending, still reads it.
_DISCARD_MAX_BYTES = 64 * 1024 * 1024


async def _answer_unread(response: Response, scope: Scope, receive: Receive, send: Send, *,
                         body_done: bool = False) -> None:
    """Send `response` to a request whose body has not been read to its end.

    Closing a connection while the client is still sending makes the kernel reset it, and the
    client, busy writing, never reads the answer: an 8 MB body with `Connection: close` got a reset
    instead of its 413. So the rest of the body is read and dropped first, then the answer goes out;
    past `_DISCARD_MAX_BYTES` the answer goes out at once with `Connection: close`, and the server's
    lingering close (connections.py) keeps the reset away. A client that sent
    `Expect: 100-continue` is waiting, not sending: answered at once."""
    if not body_done and _has_body(scope) and _header(scope, b"expect") is None:
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > _DISCARD_MAX_BYTES:
            response.headers["connection"] = "close"
        else:
            dropped = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # gone: nobody to answer
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
                if dropped > _DISCARD_MAX_BYTES:
                    response.headers["connection"] = "close"
                    break
    await response(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length != b"0"
    return _header(scope, b"transfer-encoding") is not None


async def _key_store_refused(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    """503: the key store answered and refused the gateway (a configuration error that only an
    operator can fix; `TenantStore.authenticate`). Not 401: the caller's key may be fine."""
    await _answer_unread(error_response(503, "key_store_unavailable", message), scope, receive,
                         send)


async def _unauthorized(scope: Scope, receive: Receive, send: Send, *,
                        admin: bool = False) -> None:
    """One body for a missing, malformed, unknown, revoked or expired key: the answer must not
    tell which, nor echo any of what was sent."""
    response = error_response(
        401, "unauthorized",
        "Missing or invalid admin key: send `Authorization: Bearer <GATEWAY_ADMIN_KEY>`." if admin
        else "Missing or invalid client key: send `Authorization: Bearer <key>` with a key "
        "issued by POST /admin/keys or configured in GATEWAY_API_KEYS.",
        {"WWW-Authenticate": "Bearer"},
    )
    await _answer_unread(response, scope, receive, send)


async def _too_large(limit: int, scope: Scope, receive: Receive, send: Send, *,
                     body_done: bool = False) -> None:
    """413, before the body is read (Content-Length over the limit) or partway through it."""
    response = error_response(
        413, "payload_too_large",
        f"Request body exceeds {limit} bytes (GATEWAY_MAX_BODY_BYTES); split the input into "
        "several requests.",
    )
    await _answer_unread(response, scope, receive, send, body_done=body_done)
