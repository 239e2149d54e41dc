"""`serve` and `factory` stop the same way: told to stop (Ctrl-C, SIGTERM), a server that shuts
down cleanly exits 0. The factory used to exit 143 on SIGTERM (uvicorn re-raised the signal into
Python's default handling), and `serve` 130 on Ctrl-C; supervisors and scripts read those as
failures."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.processes import spawn
from tests.support.redis_server import free_port


@pytest.mark.parametrize(("command", "sig"), [
    # The two that failed; the factory's SIGINT already gave 0, the gateway's SIGTERM is
    # tests/e2e/test_gateway_process.py (drain, then 0).
    ("factory", signal.SIGTERM),
    ("serve", signal.SIGINT),
])
def test_a_server_told_to_stop_exits_0(tmp_path: Path, command: str, sig: signal.Signals) -> None:
    port = free_port()
    options = (["--data-dir", str(tmp_path / "data")] if command == "factory"
               else ["--tasks", str(tmp_path / "tasks.yaml"), "--redis-url", ""])
    log = tmp_path / f"{command}.log"
    process = spawn(["-m", "service.cli", command, "--port", str(port), *options], port=port,
                    log=log, ready_path="/healthz")
    process.send_signal(sig)
    assert process.wait(30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
