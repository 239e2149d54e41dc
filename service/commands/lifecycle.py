"""How `serve` and `factory` run their uvicorn server, and what they exit with.

One convention: a server told to stop (Ctrl-C, SIGTERM) that shut down cleanly exits 0, as a
supervisor (Kubernetes, compose, systemd) expects of a normal stop. uvicorn re-raises the signal
it stopped on once it is done (so that an embedding program sees it): SIGINT then surfaces as
KeyboardInterrupt, which the command line would turn into 130, and SIGTERM meets Python's default
handling, which kills the process (143). Both are taken here instead.
"""

from __future__ import annotations

import signal
from typing import Protocol


class _Runnable(Protocol):
    def run(self) -> None: ...


class _StopRequested(Exception):
    """SIGTERM, re-raised by uvicorn after its clean shutdown."""


def _stop_requested(signum: int, frame: object) -> None:
    raise _StopRequested


def run_until_stopped(server: _Runnable) -> int:
    """Run the server until it is told to stop; 0 once it has stopped."""
    previous = signal.signal(signal.SIGTERM, _stop_requested)
    try:
        server.run()
    except (KeyboardInterrupt, _StopRequested):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
