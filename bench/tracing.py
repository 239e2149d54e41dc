"""What tracing costs: the same traffic through a gateway with tracing off, on at 10 % sampling
(`parentbased_traceidratio`, 0.1) and on at 100 %, exporting to a real OTLP/HTTP receiver
(tests/support/otlp_receiver.py). Every input is unique and there is no Redis, so each request
goes the whole way: front door, single flight, batcher, upstream attempt. Prints JSON.

Measured per setting: p50 and p99 at concurrency 1, and throughput at `--concurrency`. The
settings take turns in blocks, so that machine noise hits them alike.

Target (issue 22): 10 % sampling costs at most 5 % of throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx

from bench.harness import emit, fake_upstream, gateway, percentile, rotating_blocks, summary_ms
from tests.support.otlp_receiver import running_receiver

SETTINGS: dict[str, dict[str, str]] = {
    "off": {},
    "10%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    "100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}


@contextlib.contextmanager
def gateways(upstream_url: str, endpoint: str) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, env in SETTINGS.items():
            traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
                      **env} if env else {"OTEL_SDK_DISABLED": "true"}
            urls[name] = stack.enter_context(gateway(upstream_url, "", env=traced))
        yield urls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000,
                        help="per setting, for throughput (a tenth for latency)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    with running_receiver() as receiver, fake_upstream() as upstream_url, \
            gateways(upstream_url, receiver.endpoint) as urls, httpx.Client(timeout=10) as client:
        lat, rps = rotating_blocks(client, urls, args.requests, args.blocks, args.concurrency)
        time.sleep(0.5)  # the last spans' export
        spans = len(receiver.snapshot())
    base = sum(rps["off"]) / len(rps["off"])
    out: dict[str, Any] = {"bench": "tracing", "requests": args.requests,
                           "concurrency": args.concurrency, "spans_received": spans}
    for name in urls:
        mean = sum(rps[name]) / len(rps[name])
        out[name] = {"latency": summary_ms(lat[name]), "throughput_rps": round(mean, 1),
                     "throughput_vs_off": round(mean / base, 3),
                     "added_p50_ms": round((percentile(lat[name], 50)
                                            - percentile(lat["off"], 50)) * 1000, 3)}
    out["target_10pct_throughput_vs_off"] = 0.95
    emit(out)


if __name__ == "__main__":
    main()
