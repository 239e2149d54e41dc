"""The gateway under faults, end to end on loopback: a real gateway process (`classifier-gateway
serve`, default settings), a real Redis, and the fake upstream in its own process with random faults
set over its `/_faults` endpoint. Prints one JSON object:

- `flaky`: success rate of `--requests` cache-miss requests (concurrency 32) while 30% of upstream
  calls answer 500 at random, and whether the circuit ever opened (target: >= 99%, never);
- `dead`: under steady load, the time from the upstream failing every call to the circuit opening
  (target: < 1 s), the latency of misses answered 503 + Retry-After while it is open (target: < 50
  ms), and the time from the upstream's return to the first 200 (target: < GATEWAY_CIRCUIT_RESET_S
  + 2 s);
- `sigterm`: requests lost over `--sigterms` SIGTERMs under load from clients that open a new
  connection per request (tests/support/shutdown_load.py; target: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.harness import REPO, emit, fake_upstream, gateway, metric_sum, percentile, redis
from tests.support.redis_server import free_port, wait_for_port
from tests.support.shutdown_load import Tally, load_until_exit

CONCURRENCY = 32
RESET_S = 5.0  # GATEWAY_CIRCUIT_RESET_S's default


async def set_faults(client: httpx.AsyncClient, upstream: str, rate: float) -> None:
    (await client.post(f"{upstream}/_faults", json={"fault_rate": rate})).raise_for_status()


async def flaky(upstream: str, gateway_url: str, requests: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        await set_faults(client, upstream, 0.3)
        statuses: dict[int, int] = {}
        queue = list(range(requests))

        async def worker() -> None:
            while queue:
                i = queue.pop()
                r = await client.post(f"{gateway_url}/classify",
                                      json={"task": "sentiment", "input": f"flaky {i}"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        metrics = (await client.get(f"{gateway_url}/metrics")).text
        await set_faults(client, upstream, 0.0)
    fast_fails = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                     if line.startswith("gateway_upstream_requests_total")
                     and 'status="circuit_open"' in line)
    return {"requests": requests, "upstream_error_rate": 0.3,
            "success_rate": round(statuses.get(200, 0) / requests, 4), "statuses": statuses,
            "circuit_opened": fast_fails > 0, "req_per_s": round(requests / elapsed),
            "upstream_retries": metric_sum(metrics, "gateway_upstream_retries_total"),
            "retries_throttled": metric_sum(metrics,
                                            "gateway_upstream_retries_throttled_total")}


async def dead(upstream: str, gateway_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        stop = False
        sequence = 0

        async def background() -> None:  # steady load, all misses
            nonlocal sequence
            while not stop:
                sequence += 1
                await client.post(f"{gateway_url}/classify",
                                  json={"task": "sentiment", "input": f"steady {sequence}"})

        async def circuit_open() -> bool:
            body = (await client.get(f"{gateway_url}/readyz")).json()
            return bool(body["circuits_open"])

        load = [asyncio.create_task(background()) for _ in range(CONCURRENCY // 2)]
        await asyncio.sleep(1.0)
        await set_faults(client, upstream, 1.0)
        failing_since = time.monotonic()
        while not await circuit_open():
            if time.monotonic() - failing_since > 30:
                raise RuntimeError("the circuit did not open within 30 s of the upstream failing")
            await asyncio.sleep(0.005)
        time_to_open = time.monotonic() - failing_since
        stop = True
        await asyncio.gather(*load)
        latencies, retry_after = [], set()
        for i in range(200):  # misses while open: fail fast
            sent = time.perf_counter()
            r = await client.post(f"{gateway_url}/classify",
                                  json={"task": "sentiment", "input": f"open {i}"})
            latencies.append(time.perf_counter() - sent)
            if r.status_code != 503:
                break
            retry_after.add(r.headers.get("retry-after"))
        fail_fast_ms = [s * 1000 for s in latencies]
        await set_faults(client, upstream, 0.0)
        back = time.monotonic()
        while True:
            r = await client.post(f"{gateway_url}/classify",
                                  json={"task": "sentiment", "input": f"back {time.monotonic()}"})
            if r.status_code == 200:
                break
            await asyncio.sleep(0.02)
        recovery = time.monotonic() - back
    return {"time_to_open_s": round(time_to_open, 3), "target_time_to_open_s": 1.0,
            "fail_fast_p50_ms": round(percentile(fail_fast_ms, 50), 2),
            "fail_fast_p99_ms": round(percentile(fail_fast_ms, 99), 2),
            "fail_fast_retry_after": sorted(v for v in retry_after if v is not None),
            "target_fail_fast_ms": 50,
            "recovery_s": round(recovery, 3), "target_recovery_s": RESET_S + 2.0}


@contextlib.contextmanager
def tasks_file(upstream: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tasks.yaml"
        path.write_text(yaml.safe_dump({
            "upstreams": {"fake": {"base_url": upstream}},
            "tasks": {"sentiment": {"upstream": "fake", "model": "ft:bench", "kind": "text"}}}))
        yield path


def sigterms(upstream: str, redis_url: str, rounds: int) -> dict[str, Any]:
    total = Tally()
    with tasks_file(upstream) as tasks:
        for round_ in range(rounds):
            port = free_port()
            env = {**os.environ, "GATEWAY_TASKS_FILE": str(tasks), "GATEWAY_PORT": str(port),
                   "GATEWAY_REDIS_URL": redis_url, "GATEWAY_LOG_LEVEL": "warning",
                   "GATEWAY_SHUTDOWN_DELAY_S": "0.5"}
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for_port(port, 30)
                total.add(asyncio.run(load_until_exit(port, proc, clients=CONCURRENCY,
                                                      sigterm_after_s=1.0, tag=f"r{round_}")))
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
    return {"sigterms": rounds, "answered": total.answered, "refused": total.refused,
            "lost": total.lost, "target_lost": 0, "statuses": total.statuses,
            "lost_reasons": total.reasons[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--sigterms", type=int, default=20)
    args = parser.parse_args()
    result: dict[str, Any] = {"bench": "faults"}
    with fake_upstream() as upstream, redis() as redis_url:
        with gateway(upstream, redis_url) as gateway_url:
            result["flaky"] = asyncio.run(flaky(upstream, gateway_url, args.requests))
        with gateway(upstream, redis_url) as gateway_url:
            result["dead"] = asyncio.run(dead(upstream, gateway_url))
        result["sigterm"] = sigterms(upstream, redis_url, args.sigterms)
    emit(result)


if __name__ == "__main__":
    main()
