"""Shared pieces of the benches: real processes on loopback ports, percentiles, one JSON line out."""

from __future__ import annotations

import asyncio
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
#: url -> pid of each gateway `gateway()` started and still runs (for CPU readings).
GATEWAY_PIDS: dict[str, int] = {}


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
            ready_path: str | None = None, tree: Path = REPO) -> Iterator[subprocess.Popen[bytes]]:
    """`tree`: the checkout whose code runs (another commit's worktree, to compare side by side)."""
    more = {"PYTHONPATH": str(tree)} if tree != REPO else {}
    proc = subprocess.Popen([sys.executable, *args], cwd=tree,
                            env={**os.environ, **(env or {}), **more},
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
            env: Mapping[str, str] | None = None, tree: Path = REPO,
            **more_env: str) -> Iterator[str]:
    """`task`: more settings of the task `sentiment` (a prediction log, say); `env` and
    `more_env`: the gateway's environment (GATEWAY_*, OTEL_*); `tree`: the checkout whose
    gateway runs (default this one)."""
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
        url = f"http://127.0.0.1:{port}"
        with process(["-m", "service.cli", "serve"], port, settings, ready_path="/readyz",
                     tree=tree) as proc:
            GATEWAY_PIDS[url] = proc.pid
            try:
                yield url
            finally:
                GATEWAY_PIDS.pop(url, None)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_sum(metrics_text: str, name: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def latencies(client: httpx.Client, url: str, tag: str, n: int,
              headers: Mapping[str, str] | None = None) -> list[float]:
    """Seconds per request, `n` sequential `sentiment` requests of unique inputs (`tag` i)."""
    samples = []
    for i in range(n):
        started = time.perf_counter()
        client.post(url, json={"task": "sentiment", "input": [f"{tag} {i}"]},
                    headers=headers).raise_for_status()
        samples.append(time.perf_counter() - started)
    return samples


async def throughput(url: str, tag: str, n: int, concurrency: int,
                     headers: Mapping[str, str] | None = None) -> float:
    """Requests per second, `n` requests of unique inputs from `concurrency` clients at once."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as client:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                r = await client.post(url, json={"task": "sentiment", "input": [f"{tag} {i}"]})
                r.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


def rotating_blocks(client: httpx.Client, urls: Mapping[str, str], requests: int, blocks: int,
                    concurrency: int, headers: Mapping[str, str] | None = None,
                    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Latency samples (a tenth of each block, concurrency 1) and per-block throughput of each
    gateway in `urls` on `/classify`, after a warm-up. The settings take turns in `blocks`, each
    block starting with another one, so that machine noise (and going first) hits them alike."""
    per_block = requests // blocks
    for name, url in urls.items():  # warm up each gateway and its connections
        latencies(client, f"{url}/classify", f"warm {name}", 100, headers)
    lat: dict[str, list[float]] = {name: [] for name in urls}
    rps: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    for block in range(blocks):
        for name in names[block % len(names):] + names[:block % len(names)]:
            url, tag = urls[name], f"{name} {block}"
            lat[name] += latencies(client, f"{url}/classify", f"lat {tag}", per_block // 10,
                                   headers)
            rps[name].append(asyncio.run(throughput(f"{url}/classify", f"rps {tag}",
                                                    per_block, concurrency, headers)))
    return lat, rps
