"""The gateway's uvicorn server, with Kubernetes-friendly shutdown.

On SIGTERM the gateway first reports not-ready (`/readyz` 503) while still serving for
`shutdown_delay_s`, so that load balancers stop sending before the listener closes; then uvicorn stops
accepting, lets in-flight requests finish (up to `drain_timeout_s`), and the lifespan drains the
batcher and closes clients. SIGINT (Ctrl-C) skips the delay.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import uvicorn

from service.gateway.runtime import Lifecycle


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_delay_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.shutdown_delay_s = shutdown_delay_s
        self._exit_at: float | None = None

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
