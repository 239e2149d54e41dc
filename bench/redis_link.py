"""Does RedisLink earn its place next to redis-py? Per-call wall time and CPU of a cache lookup.

Against a private redis-server on loopback, on a uvloop loop like the gateway's, sequentially
(concurrency 1, the case where a miss pays the lookup in full):

- redis-py `mget`, as the cache calls it today (with and without the cache's `asyncio.timeout`);
- redis-py pipeline `SET key value EX ttl` + `MGET` (held writes riding along with a lookup);
- RedisLink `MGET`, and `SET` + `MGET` in one `execute`.

Then throughput with `--concurrency` tasks (default 32) doing MGETs: redis-py (its pool opens a
connection per task) against RedisLink (one connection, pipelined). Rounds interleave the clients so
that load from elsewhere on the machine hits them alike; wall figures are the median over all calls,
CPU is `time.process_time` of this process (not Redis's) divided by the calls. Prints one JSON object.

    python -m bench.redis_link [--calls 5000] [--rounds 5] [--keys 1] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bench.harness import emit, percentile, redis
from service.gateway.redis_link import RedisLink

TIMEOUT_S = 0.1  # the gateway's default GATEWAY_REDIS_SOCKET_TIMEOUT_S
Call = Callable[[], Awaitable[Any]]


def redis_py(url: str) -> Redis:
    """Configured as service/gateway/cache.py configures it."""
    return Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                          retry=Retry(NoBackoff(), 0))


async def sequential(call: Call, calls: int) -> tuple[list[float], float]:
    """Per-call wall seconds, and CPU seconds per call."""
    samples = []
    cpu_started = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples, (time.process_time() - cpu_started) / calls


async def concurrent(call: Call, tasks: int, seconds: float) -> tuple[float, float]:
    """Calls per second with `tasks` workers, and CPU seconds per call."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    cpu_started, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return done / elapsed, cpu / done


def us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    keys = [f"bench:key:{i}" for i in range(args.keys)]
    value = b"x" * 120  # about one cached classification result
    client = redis_py(url)
    link = RedisLink.from_url(url, timeout_s=TIMEOUT_S)
    await client.set(keys[0], value)

    async def py_mget() -> Any:
        return await client.mget(keys)

    async def py_mget_timeout() -> Any:
        async with asyncio.timeout(TIMEOUT_S):
            return await client.mget(keys)

    async def py_set_mget() -> Any:
        pipe = client.pipeline(transaction=False)
        pipe.set("bench:written", value, ex=60)
        pipe.mget(keys)
        return (await pipe.execute())[-1]

    mget_command = ("MGET", *keys)
    set_command = ("SET", "bench:written", value, "EX", 60)

    async def link_mget() -> Any:
        return (await link.execute(mget_command))[0]

    async def link_set_mget() -> Any:
        return (await link.execute(set_command, mget_command))[-1]

    cases: dict[str, Call] = {
        "redis_py_mget": py_mget,
        "redis_py_mget_in_asyncio_timeout": py_mget_timeout,
        "redis_py_pipeline_set_mget": py_set_mget,
        "redis_link_mget": link_mget,
        "redis_link_set_mget": link_set_mget,
    }
    for call in cases.values():  # the same answer from every client, and warm connections
        assert await call() == [value] + [None] * (args.keys - 1)
        await sequential(call, 500)

    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.rounds):
        order = list(cases.items())
        for name, call in order if round_ % 2 == 0 else reversed(order):
            samples, cpu = await sequential(call, args.calls)
            walls[name] += samples
            cpus[name].append(cpu)

    throughput_cases: dict[str, Call] = {"redis_py_mget": py_mget, "redis_link_mget": link_mget}
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in throughput_cases}
    for call in throughput_cases.values():
        await concurrent(call, args.concurrency, 0.5)  # warm-up: redis-py fills its pool here
    for round_ in range(args.rounds):
        order = list(throughput_cases.items())
        for name, call in order if round_ % 2 == 0 else reversed(order):
            rates[name].append(await concurrent(call, args.concurrency, args.seconds))
    connections = len(await client.client_list())  # redis-py's pool, plus the link's one

    await client.aclose()
    await link.aclose()
    sequential_result = {
        name: {"wall_p50_us": us(percentile(walls[name], 50)),
               "wall_p99_us": us(percentile(walls[name], 99)),
               "cpu_per_call_us": us(statistics.median(cpus[name]))}
        for name in cases
    }
    throughput = {
        name: {"calls_per_s": round(max(rate for rate, _ in runs)),
               "cpu_per_call_us": us(min(cpu for _, cpu in runs))}
        for name, runs in rates.items()
    }
    return {
        "bench": "redis_link",
        "loop": "uvloop",
        "keys_per_mget": args.keys,
        "sequential": {"calls_per_round": args.calls, "rounds": args.rounds,
                       **sequential_result},
        "concurrent": {"tasks": args.concurrency, "seconds_per_round": args.seconds,
                       "best_of_rounds": args.rounds, **throughput,
                       "server_connections_after": connections},
        "link_vs_redis_py": {
            "mget_cpu_ratio": round(sequential_result["redis_link_mget"]["cpu_per_call_us"]
                                    / sequential_result["redis_py_mget"]["cpu_per_call_us"], 2),
            "set_mget_cpu_ratio": round(
                sequential_result["redis_link_set_mget"]["cpu_per_call_us"]
                / sequential_result["redis_py_pipeline_set_mget"]["cpu_per_call_us"], 2),
            "concurrent_throughput_ratio": round(throughput["redis_link_mget"]["calls_per_s"]
                                                 / throughput["redis_py_mget"]["calls_per_s"], 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=1, help="keys per MGET")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    with redis() as url:
        emit(uvloop.run(run(url, args)))


if __name__ == "__main__":
    main()
