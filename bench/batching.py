"""Micro-batching on and off: 64 concurrent clients each sending single items of unique text through
the gateway to an upstream that costs a fixed time per call (like a model forward pass). Reports
upstream calls and throughput for both. Prints JSON.

Target (gateway issue): >= 10x fewer upstream calls with batching on.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time

import aiohttp
import httpx

from bench.harness import emit, fake_upstream, gateway, metric_sum


async def load(url: str, clients: int, seconds: float, tag: str) -> dict[str, float]:
    counter = itertools.count()
    done = 0
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors
        while time.monotonic() < stop_at:
            body = {"task": "sentiment", "input": f"{tag} unique text {next(counter)}"}
            async with session.post(f"{url}/classify", json=body) as response:
                await response.read()
                if response.status == 200:
                    done += 1
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*[client(session) for _ in range(clients)])
        elapsed = time.monotonic() - started
    return {"requests": done, "errors": errors, "rps": round(done / elapsed, 1)}


def run(upstream_url: str, batching: bool, clients: int, seconds: float) -> dict[str, float]:
    with gateway(upstream_url, GATEWAY_BATCHING=str(batching).lower()) as url:
        result = asyncio.run(load(url, clients, seconds, f"batching={batching}"))
        metrics = httpx.get(f"{url}/metrics").text
    calls = metric_sum(metrics, "gateway_upstream_requests_total")
    result["upstream_calls"] = calls
    result["items_per_upstream_call"] = round(result["requests"] / max(calls, 1), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--upstream-delay-ms", type=float, default=10.0)
    args = parser.parse_args()
    with fake_upstream(args.upstream_delay_ms / 1000) as upstream_url:
        off = run(upstream_url, False, args.clients, args.seconds)
        on = run(upstream_url, True, args.clients, args.seconds)
    emit({
        "bench": "batching",
        "clients": args.clients,
        "upstream_cost_per_call_ms": args.upstream_delay_ms,
        "batching_off": off,
        "batching_on": on,
        "upstream_calls_per_1000_items": {
            "off": round(1000 * off["upstream_calls"] / max(off["requests"], 1), 1),
            "on": round(1000 * on["upstream_calls"] / max(on["requests"], 1), 1),
        },
        "reduction": round((off["upstream_calls"] / max(off["requests"], 1))
                           / max(on["upstream_calls"] / max(on["requests"], 1), 1e-9), 1),
        "target_reduction": 10,
    })


if __name__ == "__main__":
    main()
