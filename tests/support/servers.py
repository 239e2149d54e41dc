"""Real uvicorn servers on loopback ports, run in a background thread for the length of a test."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from tests.support.redis_server import free_port
from tests.support.waits import Deadline


class ThreadedServer:
    def __init__(self, app: Any, port: int | None = None, *,
                 server: uvicorn.Server | None = None, **config: Any) -> None:
        """`server`: a ready-made server (the gateway's own, say) to run instead of a plain
        uvicorn.Server over `app`, `port` and `config`."""
        if server is not None:
            self.port = server.config.port
            self.config = server.config
            self.server = server
        else:
            self.port = port or free_port()
            self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                         **{"log_level": "warning", "lifespan": "on", **config})
            self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedServer:
        self.thread.start()
        # Start-up runs the app's lifespan (the factory lists its store, say): stretched with the
        # load like every wait of the suite. A fixed 15 s failed a clean CI run at load ~8.
        deadline = Deadline(15)
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start-up; see the log above")
            if deadline.expired():
                raise TimeoutError(f"server did not start within {deadline.budget_s:.0f} s "
                                   "(15 s stretched by the load)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def serve(app: Any, port: int | None = None, **config: Any) -> Iterator[ThreadedServer]:
    server = ThreadedServer(app, port, **config).start()
    try:
        yield server
    finally:
        server.stop()
