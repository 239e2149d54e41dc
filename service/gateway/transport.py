"""PooledTransport: a lean HTTP/1.1 keep-alive transport behind httpx's API, on asyncio + httptools.

Why not httpx's own transport or `httpx-aiohttp`: on a cache miss the upstream call is the largest
share of the gateway's CPU, and most of it is client machinery, not the exchange. `bench/
upstream_transport.py` (figures in docs/performance.md) measured plain httpx at a few hundred requests/s against
a fast upstream, httpx on aiohttp's transport at about half of plain aiohttp, and this transport
ahead of both. It keeps httpx's API: `httpx.Request` in, `httpx.Response` out, httpx's exception
types, so the client code and its tests (`httpx.MockTransport`) do not depend on it.

Scope, on purpose just what a JSON API upstream needs:
- HTTP/1.1 over TCP or TLS; a pool of keep-alive connections per origin, at most
  `limits.max_connections` open at once (callers wait for a slot up to the `pool` timeout), idle ones
  kept up to `limits.keepalive_expiry` seconds and dropped as soon as the server closes them;
- the request goes out in one write; a streamed body is collected and sent chunked;
- the response body is read whole before the Response is returned (Content-Length, chunked, or
  until the server closes), up to `max_response_bytes`;
- a request that fails on a reused idle connection before any byte of the answer arrived is sent
  again once, on a new connection: the server closed the connection as it was reused (the
  keep-alive race), which says nothing about the upstream's health. Requests must therefore be
  idempotent, as classification is;
- not supported: proxies, HTTP/2, upgrades, `Expect: 100-continue`.
Timeouts follow httpx's `timeout` extension: `connect`, `read` (no byte for that long), `pool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque

import certifi
import httptools
import httpx

Origin = tuple[bytes, bytes, int]  # scheme, host, port
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20,
                              keepalive_expiry=5.0)
_NO_BODY_STATUS = frozenset({204, 304})


class _Exchange:
    """What one request is waiting for on a connection."""

    __slots__ = (
        "body",
        "future",
        "head",
        "headers",
        "last_data_at",
        "reason",
        "received",
        "size",
        "status",
        "until_close",
    )

    def __init__(self, future: asyncio.Future[None], head: bool) -> None:
        self.future = future
        self.head = head  # a HEAD request: no body follows the headers, whatever they announce
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.until_close = False  # neither Content-Length nor chunked: the body ends at close
        self.received = False  # any byte of the answer arrived
        self.last_data_at = 0.0


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; at most one exchange at a time (no pipelining)."""

    def __init__(self, pool: PooledTransport, origin: Origin, max_response_bytes: int) -> None:
        self._pool = pool
        self.origin = origin
        self._max_response_bytes = max_response_bytes
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self.counted = False  # holds one of the pool's slots, given back in connection_lost

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        exchange.received = True
        exchange.last_data_at = time.monotonic()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError(
                "the upstream switched protocols, which this transport does not support"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what our callback raised, wrapped by httptools
            if isinstance(cause, _BodyTooLarge):
                message = f"the upstream's response body exceeds {self._max_response_bytes} bytes"
            elif isinstance(cause, _StrayResponse):
                message = "the upstream sent more than one response to one request"
            else:
                message = f"malformed HTTP response from the upstream: {exc}"
            self._fail(httpx.RemoteProtocolError(message))

    def eof_received(self) -> bool | None:
        self.closed = True
        return None  # let asyncio close the transport; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None and not exchange.future.done():
            if exchange.until_close and exchange.status and exc is None:
                exchange.future.set_result(None)  # a body delimited by the (clean) close itself
            elif exchange.received:
                exchange.future.set_exception(httpx.RemoteProtocolError(
                    "the upstream closed the connection in the middle of its response"))
            else:
                exchange.future.set_exception(_NothingReceived(
                    f"the upstream closed the connection without answering ({exc or 'EOF'})"))
        self._pool._connection_closed(self)

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.future.done():  # bytes beyond the one answer asked for
            raise _StrayResponse

    def on_status(self, reason: bytes) -> None:
        assert self.exchange is not None
        self.exchange.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.exchange is not None
        self.exchange.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.status = self._parser.get_status_code()
        if exchange.head and exchange.status >= 200:
            # The parser cannot know that no body follows; stop here and do not reuse the
            # connection, whose parser state now expects one.
            self.reusable = False
            exchange.future.set_result(None)
            return
        if exchange.status >= 200 and exchange.status not in _NO_BODY_STATUS:
            names = {name.lower() for name, _ in exchange.headers}
            exchange.until_close = (b"content-length" not in names
                                    and b"transfer-encoding" not in names)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        assert exchange is not None
        exchange.size += len(body)
        if exchange.size > self._max_response_bytes:
            raise _BodyTooLarge
        exchange.body.append(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        if exchange.future.done():
            return
        if exchange.status < 200:  # an interim 1xx answer: the real one follows
            exchange.status, exchange.reason, exchange.headers = 0, b"", []
            return
        self.reusable = self._parser.should_keep_alive()
        exchange.future.set_result(None)

    # -- used by the pool ------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.future.done():
            exchange.future.set_exception(exc)
        self.close(abort=True)

    def close(self, *, abort: bool = False) -> None:
        """`abort` for a connection in an unknown state: no flushing of what is buffered (a peer
        that stopped reading would hold the pool's slot for ever), the slot comes back at once."""
        self.reusable = False
        if self.transport is not None:
            if abort:
                self.transport.abort()
            elif not self.transport.is_closing():
                self.transport.close()

    def usable(self, now: float, expiry: float | None) -> bool:
        return (not self.closed and self.reusable
                and (expiry is None or now - self.idle_since < expiry))


class _BodyTooLarge(Exception):
    pass


class _StrayResponse(Exception):
    pass


class _NothingReceived(httpx.ReadError):
    """The connection ended before any byte of the answer: safe to send again on another one."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class PooledTransport(httpx.AsyncBaseTransport):
    """The pool is strictly first come, first served: a released connection, or a freed slot, goes
    to the oldest waiting request, never to one that arrives meanwhile, so a busy caller cannot
    starve the others. A slot is freed the moment the pool decides to drop a connection (not when
    the socket finally closes: a TLS peer may take its time)."""

    def __init__(self, *, limits: httpx.Limits = DEFAULT_LIMITS,
                 ssl_context: ssl.SSLContext | None = None,
                 max_response_bytes: int = 64 * 1024 * 1024) -> None:
        self._max_connections = limits.max_connections or 2**31
        self._max_idle = (limits.max_keepalive_connections
                          if limits.max_keepalive_connections is not None else self._max_connections)
        self._expiry = limits.keepalive_expiry
        self._ssl_context = ssl_context
        self._max_response_bytes = max_response_bytes
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # slots taken: connections counted, being opened, or handed to a waiter
        # A waiter's future gets a connection to its origin, or None: a slot to open one with.
        self._waiters: deque[tuple[Origin, asyncio.Future[_Connection | None]]] = deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}",
                                            request=request)
        origin: Origin = (scheme, url.raw_host, url.port or (443 if scheme == b"https" else 80))
        payload = await _serialize(request)
        pool_deadline = _deadline(timeouts.get("pool"))
        for attempt in (1, 2):
            connection, reused = await self._acquire(origin, request, timeouts, pool_deadline,
                                                     fresh=attempt > 1)
            try:
                exchange = await self._exchange(connection, payload, timeouts.get("read"), request,
                                                head=request.method == "HEAD")
            except _NothingReceived as exc:
                self._discard(connection)
                if reused and attempt == 1:
                    continue  # the server closed the idle connection as we reused it
                raise httpx.ReadError(str(exc), request=request) from None
            except BaseException:
                self._discard(connection)  # mid-exchange: its state is unknown
                raise
            self._release(connection)
            # `content=` rather than a stream: the body is whole already, and a Response built
            # read costs half of what `aread()` through httpx's stream machinery does.
            return httpx.Response(
                exchange.status, headers=exchange.headers, content=b"".join(exchange.body),
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": exchange.reason.strip()},
                request=request,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(self, connection: _Connection, payload: list[bytes],
                        read_timeout: float | None, request: httpx.Request, *,
                        head: bool) -> _Exchange:
        loop = asyncio.get_running_loop()
        exchange = _Exchange(loop.create_future(), head)
        exchange.last_data_at = time.monotonic()
        connection.exchange = exchange
        transport = connection.transport
        assert transport is not None
        timer: asyncio.TimerHandle | None = None

        def check_read() -> None:
            nonlocal timer
            assert read_timeout is not None
            idle_for = time.monotonic() - exchange.last_data_at
            if idle_for < read_timeout:
                timer = loop.call_later(read_timeout - idle_for, check_read)
                return
            if not exchange.future.done():
                exchange.future.set_exception(httpx.ReadTimeout(
                    f"no data from the upstream for {read_timeout:g} s", request=request))

        if read_timeout is not None:
            timer = loop.call_later(read_timeout, check_read)
        try:
            transport.writelines(payload)
            await exchange.future
        except httpx.TransportError as exc:
            if exc._request is None:  # raised by the protocol, which does not know the request
                exc.request = request
            raise
        finally:
            if timer is not None:
                timer.cancel()
            connection.exchange = None
        return exchange

    # -- the pool --------------------------------------------------------------------------------
    async def _acquire(self, origin: Origin, request: httpx.Request,
                       timeouts: dict[str, float | None], pool_deadline: float | None, *,
                       fresh: bool) -> tuple[_Connection, bool]:
        """A connection to `origin` and whether it was reused; `fresh` wants a new one."""
        while True:
            if self._closed:
                raise httpx.ConnectError("the transport is closed", request=request)
            if not self._waiters:  # nobody is ahead of this request
                if not fresh:
                    idle = self._take_idle(origin)
                    if idle is not None:
                        return idle, True
                if self._open >= self._max_connections:
                    self._evict_idle()
                if self._open < self._max_connections:
                    self._open += 1
                    return await self._open_slot(origin, request, timeouts.get("connect")), False
            got = await self._wait_in_line(origin, request, pool_deadline)
            if self._closed:
                if got is None:
                    self._slot_freed()
                else:
                    self._discard(got)
                raise httpx.ConnectError("the transport is closed", request=request)
            if got is None:  # a slot of our own
                return await self._open_slot(origin, request, timeouts.get("connect")), False
            if not got.counted:  # lost on its way to us, and its slot went with it
                continue
            if fresh or not got.usable(time.monotonic(), None):  # handed over, never idle
                self._retire(got, keep_slot=True)
                return await self._open_slot(origin, request, timeouts.get("connect")), False
            return got, True

    async def _wait_in_line(self, origin: Origin, request: httpx.Request,
                            pool_deadline: float | None) -> _Connection | None:
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        entry = (origin, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout_at(_loop_time(pool_deadline)):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed over just as this request gave up: pass it on, or it is lost.
                got = waiter.result()
                if got is None:
                    self._slot_freed()
                else:
                    self._release(got)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(
                    f"no free connection among {self._max_connections} in time",
                    request=request) from None
            if isinstance(exc, httpx.TransportError) and exc._request is None:  # from aclose()
                exc.request = request
            raise

    async def _open_slot(self, origin: Origin, request: httpx.Request,
                         connect_timeout: float | None) -> _Connection:
        """Open a connection in a slot already taken; the slot is given back if that fails."""
        try:
            connection = await self._connect(origin, request, connect_timeout)
        except BaseException:
            self._slot_freed()
            raise
        if connection.closed:
            self._slot_freed()
            raise httpx.ConnectError("the upstream closed the connection as it opened",
                                     request=request)
        connection.counted = True
        return connection

    async def _connect(self, origin: Origin, request: httpx.Request,
                       connect_timeout: float | None) -> _Connection:
        scheme, host, port = origin
        hostname = host.decode("ascii")
        tls = None
        if scheme == b"https":
            tls = self._ssl_context or _default_ssl_context()
        loop = asyncio.get_running_loop()
        guard = asyncio.timeout(connect_timeout)
        try:
            async with guard:
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, origin, self._max_response_bytes),
                    hostname, port, ssl=tls, server_hostname=hostname if tls else None)
        except OSError as exc:  # TimeoutError included: ours (expired) or the kernel's
            if guard.expired():
                raise httpx.ConnectTimeout(f"connecting to {hostname}:{port} took over "
                                           f"{connect_timeout:g} s", request=request) from None
            raise httpx.ConnectError(f"cannot connect to {hostname}:{port}: {exc}",
                                     request=request) from None
        return connection

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now, self._expiry):
                return connection
            self._retire(connection)
        return None

    def _evict_idle(self) -> None:
        """The pool is full and nothing idle is ours: close the oldest idle connection of another
        origin, so that idle connections never block a request."""
        for idle in self._idle.values():
            if idle:
                self._retire(idle.pop(0))
                return

    def _release(self, connection: _Connection) -> None:
        """A connection done with its exchange: to the oldest waiter, or idle, or closed."""
        if self._closed or not connection.usable(time.monotonic(), None):
            self._discard(connection)
            return
        while self._waiters:
            origin, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            if origin == connection.origin:
                waiter.set_result(connection)
            else:  # the oldest waiter wants another origin: it gets this connection's slot
                self._retire(connection, keep_slot=True)
                waiter.set_result(None)
            return
        if sum(len(idle) for idle in self._idle.values()) >= self._max_idle:
            self._retire(connection)
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, []).append(connection)

    def _retire(self, connection: _Connection, *, keep_slot: bool = False) -> None:
        """Close a healthy connection the pool no longer wants; its slot is freed now (or kept by
        the caller, with `keep_slot`), not when the socket has finished closing."""
        counted, connection.counted = connection.counted, False
        connection.close()
        if counted and not keep_slot:
            self._slot_freed()

    def _discard(self, connection: _Connection) -> None:
        """Drop a connection in an unknown state: aborted, nothing flushed."""
        counted, connection.counted = connection.counted, False
        connection.close(abort=True)
        if counted:
            self._slot_freed()

    def _connection_closed(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        if connection.counted:
            connection.counted = False
            self._slot_freed()

    def _slot_freed(self) -> None:
        """A slot goes to the oldest waiter, whose open then takes it; else back to the pool."""
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    async def aclose(self) -> None:
        """Idle connections close now; waiting requests fail; requests in flight finish, and
        their connections close after them."""
        self._closed = True
        while self._waiters:  # first, so that the slots freed below are not handed to them
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(httpx.ConnectError("the transport is closed"))
        for idle in self._idle.values():
            for connection in list(idle):
                self._retire(connection)
            idle.clear()


async def _serialize(request: httpx.Request) -> list[bytes]:
    """Request line and headers, then the body: written together in one call."""
    try:
        body = request.content
    except httpx.RequestNotRead:
        body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    chunked = False
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding":  # chunked, when last of the codings
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    if chunked:
        return [head, b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n"] if body else [head, b"0\r\n\r\n"]
    return [head, body] if body else [head]


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _loop_time(deadline: float | None) -> float | None:
    """A `time.monotonic()` deadline on the running loop's clock (asyncio.timeout_at's)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


_ssl_context: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    """Verified TLS against certifi's CA bundle, as httpx does by default; built once."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context(cafile=certifi.where())
    return _ssl_context


__all__ = ["DEFAULT_LIMITS", "PooledTransport"]
