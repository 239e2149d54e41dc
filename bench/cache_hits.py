"""Throughput of `/classify` when every item is cached, next to a minimal FastAPI endpoint doing one
Redis GET (bench/minimal_redis_app.py): same uvicorn settings (uvloop, httptools, one worker, no
access log), same run, same load tool (wrk). Prints JSON.

Target (gateway issue): the gateway reaches >= 80% of the baseline's requests per second.

`--tree PATH` (repeatable): also run the gateway of another checkout (a worktree at an earlier
commit) in the same interleaved rounds, so that a change's before and after are measured side by
side. Each gateway's CPU per request (from /proc, over its rounds) is reported too: on a shared
machine it moves less than requests per second.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from redis import Redis

from bench.harness import GATEWAY_PIDS, cpu_seconds, emit, fake_upstream, gateway, process, redis
from tests.support.redis_server import free_port

BODY = {"task": "sentiment", "input": "this product is great"}


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{orjson.dumps(BODY).decode()}]]\n"
        )
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
             url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {"rps": rps, "requests": requests, "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
            "p50_ms": float(p50.group(1)) * scale[p50.group(2)] if p50 else -1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another checkout whose gateway runs alongside (repeatable)")
    args = parser.parse_args()
    port = free_port()
    with fake_upstream() as upstream_url, redis() as redis_url, contextlib.ExitStack() as stack, \
            gateway(upstream_url, redis_url) as gateway_url, \
            process(["-m", "uvicorn", "bench.minimal_redis_app:app", "--port", str(port),
                     "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                     "--log-level", "warning"], port, {"BENCH_REDIS_URL": redis_url},
                    ready_path="/readyz"):
        first = httpx.post(f"{gateway_url}/classify", json=BODY)
        first.raise_for_status()
        Redis.from_url(redis_url).set("bench:value", orjson.dumps(first.json()["results"][0]))
        time.sleep(0.3)
        if httpx.post(f"{gateway_url}/classify", json=BODY).headers["x-cache"] != "hit":
            raise SystemExit("the gateway did not cache the bench item; is Redis reachable?")
        targets = {"gateway": f"{gateway_url}/classify",
                   "baseline": f"http://127.0.0.1:{port}/classify"}
        for tree in args.tree:
            other = stack.enter_context(gateway(upstream_url, redis_url, tree=tree.resolve()))
            if httpx.post(f"{other}/classify", json=BODY).headers["x-cache"] != "hit":
                raise SystemExit(f"the gateway of {tree} did not answer from the cache")
            targets[f"gateway_at_{tree.name}"] = f"{other}/classify"
        for url in targets.values():
            wrk(url, 2, args.connections)  # warm-up
        # Interleaved rounds, so that load from elsewhere on the machine hits both sides alike.
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        cpu_us: dict[str, list[float]] = {name: [] for name in targets if name != "baseline"}
        for _ in range(args.rounds):
            for name, url in targets.items():
                pid = GATEWAY_PIDS.get(url.removesuffix("/classify"))
                before = cpu_seconds(pid) if pid is not None else 0.0
                runs[name].append(wrk(url, args.seconds, args.connections))
                if pid is not None:
                    cpu_us[name].append(round((cpu_seconds(pid) - before) * 1e6
                                              / runs[name][-1]["requests"], 1))
    best = {name: max(results, key=lambda r: r["rps"]) for name, results in runs.items()}
    emit({
        "bench": "cache_hits",
        "load": f"wrk -t1 -c{args.connections} -d{args.seconds}s, POST one cached item, "
                f"{args.rounds} interleaved rounds, best of each",
        "gateway": best["gateway"],
        "baseline_fastapi_one_redis_get": best["baseline"],
        "ratio": round(best["gateway"]["rps"] / best["baseline"]["rps"], 3),
        **{name: {"tree": str(tree), **best[name],
                  "ratio": round(best[name]["rps"] / best["baseline"]["rps"], 3)}
           for tree in args.tree for name in [f"gateway_at_{tree.name}"]},
        "all_rounds_rps": {name: [r["rps"] for r in results] for name, results in runs.items()},
        "gateway_cpu_us_per_request": {name: sorted(v) for name, v in cpu_us.items()},
        "target_ratio": 0.8,
    })


if __name__ == "__main__":
    main()
