"""What the quota check adds to a request, side by side on one gateway: the same cached item (and,
separately, fresh items the upstream answers) sent with a GATEWAY_API_KEYS key (no quota: no
Redis call) and with an issued key whose key and tenant quotas are all set, far above the load
(identity from the local cache, one Lua call over six buckets, usage counted). Sequential
requests, interleaved one for one, so that load from elsewhere on the machine hits both alike.
Prints JSON.

Target (issue 21): the quota check adds at most 0.15 ms at p50 to a cache hit.

`--tree PATH`: the same two keys also against a gateway run from another checkout (a worktree at
an earlier commit) on the same Redis and upstream, all four sides interleaved: a change's before
and after in one run.

`--replicas-seconds T`: instead, three gateway processes on one Redis, a key with
`items_per_minute: 300`, one-item requests spread over the three for T seconds: the items accepted
against what the bucket allows (300 + 300*T/60), which must stay within [0.95, 1] (+1 item).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from pathlib import Path

import httpx

from bench.harness import emit, fake_upstream, gateway, percentile, redis

ADMIN = "bench-admin-" + uuid.uuid4().hex
STATIC = "bench-static-" + uuid.uuid4().hex
HIGH = {"requests_per_second": 1_000_000, "items_per_minute": 100_000_000,
        "items_per_day": 10_000_000_000}


def timed(client: httpx.Client, url: str, key: str, text: str) -> float:
    started = time.perf_counter()
    answer = client.post(url, json={"task": "sentiment", "input": text},
                         headers={"Authorization": f"Bearer {key}"})
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        raise SystemExit(f"HTTP {answer.status_code}: {answer.text[:200]}")
    return elapsed


async def _spread(urls: list[str], key: str, seconds: float) -> tuple[int, int, float]:
    accepted = refused = 0
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        async def worker(n: int) -> None:
            nonlocal accepted, refused
            while time.monotonic() - started < seconds:
                answer = await client.post(f"{urls[n % len(urls)]}/classify",
                                           headers={"Authorization": f"Bearer {key}"},
                                           json={"task": "sentiment", "input": f"x{n}"})
                if answer.status_code == 200:
                    accepted += 1
                elif answer.status_code == 429:
                    refused += 1
                else:
                    raise SystemExit(f"HTTP {answer.status_code}: {answer.text[:200]}")
                n += len(urls)
        await asyncio.gather(*(worker(n) for n in range(9)))
    return accepted, refused, time.monotonic() - started


def replicas(seconds: float) -> None:
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    shared = {"GATEWAY_ADMIN_KEY": ADMIN, "GATEWAY_CACHE_PREFIX": prefix}
    with fake_upstream() as upstream_url, redis() as redis_url, contextlib.ExitStack() as stack:
        urls = [stack.enter_context(gateway(upstream_url, redis_url, env=shared)) for _ in range(3)]
        created = httpx.post(f"{urls[0]}/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                             json={"tenant": "bench", "name": "bench",
                                   "quotas": {"items_per_minute": 300}})
        created.raise_for_status()
        accepted, refused, elapsed = asyncio.run(_spread(urls, created.json()["key"], seconds))
    allowed = 300 + 300 * elapsed / 60
    emit({"bench": "quota_replicas", "replicas": 3, "items_per_minute": 300,
          "load": f"9 concurrent clients, one-item requests round-robin over 3 gateway "
                  f"processes for {seconds} s",
          "seconds": round(elapsed, 3), "accepted": accepted, "refused": refused,
          "allowed": round(allowed, 1), "accepted_over_allowed": round(accepted / allowed, 4),
          "target": "0.95 <= ratio, accepted <= allowed + 1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="per side and kind")
    parser.add_argument("--buckets", choices=("six", "one", "none"), default="six",
                        help="six: every quota of the key and its tenant; one: the key's "
                             "items_per_minute only; none: an issued key without quotas (the "
                             "identity's cost alone, no Redis call)")
    parser.add_argument("--replicas-seconds", type=float, metavar="T",
                        help="measure accepted vs allowed under three replicas for T s instead")
    parser.add_argument("--tree", type=Path,
                        help="another checkout whose gateway is measured alongside")
    args = parser.parse_args()
    if args.replicas_seconds:
        replicas(args.replicas_seconds)
        return
    quotas = {"six": HIGH, "one": {"items_per_minute": HIGH["items_per_minute"]},
              "none": {}}[args.buckets]
    trees = {"": None} if args.tree is None else {"": None, "at_tree_": args.tree.resolve()}
    with fake_upstream() as upstream_url, redis() as redis_url, contextlib.ExitStack() as stack, \
            httpx.Client() as client:
        keys: dict[str, tuple[str, str]] = {}  # side -> (url, key)
        for tag, tree in trees.items():
            more = {} if tree is None else {"tree": tree,
                                            "GATEWAY_CACHE_PREFIX": "bench-tree"}
            url = stack.enter_context(gateway(upstream_url, redis_url, GATEWAY_ADMIN_KEY=ADMIN,
                                              GATEWAY_API_KEYS=STATIC, **more))
            admin = {"Authorization": f"Bearer {ADMIN}"}
            tenant = f"bench{tag.strip('_')}"
            if args.buckets == "six":
                client.put(f"{url}/admin/tenants/{tenant}", headers=admin,
                           json={"quotas": HIGH}).raise_for_status()
            created = client.post(f"{url}/admin/keys", headers=admin,
                                  json={"tenant": tenant, "name": "bench", "quotas": quotas})
            created.raise_for_status()
            keys[f"{tag}quotas_off"] = (url, STATIC)
            keys[f"{tag}quotas_on"] = (url, created.json()["key"])
        for url, key in keys.values():  # cache the item in both tenants' scopes, warm up
            for _ in range(200):
                timed(client, f"{url}/classify", key, "this product is great")
        hits: dict[str, list[float]] = {name: [] for name in keys}
        misses: dict[str, list[float]] = {name: [] for name in keys}
        for _ in range(args.requests):
            for name, (url, key) in keys.items():
                hits[name].append(timed(client, f"{url}/classify", key, "this product is great"))
                misses[name].append(timed(client, f"{url}/classify", key, uuid.uuid4().hex))
    p50 = {kind: {name: round(percentile(samples, 50) * 1000, 3) for name, samples in runs.items()}
           for kind, runs in (("hit", hits), ("miss", misses))}
    emit({
        "bench": "quota",
        "load": f"{args.requests} sequential requests per side and kind, interleaved, one item",
        "buckets": {"six": 6, "one": 1, "none": 0}[args.buckets],
        "p50_ms": p50,
        "added_p50_ms": {kind: round(v["quotas_on"] - v["quotas_off"], 3)
                         for kind, v in p50.items()},
        **({"tree": str(args.tree),
            "added_p50_ms_at_tree": {kind: round(v["at_tree_quotas_on"]
                                                 - v["at_tree_quotas_off"], 3)
                                     for kind, v in p50.items()}}
           if args.tree is not None else {}),
        "target_added_p50_ms_on_hits": 0.15,
    })


if __name__ == "__main__":
    main()
