"""The gateway's uvicorn server, with a shutdown that loses no request that reached its socket.

On SIGTERM the gateway first reports not-ready (`/readyz` 503) while still serving for
`shutdown_delay_s`, so that load balancers stop sending before the listener closes. Then, where
uvicorn would close the listening socket (resetting every connection queued in its backlog) and
close every connection that has not sent a request yet, this server:

1. stops new connections at the kernel: a socket filter on the listening socket drops bare SYNs
   (`refuse_new_connections`), so a client that connects now retries its SYN and then finds the port
   closed (connection refused: it knows nothing was sent), while handshakes already under way finish
   (`HANDSHAKE_SETTLE_S`);
2. accepts every connection queued in the backlog and serves it like any other;
3. closes the listening socket, and asks each connection to shut down: one without a request yet gets
   `connections.SHUTDOWN_GRACE_S` to send it, a request being read or handled is answered, each with
   `Connection: close` (connections.py);
4. waits for connections and requests (up to `drain_timeout_s`), then runs the lifespan shutdown,
   which drains the batcher and closes clients.

SIGINT (Ctrl-C) skips the delay.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import signal
import socket
import struct
import sys
import time
from types import FrameType

import uvicorn

from service.gateway.connections import GatewayHttpProtocol
from service.gateway.runtime import Lifecycle
from service.gateway.settings import Settings

log = logging.getLogger("service.gateway")

# After the SYN filter is attached, handshakes whose SYN got through complete within one round trip:
# microseconds on loopback, well under 50 ms inside a data centre.
HANDSHAKE_SETTLE_S = 0.05
_SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>
# Classic BPF: load the TCP flags byte (offset 13 of the TCP header), keep the packet if ACK is set,
# drop it otherwise: a bare SYN is the only packet to a listening socket without ACK.
_DROP_BARE_SYNS = [(0x30, 0, 0, 13), (0x45, 0, 1, 0x10), (0x06, 0, 0, 0xFFFFFFFF), (0x06, 0, 0, 0)]


def refuse_new_connections(sock: socket.socket) -> bool:
    """Attach a filter that drops new connection attempts (bare SYNs) to a listening TCP socket,
    leaving its backlog and the handshakes under way alone. False where that is not possible (not
    Linux, not TCP): the caller then closes the listener with the small race that implies."""
    if not sys.platform.startswith("linux") or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    program = ctypes.create_string_buffer(
        b"".join(struct.pack("HBBI", *instruction) for instruction in _DROP_BARE_SYNS))
    fprog = struct.pack("HL", len(_DROP_BARE_SYNS), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_delay_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.shutdown_delay_s = shutdown_delay_s
        self._exit_at: float | None = None
        self._listeners: list[socket.socket] = []

    @classmethod
    def for_app(cls, app: object, settings: Settings, lifecycle: Lifecycle,
                **config: object) -> GatewayServer:
        """The server the `serve` command runs: uvloop, the gateway's HTTP protocol with the
        connection limits of `settings`, no access log."""
        protocol = GatewayHttpProtocol.configured(
            head_timeout_s=settings.head_timeout_s, body_timeout_s=settings.body_timeout_s,
            max_open_connections=settings.max_open_connections)
        options: dict[str, object] = {
            "host": settings.host, "port": settings.port, "log_level": settings.log_level,
            "loop": "uvloop", "http": protocol, "access_log": False,
            "timeout_graceful_shutdown": math.ceil(settings.drain_timeout_s), **config}
        return cls(uvicorn.Config(app, **options),  # type: ignore[arg-type]
                   lifecycle, settings.shutdown_delay_s)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._exit_at is None and self.shutdown_delay_s > 0:
            self.lifecycle.draining = True
            self._exit_at = time.monotonic() + self.shutdown_delay_s
            return
        self.lifecycle.draining = True
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._exit_at is not None and time.monotonic() >= self._exit_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind the listening socket here and hand uvicorn a duplicate, so that closing uvicorn's
        server leaves the socket (and its backlog) open for `shutdown` to drain."""
        config = self.config
        if sockets is None and config.fd is None and config.uds is None:
            self._listeners = [config.bind_socket()]
            sockets = [sock.dup() for sock in self._listeners]
        await super().startup(sockets=sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if not self._listeners:
            await super().shutdown(sockets)
            return
        log.info("shutting down: accepting what is queued, then finishing every request")
        refused = [refuse_new_connections(sock) for sock in self._listeners]
        if any(refused):
            await asyncio.sleep(HANDSHAKE_SETTLE_S)
        for server in self.servers:
            server.close()
        accepted = 0
        for sock in self._listeners:
            accepted += await self._accept_backlog(sock)
            sock.close()
        for sock in sockets or []:
            sock.close()
        if accepted:
            log.info("accepted %d queued connection(s) during shutdown", accepted)
        await self._finish()

    async def _accept_backlog(self, sock: socket.socket) -> int:
        """Accept every connection waiting in `sock`'s backlog and serve it."""
        loop = asyncio.get_running_loop()
        config = self.config
        sock.setblocking(False)
        count = 0
        while True:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return count
            except OSError:  # e.g. EMFILE: nothing more can be accepted; the rest are lost
                log.exception("accepting a queued connection during shutdown failed")
                return count
            count += 1

            def protocol() -> asyncio.Protocol:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=self.server_state,
                    app_state=self.lifespan.state, _loop=loop)

            try:
                await loop.connect_accepted_socket(protocol, conn)
            except OSError:  # the client is gone already
                conn.close()

    async def _finish(self) -> None:
        """uvicorn's own shutdown from "request shutdown on all connections" on."""
        for connection in list(self.server_state.connections):
            connection.shutdown()
        await asyncio.sleep(0.1)
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                await self._wait_tasks_to_complete()
        except TimeoutError:
            log.error("cancelling %d running request(s): GATEWAY_DRAIN_TIMEOUT_S passed",
                      len(self.server_state.tasks))
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()


__all__ = ["GatewayServer", "refuse_new_connections"]
