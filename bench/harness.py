"""Shared pieces of the benches: real processes on loopback ports, percentiles, one JSON line out."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.redis_server import free_port, start_redis, wait_for_port

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def emit(result: Mapping[str, Any]) -> None:
    print(json.dumps(result, indent=None, sort_keys=False))


@contextlib.contextmanager
def process(args: list[str], port: int, env: Mapping[str, str] | None = None,
            ready_path: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30)
        if ready_path:
            deadline = time.monotonic() + 30
            while httpx.get(f"http://127.0.0.1:{port}{ready_path}").status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError(ready_path)
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def fake_upstream(delay_s: float = 0.0) -> Iterator[str]:
    port = free_port()
    with process(["-m", "tests.support.fake_upstream", "--port", str(port),
                  "--delay-s", str(delay_s)], port):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def redis() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp))
        try:
            yield server.url
        finally:
            server.stop()


@contextlib.contextmanager
def gateway(upstream_url: str, redis_url: str = "", *, task: Mapping[str, Any] | None = None,
            env: Mapping[str, str] | None = None, **more_env: str) -> Iterator[str]:
    """`task`: more settings of the task `sentiment` (a prediction log, say); `env` and
    `more_env`: the gateway's environment (GATEWAY_*, OTEL_*)."""
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks.yaml"
        tasks.write_text(yaml.safe_dump({
            "upstreams": {"fake": {"base_url": upstream_url}},
            "tasks": {"sentiment": {"upstream": "fake", "model": "ft:bench", "kind": "text",
                                    **(task or {})}},
        }))
        port = free_port()
        settings = {"GATEWAY_TASKS_FILE": str(tasks), "GATEWAY_PORT": str(port),
                    "GATEWAY_REDIS_URL": redis_url, "GATEWAY_LOG_LEVEL": "warning",
                    "GATEWAY_SHUTDOWN_DELAY_S": "0", **(env or {}), **more_env}
        with process(["-m", "service.cli", "serve"], port, settings, ready_path="/readyz"):
            yield f"http://127.0.0.1:{port}"


def metric_sum(metrics_text: str, name: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total
