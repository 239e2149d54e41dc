"""A factory replica on Postgres + S3 against today's single factory (SQLite + a local data dir).

    python -m bench.factory_replicas [--requests 400] [--cold 3]
    python -m bench.factory_replicas --base-models local-minilm   # a few minutes more

Side by side in one run, the same model (the same job: the same rows, base model and
hyperparameters, trained once on each set-up) served by:
- `single`: `classifier-gateway factory` with only a data directory (SQLite, local files);
- `replica`: the same command with `FACTORY_DATABASE_URL` (a Postgres made by `initdb`) and
  `FACTORY_STORAGE_URL` (moto's S3 server), the peers of tests/support/cluster.py on loopback.

Figures, per base model (`--base-models`, default `local-ngram`):
- `classify_loaded`: single-text `POST /v1/classifications` latency with the model loaded,
  `--requests` per side, sent in alternating blocks of 50 so that a change in the machine's load
  falls on both sides alike.
- `first_call`: a new process that has never served the model (`--cold` of them, one after the
  other; each with an empty data directory on the replica side, so its disk cache is empty):
  the first classify request, which finds the record (SQL), fetches the files (the replica: from
  S3) and loads the model. On the single side the same new process reads the files from its
  data directory: the difference is what the store adds. The second request of the same process
  (`then_ms`) shows what a loaded model costs.

Each factory is its own process (a server thread in this one would share the GIL with the
client); moto's S3 runs in this process, which is idle while a replica fetches. One JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.harness import emit, summary_ms

BLOCK = 50
TEXTS = [f"the {thing} was {word}, {extra}" for thing, word, extra in (
    ("film", "wonderful", "I would see it again"), ("meal", "awful", "cold and late"),
    ("hotel", "fine", "nothing special"), ("phone", "broken", "after a week"),
    ("service", "excellent", "thank you"), ("book", "useless", "a waste of money"))]
#: The job per base model: Mistral's example hyperparameters for the n-gram model (fast); for
#: MiniLM the fewest steps that still export a model (its load, not its accuracy, is measured).
JOBS: dict[str, tuple[int, dict[str, Any]]] = {
    "local-ngram": (2000, {"training_steps": 100, "learning_rate": 4e-5}),
    "local-minilm": (200, {"training_steps": 8, "learning_rate": 4e-5}),
}


def post(http: httpx.Client, model: str, text: str) -> float:
    body = orjson.dumps({"model": model, "input": text})
    started = time.perf_counter()
    r = http.post("/v1/classifications", content=body,
                  headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    return elapsed


@contextlib.contextmanager
def factory(data_dir: Path, env: dict[str, str]) -> Iterator[str]:
    from tests.support.factory import FactoryProcess

    server = FactoryProcess(data_dir, env=env).start()
    try:
        yield server.url
    finally:
        server.stop()


def train(url: str, base_model: str) -> str:
    from tests.support.factory import FactoryClient, jsonl, sentiment_rows

    rows, hyper = JOBS[base_model]
    client = FactoryClient(url)
    job = client.train(jsonl(sentiment_rows(rows, seed=1)), model=base_model,
                       hyperparameters=hyper)
    client.close()
    return str(job["fine_tuned_model"])


def first_call(data_dir: Path, env: dict[str, str], model: str) -> tuple[float, float]:
    with factory(data_dir, env) as url, httpx.Client(base_url=url, timeout=600) as http:
        return post(http, model, TEXTS[0]), post(http, model, TEXTS[1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(base_model: str, tmp: Path, replica_env: dict[str, str], requests: int,
            cold: int) -> dict[str, Any]:
    sides = {"single": {}, "replica": replica_env}
    models: dict[str, str] = {}
    for side, env in sides.items():
        with factory(tmp / base_model / side / "trainer", env) as url:
            models[side] = train(url, base_model)
    single_models = tmp / base_model / "single" / "trainer" / "models"
    result: dict[str, Any] = {"model_bytes": dir_bytes(single_models)}

    # First calls, alternating sides: a new process each; the single side keeps its data dir
    # (its files are local), the replica side starts from an empty one (its files are in S3).
    firsts: dict[str, list[float]] = {side: [] for side in sides}
    thens: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(cold):
        for side, env in sides.items():
            data = tmp / base_model / side / ("trainer" if side == "single" else f"cold{i}")
            first, then = first_call(data, env, models[side])
            firsts[side].append(first)
            thens[side].append(then)
    result["first_call"] = {side: {**summary_ms(firsts[side]),
                                   "each_ms": [round(s * 1000, 1) for s in firsts[side]],
                                   "then_ms": round(min(thens[side]) * 1000, 2)}
                            for side in sides}

    # Loaded: both servers up, alternating blocks of single-text requests.
    latencies: dict[str, list[float]] = {side: [] for side in sides}
    with contextlib.ExitStack() as stack:
        clients = {}
        for side, env in sides.items():
            data = tmp / base_model / side / ("trainer" if side == "single" else "cold0")
            url = stack.enter_context(factory(data, env))
            clients[side] = stack.enter_context(httpx.Client(base_url=url, timeout=60))
            for text in TEXTS:  # load the model, warm the connection
                post(clients[side], models[side], text)
        for block in range(0, requests, BLOCK):
            for side in sides:
                for i in range(block, min(block + BLOCK, requests)):
                    latencies[side].append(post(clients[side], models[side],
                                                TEXTS[i % len(TEXTS)]))
    loaded = {side: summary_ms(values) for side, values in latencies.items()}
    loaded["replica_over_single_p50"] = {"ratio": round(
        loaded["replica"]["p50_ms"] / loaded["single"]["p50_ms"], 3)}
    result["classify_loaded"] = loaded
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--base-models", nargs="+", default=["local-ngram"], choices=list(JOBS))
    args = parser.parse_args()
    from tests.support.cluster import aws_env, running_postgres, running_s3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request

    started = time.perf_counter()
    result: dict[str, Any] = {"bench": "factory_replicas", "machine_cores": os.cpu_count(),
                              "load_average_before": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory() as tmp, running_s3() as s3, aws_env(s3), \
            running_postgres(Path(tmp) / "pg") as postgres:
        for i, base_model in enumerate(args.base_models):
            database = postgres.url if i == 0 else new_database(postgres.url, f"b{i}")
            replica_env = {"FACTORY_DATABASE_URL": database,
                           "FACTORY_STORAGE_URL": f"s3://{s3.bucket}/{base_model}"}
            result[base_model] = measure(base_model, Path(tmp), replica_env, args.requests,
                                         args.cold)
    result["load_average_after"] = round(os.getloadavg()[0], 1)
    result["seconds"] = round(time.perf_counter() - started)
    emit(result)


def new_database(url: str, name: str) -> str:
    """Another database on the same server: each base model's replicas start on an empty one."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + f"/{name}"


if __name__ == "__main__":
    main()
