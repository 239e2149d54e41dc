"""What the sampled prediction log costs: the same unique-input traffic through three gateways on
one Redis: no log, a log at 1 % (`sample: 0.01`), and a log at 100 % whose queue is always full
(`GATEWAY_PREDICTIONS_MAX_QUEUE=1`: nearly every sampled entry is dropped and counted). Every
request goes to the upstream (no cache read: `Cache-Control: no-cache`). Prints JSON.

Measured per setting: p50 and p99 at concurrency 1, and throughput at `--concurrency`, in rotating
blocks so that machine noise hits the settings alike.

Target (issue 22): the log at 1 % costs at most 5 % of throughput; a full queue never slows answers.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from bench.harness import (
    emit,
    fake_upstream,
    gateway,
    metric_sum,
    percentile,
    redis,
    rotating_blocks,
    summary_ms,
)

SETTINGS: dict[str, tuple[dict[str, Any] | None, dict[str, str]]] = {
    "no log": (None, {}),
    "log 1%": ({"log": {"sample": 0.01}}, {}),
    "log 100%, full queue": ({"log": {"sample": 1.0}}, {"GATEWAY_PREDICTIONS_MAX_QUEUE": "1"}),
}
NO_CACHE = {"cache-control": "no-cache"}


@contextlib.contextmanager
def gateways(upstream_url: str, redis_url: str) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(gateway(upstream_url, redis_url, task=task, env=env))
               for name, (task, env) in SETTINGS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000,
                        help="per setting, for throughput (a tenth for latency)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    with fake_upstream() as upstream_url, redis() as redis_url, \
            gateways(upstream_url, redis_url) as urls, httpx.Client(timeout=10) as client:
        lat, rps = rotating_blocks(client, urls, args.requests, args.blocks, args.concurrency,
                                   NO_CACHE)
        counts = {name: {
            "logged": metric_sum(text, "gateway_predictions_logged_total"),
            "dropped": metric_sum(text, "gateway_predictions_dropped_total")}
            for name, text in ((n, client.get(f"{u}/metrics").text) for n, u in urls.items())}
    base = sum(rps["no log"]) / len(rps["no log"])
    out: dict[str, Any] = {"bench": "prediction_log", "requests": args.requests,
                           "concurrency": args.concurrency}
    for name in urls:
        mean = sum(rps[name]) / len(rps[name])
        out[name] = {"latency": summary_ms(lat[name]), "throughput_rps": round(mean, 1),
                     "throughput_vs_no_log": round(mean / base, 3),
                     "added_p50_ms": round((percentile(lat[name], 50)
                                            - percentile(lat["no log"], 50)) * 1000, 3),
                     "added_p99_ms": round((percentile(lat[name], 99)
                                            - percentile(lat["no log"], 99)) * 1000, 3),
                     **counts[name]}
    out["target_1pct_throughput_vs_no_log"] = 0.95
    emit(out)


if __name__ == "__main__":
    main()
