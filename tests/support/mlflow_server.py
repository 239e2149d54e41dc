"""A real `mlflow server` on a loopback port, with its own SQLite store and artifact folder.

Start-up is mostly MLflow creating its SQLite schema (its Alembic migrations): a few seconds on a
quiet machine, 30 s and more on two loaded cores, hence the stretched wait. The job-execution
worker (huey) that MLflow 3 starts beside the server is turned off: nothing here uses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import wait_ready
from tests.support.redis_server import free_port, terminate


@contextmanager
def mlflow_server(directory: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1; yields its URL once `/health` answers."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = directory / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
             "--artifacts-destination", str(directory / "artifacts")],
            cwd=directory, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/health", timeout_s=60,
                   why=f"mlflow server did not start; its log:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        terminate(process, grace_s=10)
