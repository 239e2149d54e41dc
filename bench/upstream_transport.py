"""Which HTTP client should the gateway use upstream? Throughput and latency of candidate clients.

A minimal Mistral-compatible upstream (a raw ASGI app on uvicorn + httptools + uvloop, answering a
fixed body) runs in its own process, so the client's event loop is not shared with the server. Each
client then runs `--concurrency` workers (default 32, the issue's "32 concurrent cache misses") that POST
one-item classification requests over pooled keep-alive connections for `--seconds`, after a short
warm-up, on a uvloop loop like the gateway's. Rounds alternate the order of the clients and the best
round of each is kept, because this machine's cores are shared with other work.

Prints one JSON object: per client, requests/s and p50/p99 latency in milliseconds.

    python bench/upstream_transport.py [--seconds 3] [--rounds 2] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

from service.gateway.protocols import Route

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULT = {"sentiment": {"scores": {"negative": 0.1, "neutral": 0.2, "positive": 0.7}}}
Post = Callable[[bytes], Awaitable[Any]]


# ------------------------------------------------------------------------------------------ upstream
async def upstream_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    request = orjson.loads(body)
    n = len(request["input"]) if isinstance(request["input"], list) else 1
    payload = orjson.dumps({"id": "0" * 32, "model": request["model"], "results": [RESULT] * n})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop", interface="asgi3", lifespan="off")


# ------------------------------------------------------------------------------------------- clients
@contextlib.asynccontextmanager
async def _httpx_like(module: Any, url: str, conc: int,
                      transport_class: Callable[..., Any] | None = None) -> Any:
    """An `AsyncClient` of httpx or httpx2, on its own pool or on `transport_class`."""
    limits = module.Limits(max_connections=conc * 2, max_keepalive_connections=conc * 2)
    options: dict[str, Any] = ({"limits": limits} if transport_class is None
                               else {"transport": transport_class(limits=limits)})
    async with module.AsyncClient(base_url=url, timeout=10, **options) as client:
        async def post(body: bytes) -> Any:
            response = await client.post("/v1/classifications", content=body,
                                         headers={"content-type": "application/json"})
            return orjson.loads(response.content)
        yield post


def httpx_default(url: str, conc: int) -> Any:
    import httpx

    return _httpx_like(httpx, url, conc)


def httpx_aiohttp(url: str, conc: int) -> Any:
    import httpx
    from httpx_aiohttp import AiohttpTransport

    return _httpx_like(httpx, url, conc, AiohttpTransport)


def httpx2_default(url: str, conc: int) -> Any:
    import httpx2

    return _httpx_like(httpx2, url, conc)


def httpx2_aiohttp(url: str, conc: int) -> Any:
    import httpx2
    from httpx_aiohttp.httpx2 import AiohttpTransport

    return _httpx_like(httpx2, url, conc, AiohttpTransport)


def httpx_pooled(url: str, conc: int) -> Any:
    import httpx

    from service.gateway.transport import PooledTransport

    return _httpx_like(httpx, url, conc, PooledTransport)


@contextlib.asynccontextmanager
async def aiohttp_plain(url: str, conc: int) -> Any:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=conc * 2)
    async with aiohttp.ClientSession(url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def post(body: bytes) -> Any:
            async with session.post("/v1/classifications", data=body,
                                    headers={"content-type": "application/json"}) as response:
                return orjson.loads(await response.read())
        yield post


@contextlib.asynccontextmanager
async def gateway_upstream_client(url: str, conc: int) -> Any:
    """The gateway's own UpstreamClient (retries, breaker, metrics, validation included)."""
    from prometheus_client import CollectorRegistry

    from service.gateway.metrics import GatewayMetrics
    from service.gateway.registry import UpstreamSpec
    from service.gateway.settings import Settings
    from service.gateway.upstream import UpstreamClient

    settings = Settings(max_connections=conc * 2)
    client = UpstreamClient(UpstreamSpec(name="bench", base_url=url), settings,
                            GatewayMetrics(CollectorRegistry()))

    async def post(body: bytes) -> Any:
        loop_time = time.monotonic()
        return await client.classify(Route.text("ft:bench"), ["one text"],
                                     deadline=loop_time + 10)
    try:
        yield post
    finally:
        await client.aclose()


CLIENTS: dict[str, Callable[[str, int], Any]] = {
    "httpx": httpx_default,
    "httpx+httpx_aiohttp": httpx_aiohttp,
    "httpx2": httpx2_default,
    "httpx2+httpx_aiohttp": httpx2_aiohttp,
    "httpx+PooledTransport": httpx_pooled,
    "aiohttp": aiohttp_plain,
}


async def measure(factory: Callable[[str, int], Any], url: str, conc: int, seconds: float,
                  warmup_s: float) -> dict[str, float]:
    body = orjson.dumps({"model": "ft:bench", "input": ["one text"]})
    latencies: list[float] = []
    async with factory(url, conc) as post:
        start = time.perf_counter()
        measure_from = start + warmup_s
        stop = measure_from + seconds

        async def worker() -> None:
            while (now := time.perf_counter()) < stop:
                result = await post(body)
                assert result, "empty response"
                done = time.perf_counter()
                if now >= measure_from:
                    latencies.append(done - now)

        await asyncio.gather(*(worker() for _ in range(conc)))
    latencies.sort()
    return {
        "req_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
    }


def run_client(factory: Callable[[str, int], Any], url: str, args: argparse.Namespace) -> dict[str, float]:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure(factory, url, args.concurrency, args.seconds, args.warmup))


def validation_cost(items: int = 32, repeat: int = 2000) -> dict[str, float]:
    """Microseconds to check one parsed upstream response of `items` results, two ways."""
    import timeit

    from service.gateway.protocols.mistral import check_results
    from service.wire import ClassificationResponse

    scores = {"negative": 0.1, "neutral": 0.2, "positive": 0.7}
    payload = {"id": "0" * 32, "model": "m",
               "results": [{"sentiment": {"scores": dict(scores)}} for _ in range(items)]}
    hand = min(timeit.repeat(lambda: check_results(payload), number=repeat, repeat=3)) / repeat
    full = min(timeit.repeat(lambda: ClassificationResponse.model_validate(payload), number=repeat,
                             repeat=3)) / repeat
    return {"items": items, "check_results_us": round(hand * 1e6, 2),
            "pydantic_model_validate_us": round(full * 1e6, 2)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"the bench upstream did not listen on port {port} within {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--clients", default=",".join([*CLIENTS, "gateway"]),
                        help="comma-separated subset of: " + ", ".join([*CLIENTS, "gateway"]))
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    clients = dict(CLIENTS, gateway=gateway_upstream_client)
    chosen = [name.strip() for name in args.clients.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(clients))
    if unknown:
        parser.error(f"unknown clients {unknown}; choose from {sorted(clients)}")
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        best: dict[str, dict[str, float]] = {}
        for round_no in range(args.rounds):
            order = chosen if round_no % 2 == 0 else list(reversed(chosen))
            for name in order:
                figures = run_client(clients[name], url, args)
                if name not in best or figures["req_per_s"] > best[name]["req_per_s"]:
                    best[name] = figures
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps({
        "bench": "upstream_transport",
        "concurrency": args.concurrency,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "results": {name: best[name] for name in chosen},
        "response_validation": validation_cost(),
    }))


if __name__ == "__main__":
    main()
