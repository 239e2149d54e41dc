"""Added latency of the gateway on cache misses: the same request sequence, concurrency 1, sent
directly to a fast upstream and through the gateway (with Redis, every input unique). Prints JSON.

Target (gateway issue): <= 1 ms added at p50.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import httpx

from bench.harness import emit, fake_upstream, gateway, percentile, redis, summary_ms


def timed(client: httpx.Client, url: str, bodies: list[dict[str, Any]]) -> list[float]:
    samples = []
    for body in bodies:
        started = time.perf_counter()
        response = client.post(url, json=body)
        samples.append(time.perf_counter() - started)
        response.raise_for_status()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis-client", choices=["link", "redis-py"], default="link",
                        help="GATEWAY_REDIS_CLIENT of the gateway under test")
    args = parser.parse_args()
    n = args.requests
    with fake_upstream() as upstream_url, redis() as redis_url, \
            gateway(upstream_url, redis_url, GATEWAY_REDIS_CLIENT=args.redis_client) as gateway_url, \
            httpx.Client(timeout=10) as client:
        warm = [{"model": "ft:bench", "input": [f"warm {i}"]} for i in range(200)]
        timed(client, f"{upstream_url}/v1/classifications", warm)
        timed(client, f"{gateway_url}/classify",
              [{"task": "sentiment", "input": [f"warm gw {i}"]} for i in range(200)])
        direct, through = [], []
        # Interleave in blocks so that machine noise hits both sides alike.
        for block in range(10):
            ids = range(block * n // 10, (block + 1) * n // 10)
            direct += timed(client, f"{upstream_url}/v1/classifications",
                            [{"model": "ft:bench", "input": [f"direct {i}"]} for i in ids])
            through += timed(client, f"{gateway_url}/classify",
                             [{"task": "sentiment", "input": [f"gateway {i}"]} for i in ids])
    emit({
        "bench": "overhead",
        "requests": n,
        "concurrency": 1,
        "redis_client": args.redis_client,
        "direct": summary_ms(direct),
        "gateway": summary_ms(through),
        "added_p50_ms": round((percentile(through, 50) - percentile(direct, 50)) * 1000, 3),
        "added_p99_ms": round((percentile(through, 99) - percentile(direct, 99)) * 1000, 3),
        "target_added_p50_ms": 1.0,
    })


if __name__ == "__main__":
    main()
