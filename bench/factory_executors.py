"""Job submission to RUNNING, and to the training's first message, on the local and Ray executors.

    python -m bench.factory_executors [--jobs 5]

Side by side in one run, on one S3 store (moto's server) and the same small local-ngram job:
- `local`: the trainer child process of the replica (FACTORY_EXECUTOR=local);
- `ray`: a detached Ray actor on a local Ray cluster (`ray start --head`, 2 CPUs).

Ray binds the machine's address, so the whole bench re-runs itself inside a loopback-only
network namespace (tests/support/ray_cluster.py; root). Per job: `to_running_ms`, POST
/v1/fine_tuning/jobs until a poll (every 5 ms) sees RUNNING or later; `to_first_message_ms`,
until the job shows the trainer's first progress (the process or actor started, imported the
model code and read the files). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import emit, summary_ms

AFTER_RUNNING = {"RUNNING", "SUCCESS", "FAILED", "CANCELLATION_REQUESTED", "CANCELLED"}


def measure(url: str, jobs: int) -> dict[str, Any]:
    from tests.support.factory import FactoryClient, jsonl, sentiment_rows

    client = FactoryClient(url)
    file = client.upload(jsonl(sentiment_rows(200, seed=1)))
    to_running: list[float] = []
    to_message: list[float] = []
    for i in range(jobs + 1):  # the first warms up (imports, the Ray worker process)
        start = time.perf_counter()
        job = client.create_job(file["id"], suffix=f"bench{i}")
        running = message = None
        while message is None:
            seen = client.job(job["id"])
            now = time.perf_counter() - start
            if running is None and seen["status"] in AFTER_RUNNING:
                running = now
            if seen.get("progress") or seen["status"] in ("SUCCESS", "FAILED"):
                message = now
            time.sleep(0.005)
        assert client.wait(job["id"])["status"] == "SUCCESS"
        if i:
            to_running.append(running if running is not None else message)
            to_message.append(message)
    client.close()
    return {"to_running": summary_ms(to_running), "to_first_message": summary_ms(to_message),
            "jobs": jobs}


def inside(jobs: int) -> dict[str, Any]:
    from tests.support.cluster import aws_env, running_s3
    from tests.support.factory import running_factory
    from tests.support.ray_cluster import running_ray

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, running_s3() as s3, aws_env(s3), \
            running_ray(s3.env()) as address:
        for executor in ("local", "ray"):
            extra = {"executor": "ray", "ray_address": address} if executor == "ray" else {}
            with running_factory(Path(tmp) / executor,
                                 storage_url=f"s3://{s3.bucket}/{executor}", **extra) as server:
                results[executor] = measure(server.url, jobs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    from tests.support.ray_cluster import NETNS_ENV, in_loopback_namespace

    if os.environ.get(NETNS_ENV):
        print(json.dumps(inside(args.jobs)))
        return
    done = in_loopback_namespace([sys.executable, "-m", "bench.factory_executors",
                                  "--jobs", str(args.jobs)], timeout_s=900)
    if done.returncode != 0:
        sys.exit(f"bench failed inside its network namespace:\n{done.stdout[-3000:]}\n"
                 f"{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    emit({"bench": "factory_executors", "model": "local-ngram", "examples": 200, **result})


if __name__ == "__main__":
    main()
