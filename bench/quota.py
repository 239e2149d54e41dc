"""What the quota check adds to a request, side by side on one gateway: the same cached item (and,
separately, fresh items the upstream answers) sent with a GATEWAY_API_KEYS key (no quota: no
Redis call) and with an issued key whose key and tenant quotas are all set, far above the load
(identity from the local cache, one Lua call over six buckets, usage counted). Sequential
requests, interleaved one for one, so that load from elsewhere on the machine hits both alike.
Prints JSON.

Target (issue 21): the quota check adds at most 0.15 ms at p50 to a cache hit.
"""

from __future__ import annotations

import argparse
import time
import uuid

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="per side and kind")
    parser.add_argument("--buckets", choices=("six", "one", "none"), default="six",
                        help="six: every quota of the key and its tenant; one: the key's "
                             "items_per_minute only; none: an issued key without quotas (the "
                             "identity's cost alone, no Redis call)")
    args = parser.parse_args()
    quotas = {"six": HIGH, "one": {"items_per_minute": HIGH["items_per_minute"]},
              "none": {}}[args.buckets]
    with fake_upstream() as upstream_url, redis() as redis_url, \
            gateway(upstream_url, redis_url, GATEWAY_ADMIN_KEY=ADMIN,
                    GATEWAY_API_KEYS=STATIC) as url, httpx.Client() as client:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        if args.buckets == "six":
            client.put(f"{url}/admin/tenants/bench", headers=admin,
                       json={"quotas": HIGH}).raise_for_status()
        created = client.post(f"{url}/admin/keys", headers=admin,
                              json={"tenant": "bench", "name": "bench", "quotas": quotas})
        created.raise_for_status()
        keys = {"quotas_off": STATIC, "quotas_on": created.json()["key"]}
        endpoint = f"{url}/classify"
        for key in keys.values():  # cache the item in both tenants' scopes, warm up
            for _ in range(200):
                timed(client, endpoint, key, "this product is great")
        hits: dict[str, list[float]] = {name: [] for name in keys}
        misses: dict[str, list[float]] = {name: [] for name in keys}
        for _ in range(args.requests):
            for name, key in keys.items():
                hits[name].append(timed(client, endpoint, key, "this product is great"))
                misses[name].append(timed(client, endpoint, key, uuid.uuid4().hex))
    p50 = {kind: {name: round(percentile(samples, 50) * 1000, 3) for name, samples in runs.items()}
           for kind, runs in (("hit", hits), ("miss", misses))}
    emit({
        "bench": "quota",
        "load": f"{args.requests} sequential requests per side and kind, interleaved, one item",
        "buckets": {"six": 6, "one": 1, "none": 0}[args.buckets],
        "p50_ms": p50,
        "added_p50_ms": {kind: round(v["quotas_on"] - v["quotas_off"], 3)
                         for kind, v in p50.items()},
        "target_added_p50_ms_on_hits": 0.15,
    })


if __name__ == "__main__":
    main()
