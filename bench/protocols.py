"""What the gateway adds in front of each upstream protocol: the same requests sent to the server
directly (in its own protocol) and through the gateway (`POST /classify`, Redis on, every input
unique so every item reaches the server). Prints one JSON line per protocol.

- `added_p50_ms`: concurrency 1, one text a request; the gateway's p50 minus the server's.
- `items_per_s`: `--concurrency` clients each sending one text at a time; directly, each
  request is one server call; through the gateway, concurrent requests are micro-batched into
  shared calls.

Servers: `mistral` is the fake Mistral-compatible upstream (tests/support/fake_upstream.py),
`tei` and `vllm` the faithful fakes of tests/support/fake_inference.py (the real ones need a GPU
build or a Rust binary), `infinity` the real Infinity serving a MiniLM classifier on the CPU
(`make install-dev` makes its virtualenv), `kserve-v2` KServe's own model server serving a
`local-minilm` model the factory trains and exports here (ONNX, the factory's own graph); the
model's own compute dominates those two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from bench.harness import emit, percentile, process, redis, summary_ms
from service.gateway import protocols
from service.gateway.protocols import Route
from tests.support.processes import wait_ready
from tests.support.redis_server import free_port

LABELS = "negative,neutral,positive"


@contextlib.contextmanager
def server(kind: str, tmp: Path) -> Iterator[tuple[str, str]]:
    """(base URL, model name) of a server speaking `kind`."""
    port = free_port()
    if kind == "mistral":
        with process(["-m", "tests.support.fake_upstream", "--port", str(port)], port):
            yield f"http://127.0.0.1:{port}", "ft:bench"
    elif kind in ("tei", "vllm"):
        with process(["-m", "tests.support.fake_inference", kind, "--port", str(port),
                      "--labels", LABELS], port):
            yield f"http://127.0.0.1:{port}", "tei-model" if kind == "tei" else "vllm-model"
    elif kind == "kserve-v2":
        with exported_on_kserve(tmp) as (url, name):
            yield url, name
    elif kind == "infinity":
        from tests.support.hf_classifier import build_model
        from tests.support.infinity_server import running_infinity

        build_model(tmp)
        with running_infinity(tmp, "bench", tmp / "infinity.log") as url:
            yield url, "bench"
    else:
        raise SystemExit(f"no bench server for {kind!r}")


@contextlib.contextmanager
def exported_on_kserve(tmp: Path) -> Iterator[tuple[str, str]]:
    """Train `local-minilm` (2 steps, no n-gram blend) in a factory, export it as ONNX and serve
    it with KServe's model server, as tests/e2e/test_export_kserve.py does."""
    import sys

    from service.cli import main as cli
    from tests.support.factory import FactoryClient, jsonl, running_factory, sentiment_rows

    with running_factory(tmp / "factory") as factory:
        client = FactoryClient(factory.url)
        file_id = client.upload(jsonl(sentiment_rows(48)))["id"]
        job = client.create_job(file_id, model="local-minilm", hyperparameters={
            "training_steps": 2, "ngram_blend": False})
        done = client.wait(job["id"], timeout_s=600)
        client.close()
        os.environ["FACTORY_URL"] = factory.url
        if cli(["models", "export", done["fine_tuned_model"], "--format", "onnx", "--out",
                str(tmp / "export")]) != 0:
            raise SystemExit("the export failed")
    directory = tmp / "export" / "sentiment"
    port = free_port()
    with process_at(directory, [sys.executable, str(directory / "kserve_model.py"),
                                "--model_dir", str(directory), "--model_name", "sentiment",
                                "--http_port", str(port)], port,
                    "/v2/models/sentiment/ready"):
        yield f"http://127.0.0.1:{port}", "sentiment"


@contextlib.contextmanager
def process_at(cwd: Path, argv: list[str], port: int, ready: str) -> Iterator[None]:
    """A server not of this repository (its own PYTHONPATH-free environment), until ready."""
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, "PYTHONPATH": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}{ready}", 120, f"{argv[1]} did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def gateway(kind: str, url: str, model: str, redis_url: str, tmp: Path) -> Iterator[str]:
    task: dict[str, Any] = {"upstream": "up", "model": model}
    if kind == "vllm":
        task["labels"] = LABELS.split(",")
    if kind == "kserve-v2":
        task["labels"] = ["negative", "positive"]
    tasks = tmp / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"upstreams": {"up": {"base_url": url, "protocol": kind}},
                                     "tasks": {"bench": task}}))
    port = free_port()
    env = {"GATEWAY_TASKS_FILE": str(tasks), "GATEWAY_PORT": str(port),
           "GATEWAY_REDIS_URL": redis_url, "GATEWAY_LOG_LEVEL": "warning",
           "GATEWAY_SHUTDOWN_DELAY_S": "0"}
    with process(["-m", "service.cli", "serve"], port, env, ready_path="/readyz"):
        yield f"http://127.0.0.1:{port}"


def direct_request(kind: str, url: str, model: str, text: str) -> tuple[str, bytes]:
    wire = protocols.get(kind)
    route = Route.text(model, "bench", ["negative", "positive"] if kind == "kserve-v2"
                       else LABELS.split(","))
    return wire.root(url) + wire.path(route), wire.encode(route, [text])


def sequential(client: httpx.Client, calls: list[tuple[str, bytes]]) -> list[float]:
    samples = []
    for url, body in calls:
        started = time.perf_counter()
        response = client.post(url, content=body, headers={"content-type": "application/json"})
        samples.append(time.perf_counter() - started)
        response.raise_for_status()
    return samples


async def concurrent(calls: list[tuple[str, bytes]], concurrency: int) -> float:
    """Items per second with `concurrency` clients working through `calls` (aiohttp: httpx's
    async client costs more CPU per request than the servers measured here)."""
    queue = list(reversed(calls))
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def worker() -> None:
            while queue:
                url, body = queue.pop()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(calls) / (time.perf_counter() - started)


def bench(kind: str, requests: int, concurrency: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name, redis() as redis_url:
        tmp = Path(tmp_name)
        with server(kind, tmp) as (url, model), gateway(kind, url, model, redis_url, tmp) as gw, \
                httpx.Client(timeout=60) as client:
            def via_gateway(tag: str, n: int) -> list[tuple[str, bytes]]:
                return [(f"{gw}/classify",
                         f'{{"task": "bench", "input": ["{tag} text {i}"]}}'.encode())
                        for i in range(n)]

            def direct(tag: str, n: int) -> list[tuple[str, bytes]]:
                return [direct_request(kind, url, model, f"{tag} text {i}") for i in range(n)]

            sequential(client, direct("warm", 50))
            sequential(client, via_gateway("warm", 50))
            straight: list[float] = []
            through: list[float] = []
            for block in range(5):  # interleaved, so machine noise hits both sides alike
                straight += sequential(client, direct(f"d{block}", requests // 5))
                through += sequential(client, via_gateway(f"g{block}", requests // 5))
            many = requests * 2
            direct_rate = asyncio.run(concurrent(direct("cd", many), concurrency))
            gateway_rate = asyncio.run(concurrent(via_gateway("cg", many), concurrency))
    return {
        "bench": "protocols", "protocol": kind, "requests": requests,
        "direct": summary_ms(straight), "gateway": summary_ms(through),
        "added_p50_ms": round((percentile(through, 50) - percentile(straight, 50)) * 1000, 3),
        "concurrency": concurrency,
        "direct_items_per_s": round(direct_rate, 1),
        "gateway_items_per_s": round(gateway_rate, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", default="mistral,tei,vllm,infinity,kserve-v2")
    parser.add_argument("--requests", type=int, default=1000,
                        help="sequential requests per side (Infinity: a fifth)")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    for kind in args.protocols.split(","):
        n = args.requests // 5 if kind in ("infinity", "kserve-v2") else args.requests
        emit(bench(kind, n, args.concurrency))


if __name__ == "__main__":
    main()
