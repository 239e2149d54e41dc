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
from tests.support.waits import Deadline

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
            deadline = Deadline(timeout_s)
            while httpx.get(f"http://127.0.0.1:{port}{ready_path}").status_code != 200:
                if deadline.expired():
                    raise TimeoutError(f"{ready_path} not 200 after {deadline.describe()}")
                time.sleep(0.05)
    except Exception:
        process.kill()
        raise RuntimeError(f"{args} did not start; its log:\n{log.read_text()}") from None
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    terminate(process, grace_s=10)


def wait_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float, why: str) -> None:
    """Poll `url` until it answers 200; raise `RuntimeError(why)` if the process exits first or
    the time runs out. For servers not of this repository (Infinity, KServe's model server),
    whose start-up is an import of torch or onnxruntime and a model load."""
    deadline = Deadline(timeout_s)
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or deadline.expired():
            raise RuntimeError(why)
        time.sleep(0.2)
