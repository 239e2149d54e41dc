"""What a shadow model costs the caller: the same sequential requests (concurrency 1, cache misses,
Redis on) through a gateway whose task has no shadow, a healthy shadow, a shadow that is down
(connection refused), and a shadow ten times slower than the task's model; p50/p99 of each, and
the comparisons made and dropped. Prints JSON.

Expected: the four latencies within noise of each other, since comparisons run after the answer
is sent and are shed beyond GATEWAY_SHADOW_MAX_PENDING.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.harness import emit, fake_upstream, metric_sum, process, redis, summary_ms
from tests.support.redis_server import free_port


@contextlib.contextmanager
def gateway(primary: str, shadow: str | None, redis_url: str) -> Iterator[str]:
    task: dict[str, Any] = {"upstream": "primary", "model": "ft:v3"}
    upstreams = {"primary": {"base_url": primary}}
    if shadow is not None:
        upstreams["shadow"] = {"base_url": shadow}
        task["shadow"] = {"model": "ft:v4", "upstream": "shadow", "sample": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks.yaml"
        tasks.write_text(yaml.safe_dump({"upstreams": upstreams, "tasks": {"bench": task}}))
        port = free_port()
        env = {"GATEWAY_TASKS_FILE": str(tasks), "GATEWAY_PORT": str(port),
               "GATEWAY_REDIS_URL": redis_url, "GATEWAY_LOG_LEVEL": "warning",
               "GATEWAY_SHUTDOWN_DELAY_S": "0", "GATEWAY_RETRY_ATTEMPTS": "1"}
        with process(["-m", "service.cli", "serve"], port, env, ready_path="/readyz"):
            yield f"http://127.0.0.1:{port}"


def run(url: str, tag: str, n: int) -> list[float]:
    samples = []
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            started = time.perf_counter()
            r = client.post(f"{url}/classify", json={"task": "bench", "input": [f"{tag} {i}"]})
            samples.append(time.perf_counter() - started)
            r.raise_for_status()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--delay-ms", type=float, default=5.0,
                        help="the task model's latency; the slow shadow's is ten times that")
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    dead = f"http://127.0.0.1:{free_port()}"
    with redis() as redis_url, fake_upstream(delay) as primary, \
            fake_upstream(delay) as healthy, fake_upstream(delay * 10) as slow:
        for name, shadow in (("no_shadow", None), ("shadow", healthy), ("shadow_down", dead),
                             ("shadow_10x_slower", slow)):
            with gateway(primary, shadow, redis_url) as url:
                run(url, f"warm {name}", 50)
                samples = run(url, name, args.requests)
                time.sleep(delay * 20)  # let the last comparisons land
                metrics = httpx.get(f"{url}/metrics").text
            emit({"bench": "shadow", "case": name, "requests": args.requests,
                  "primary_delay_ms": args.delay_ms, **summary_ms(samples),
                  "compared": metric_sum(metrics, "gateway_shadow_comparisons_total"),
                  "dropped": metric_sum(metrics, "gateway_shadow_dropped_total")})


if __name__ == "__main__":
    main()
