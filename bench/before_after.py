"""A hot-path change, before and after, in one run: the same traffic through two gateways on one
Redis and one upstream, one running this checkout's code, the other the code of `--before` (a
copy of the tree before the change, e.g. `git archive COMMIT | tar -x -C /tmp/before`). Prints
JSON: p50 and p99 at concurrency 1 and throughput at `--concurrency`, in rotating blocks so that
machine noise hits both alike.

Why a separate tree and not a setting: a change that has no switch (where drift counts live,
say) can only be compared with the code before it, and two runs minutes apart on a shared
machine differ by more than the change. Unique inputs with `Cache-Control: no-cache` send every
request to the upstream, as bench/prediction_log.py does.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import httpx

from bench.harness import (
    REPO,
    emit,
    fake_upstream,
    gateway,
    percentile,
    redis,
    rotating_blocks,
    summary_ms,
)

NO_CACHE = {"cache-control": "no-cache"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True,
                        help="a copy of the source tree before the change (its service/ is run)")
    parser.add_argument("--requests", type=int, default=2000,
                        help="per gateway, for throughput (a tenth for latency)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    before = args.before.resolve()
    if not (before / "service" / "cli.py").is_file():
        parser.error(f"--before {before}: no service/cli.py there; give a copy of the tree")
    trees = {"before": before, "after": REPO}
    with fake_upstream() as upstream_url, redis() as redis_url, contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(gateway(upstream_url, redis_url, tree=tree))
                for name, tree in trees.items()}
        with httpx.Client(timeout=10) as client:
            lat, rps = rotating_blocks(client, urls, args.requests, args.blocks,
                                       args.concurrency, NO_CACHE)
            # Which code each one ran, as it says itself (a check that the trees differ).
            scopes = {name: client.get(f"{url}/tasks/sentiment/stats").json().get("scope")
                      for name, url in urls.items()}
    base = sum(rps["before"]) / len(rps["before"])
    out: dict[str, object] = {"bench": "before_after", "before_tree": str(before),
                              "requests": args.requests, "concurrency": args.concurrency}
    for name in urls:
        mean = sum(rps[name]) / len(rps[name])
        out[name] = {"latency": summary_ms(lat[name]), "throughput_rps": round(mean, 1),
                     "throughput_blocks_rps": [round(r, 1) for r in rps[name]],
                     "throughput_vs_before": round(mean / base, 3),
                     "stats_scope": scopes[name]}
    out["added_p50_ms"] = round((percentile(lat["after"], 50)
                                 - percentile(lat["before"], 50)) * 1000, 3)
    emit(out)


if __name__ == "__main__":
    main()
