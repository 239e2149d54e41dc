"""The gateway's HTTP/1.1 connections: uvicorn's httptools protocol, with the limits it lacks.

uvicorn bounds nothing a client controls before the app runs: a connection that sends half a head,
or a body one byte a minute, stays open for ever (the keep-alive timer is cancelled by any byte),
and nothing bounds how many such connections are open. `GatewayHttpProtocol` adds, per connection:

- a **head timeout** (`GATEWAY_HEAD_TIMEOUT_S`): from the connection's start, or the first byte of
  a later request, to the end of its headers. Measured from the start, not reset by each byte, so
  a client dripping a byte a second cannot keep it alive. Expired with part of a head received:
  `408` and close; with nothing received: close (there is no request to answer).
- a **body timeout** (`GATEWAY_BODY_TIMEOUT_S`): from the end of the headers to the end of the body.
  Expired: `408` and close if the app has not started its answer, else close; the app sees a
  disconnect.
- a **bound on open connections** (`GATEWAY_MAX_OPEN_CONNECTIONS`). At the bound a new connection
  evicts the connection that has waited longest for its client (idle keep-alive, or still sending its
  head or body), so slow clients cannot starve new ones: they are the oldest waiters. When every
  connection has a request in the app, the new one is answered `503` + `Retry-After` and closed.
- a **lingering close**: an answer sent before the body was read to its end (a 413 past the 64 MiB
  the front door reads and drops, a 401) with `Connection: close` used to close the socket while
  the client was still sending. The kernel then resets the connection and drops what it had not
  sent, the answer included: the client saw a reset. Now the answer goes out, then a FIN, and what
  the client still sends is dropped unparsed until it closes, within what is left of its body
  timeout; the client, done sending, reads its answer.
- a **graceful shutdown** (`shutdown()`): a connection with no request yet (new, or idle between
  keep-alive requests) gets `SHUTDOWN_GRACE_S` to send one, which is answered with
  `Connection: close`; a request being read or handled is finished, then the connection closes.

The server side of shutdown (the listening socket) is in server.py.

`HttpToolsProtocol` is uvicorn's internal class, not its public API, and pyproject asks for
uvicorn>=0.30. We chose a test over an upper bound: tests/unit/test_uvicorn_seam.py names every
hook this class overrides (with its arguments) and every attribute it reads, and fails by name when
a uvicorn release moves one. An upper bound would hold back every release, those that leave these
internals alone too, while the lock in requirements/ already pins the exact version tested
(0.55.0); the test says what to re-read when `make lock` lifts it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar, Literal

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# A connection accepted during shutdown has usually sent its request already (a client writes it
# right after connect); 1 s covers a client on another continent (~0.3 s RTT) with room to spare,
# and bounds how long an idle keep-alive connection can hold the shutdown up.
SHUTDOWN_GRACE_S = 1.0

Phase = Literal["head", "body", "busy", "idle"]


class GatewayHttpProtocol(HttpToolsProtocol):
    """httptools-based HTTP/1.1 with head/body timeouts, a connection bound and a graceful
    shutdown. Configure a subclass with `configured(...)`; uvicorn builds one per connection."""

    head_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 30.0
    max_open_connections: ClassVar[int] = 1024

    @classmethod
    def configured(cls, *, head_timeout_s: float, body_timeout_s: float,
                   max_open_connections: int) -> type[GatewayHttpProtocol]:
        return type("GatewayHttpProtocol", (cls,), {
            "head_timeout_s": head_timeout_s, "body_timeout_s": body_timeout_s,
            "max_open_connections": max_open_connections, "__doc__": cls.__doc__})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: Phase = "head"
        self._since = 0.0  # when the current wait for the client began
        self._head_bytes = False  # part of a head has arrived in the current "head" phase
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # the server is shutting down: answer with Connection: close
        self._refuse = False  # over the connection bound with nobody to evict: answer 503
        self._lingering = False  # answered and closing; the rest of the client's body is dropped

    # -- connection life --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = time.monotonic()
        self._arm(self.head_timeout_s)
        if len(self.connections) > self.max_open_connections:
            victim = self._oldest_waiter()
            if victim is None:
                self._refuse = True
            else:
                victim._give_up("too many open connections")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a body already answered: dropped, unparsed
        super().data_received(data)
        if self._phase == "body" and self._timer is None and not self.transport.is_closing():
            self._arm(self.body_timeout_s)

    def shutdown(self) -> None:
        """Called by the server on shutdown (see the module docstring)."""
        self._closing = True
        if self._lingering:
            self.transport.close()
        elif self._phase == "idle" or (self._phase == "head" and not self._head_bytes):
            self._disarm()
            self._phase, self._since = "head", time.monotonic()
            self._arm(SHUTDOWN_GRACE_S)
        elif self._phase in ("body", "busy"):
            self.cycle.keep_alive = False
        # "head" with bytes received: its head timer runs on; the request gets Connection: close.

    # -- parser callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase == "idle":  # the first byte of a keep-alive connection's next request
            self._phase, self._since = "head", time.monotonic()
            self._arm(self.head_timeout_s)
        self._head_bytes = True

    def on_headers_complete(self) -> None:
        self._disarm()
        self._phase, self._since, self._head_bytes = "body", time.monotonic(), False
        if self._refuse:
            self.app = _too_many_connections
        super().on_headers_complete()
        if self._closing or self._refuse:
            self.cycle.keep_alive = False
        # The cycle closes the connection after an answer with `Connection: close`: lingering.
        self.cycle.transport = _CloseLingers(self)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase != "body":
            return
        self._disarm()
        self._since = time.monotonic()
        if not self.cycle.response_complete:
            self._phase = "busy"
            return
        # Answered before its body was read (401, 413): now idle, and no timer watches it (any
        # byte cancelled uvicorn's keep-alive timer), so close it or re-arm that timer here.
        self._phase = "idle"
        if self._closing or not self.cycle.keep_alive:
            self.transport.close()
        else:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._lingering:  # no keep-alive wait: the body timer bounds the linger
            self._unset_keepalive_if_required()
            return
        if self._phase == "busy" and (self.cycle is None or self.cycle.response_complete):
            self._phase, self._since = "idle", time.monotonic()
        # "body": answered before the body was read (401, 413); the body timer still bounds it.

    def close_after_answer(self) -> None:
        """Close after an answer with `Connection: close`: at once when the request was read to
        its end, else lingering (see the module docstring)."""
        transport = self.transport
        if self._phase != "body" or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        transport.write_eof()  # the answer, then FIN, once the write buffer has gone out
        self.flow.resume_reading()
        if self._timer is None:
            self._arm(self.body_timeout_s)

    # -- timers and eviction ---------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        what = "its request head" if self._phase == "head" else "its request body"
        limit = self.head_timeout_s if self._phase == "head" else self.body_timeout_s
        self._give_up(f"the client took over {limit:g} s to send {what}")

    def _give_up(self, why: str) -> None:
        """Close this connection, answering 408 when a request is half read and unanswered."""
        if self.transport.is_closing():
            return
        self._disarm()
        half_read = (self._phase == "head" and self._head_bytes) or (
            self._phase == "body" and not self.cycle.response_started)
        if half_read:
            self._write_error(408, "request_timeout",
                              f"Closed: {why}. Send the whole request promptly; the limits are "
                              "GATEWAY_HEAD_TIMEOUT_S and GATEWAY_BODY_TIMEOUT_S.")
        if self._phase == "body":
            cycle = self.cycle
            cycle.disconnected = True  # the app's receive() now reports a disconnect
            cycle.message_event.set()
        self.transport.close()

    def _oldest_waiter(self) -> GatewayHttpProtocol | None:
        """The connection that has waited longest for its client (idle, head or body phase)."""
        oldest: GatewayHttpProtocol | None = None
        for connection in self.connections:
            if (connection is self or not isinstance(connection, GatewayHttpProtocol)
                    or connection._phase == "busy" or connection.transport.is_closing()):
                continue
            if (connection._phase == "body" and connection.cycle.response_started
                    and not connection._lingering):
                continue
            if oldest is None or connection._since < oldest._since:
                oldest = connection
        return oldest

    def _write_error(self, status: int, error_type: str, message: str) -> None:
        body = orjson.dumps({"error": {"type": error_type, "message": message}})
        self.transport.write(b"".join([
            STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            b"connection: close\r\n\r\n", body]))


class _CloseLingers:
    """The transport as a request's cycle sees it, whose `close()` is the protocol's
    `close_after_answer()`; everything else is the transport's own."""

    def __init__(self, protocol: GatewayHttpProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def close(self) -> None:
        self._protocol.close_after_answer()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    """The app for a request on a connection over GATEWAY_MAX_OPEN_CONNECTIONS."""
    body = orjson.dumps({"error": {
        "type": "too_many_connections",
        "message": "The gateway holds its maximum of open connections "
                   "(GATEWAY_MAX_OPEN_CONNECTIONS), all busy; retry shortly or add replicas."}})
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
