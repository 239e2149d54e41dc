"""Real processes of the product (`python -m service.cli ...`) for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from tests.support.redis_server import terminate, wait_for_port

REPO = Path(__file__).resolve().parents[2]


def spawn(args: list[str], *, env: Mapping[str, str] | None = None, port: int,
          log: Path, ready_path: str | None = "/healthz", timeout_s: float = 30.0,
          ) -> subprocess.Popen[bytes]:
    """Start `python <args>` in the repository root; wait until it answers on `port`."""
    full_env = {**os.environ, **(env or {})}
    handle = log.open("wb")
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=handle,
                               stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout_s)
        if ready_path:
            deadline = time.monotonic() + timeout_s
            while httpx.get(f"http://127.0.0.1:{port}{ready_path}").status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ready_path} not 200 after {timeout_s}s")
                time.sleep(0.05)
    except Exception:
        process.kill()
        raise RuntimeError(f"{args} did not start; its log:\n{log.read_text()}") from None
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    terminate(process, grace_s=10)
