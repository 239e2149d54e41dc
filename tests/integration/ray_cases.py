"""The Ray executor's cases, run by test_factory_ray.py inside a loopback-only network namespace
(never collected on their own: the file name is not test_*). One Ray cluster for the module
(`ray start --head`, 2 CPUs), moto's S3 as the store, factories in this process; for the jobs
with integrations, a real `mlflow server` and a W&B that cannot be reached (offline runs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from mlflow import MlflowClient

from service.factory.blobs import open_blobs
from service.factory.executors.ray import NAMESPACE, actor_name
from tests.support.cluster import S3, aws_env, running_s3
from tests.support.factory import (
    LONG_JOB,
    FactoryClient,
    FactoryProcess,
    jsonl,
    running_factory,
    sentiment_rows,
)
from tests.support.mlflow_server import mlflow_server
from tests.support.ray_cluster import GCS_PORT, NETNS_ENV, ray_client_address, running_ray
from tests.support.redis_server import free_port
from tests.support.waits import Deadline
from tests.support.wandb_runs import read_run

TEXTS = ["the film was wonderful", "the meal was awful", "the app was broken, really useless"]
WANDB_KEY = "wandb-key-under-test-" + "w" * 24
MLFLOW_KEY = "mlflow-token-under-test-" + "m" * 24


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    assert os.environ.get(NETNS_ENV), "run by test_factory_ray.py, inside its namespace"
    with running_s3() as server, aws_env(server):
        yield server


@pytest.fixture(scope="module")
def ray_address(s3: S3) -> Iterator[str]:
    with running_ray(s3.env()) as address:
        yield address


@pytest.fixture(scope="module")
def integrations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """A job's integrations, with keys: a real `mlflow server` (in the namespace), and W&B at a
    port where nothing listens (offline at once, as without internet)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url, pytest.MonkeyPatch.context() \
            as patch:
        patch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
        yield [{"type": "wandb", "project": "factory-ray", "api_key": WANDB_KEY},
               {"type": "mlflow", "tracking_uri": url, "experiment_name": "factory-ray",
                "api_key": MLFLOW_KEY}]


def keys_nowhere(answers: list[str], root: Path) -> None:
    """Neither key in the factory's answers (the job's JSON, its events) nor in any file under
    `root` (the replicas' databases and data directories, W&B's offline runs)."""
    for key in (WANDB_KEY, MLFLOW_KEY):
        assert not [a for a in answers if key in a]
        assert not [str(f) for f in root.rglob("*") if f.is_file() and key.encode() in
                    f.read_bytes()]


def listening() -> list[str]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


def test_nothing_listens_beyond_loopback(ray_address: str) -> None:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    addresses = listening()
    print("listening in the namespace:", " ".join(sorted(addresses)))
    assert any(a.endswith(f":{GCS_PORT}") for a in addresses), addresses
    hosts = {a.rsplit(":", 1)[0] for a in addresses}
    assert hosts <= {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}, addresses


def ray_factory(tmp: Path, s3: S3, ray_address: str, **settings: Any) -> Any:
    return running_factory(tmp, storage_url=f"s3://{s3.bucket}/{tmp.name}",
                           executor="ray", ray_address=ray_address, **settings)


#: Each base model's job, and how many examples it trains on. local-minilm is as small as still
#: exercises every phase (2 steps of seq_len 32, 100 examples: under its 200-example holdout
#: bound, so no holdout search). Its cost is fixed, not per step: profiled on the loaded 2 cores
#: (2026-12-07, load 6), one such training took 56 s, of which importing torch, transformers and
#: onnxruntime 23 s, loading the encoder 10 s, the 2 steps 12 s, the ONNX export and int8
#: quantisation 13 s; FACTORY_RAY_NUM_CPUS=1 (one torch thread on Ray) matters little. 8 steps
#: of 200 examples, local then Ray, had taken 316 s; this case takes 63-90 s (load 6-9).
BODIES: dict[str, tuple[dict[str, Any], int]] = {
    "local-ngram": ({"model": "local-ngram"}, 200),
    "local-minilm": ({"model": "local-minilm",
                      "hyperparameters": {"training_steps": 2, "seq_len": 32,
                                          "learning_rate": 1e-4}}, 100),
}


@pytest.mark.parametrize("base", sorted(BODIES))
def test_a_ray_training_answers_as_the_local_one(base: str, ray_address: str, s3: S3,
                                                 tmp_path: Path,
                                                 integrations: list[dict[str, Any]]) -> None:
    """The same job on both executors, trained at the same time (a local-minilm training is
    ~25 s of fixed cost whatever its size: importing torch, transformers and onnxruntime in a
    fresh process, loading the encoder, the ONNX export and its int8 quantisation; one after the
    other, the two took ~2x as long on 2 cores), gives the same answers and reports alike. The
    local-ngram job on Ray also logs to MLflow and W&B (`ray_job_is_tracked`)."""
    body, rows = BODIES[base]
    tracked = base == "local-ngram"
    data = jsonl(sentiment_rows(rows, seed=5))
    with running_factory(tmp_path / "local", storage_url=f"s3://{s3.bucket}/local") as on_local, \
            ray_factory(tmp_path / "ray", s3, ray_address) as on_ray:
        local_client, client = FactoryClient(on_local.url), FactoryClient(on_ray.url)
        started = []
        for c in (local_client, client):
            extra: dict[str, Any] = {}
            if tracked:  # a validation file (for an evaluation to log) on both, trackers on Ray
                valid = c.upload(jsonl(sentiment_rows(40, seed=6)), name="valid.jsonl")
                extra["validation_files"] = [valid["id"]]
                if c is client:
                    extra["integrations"] = integrations
            started.append((c, c.create_job(c.upload(data)["id"], **body, **extra)["id"]))
        local, job = (c.wait(job_id, timeout_s=120) for c, job_id in started)
        assert local["status"] == job["status"] == "SUCCESS", (local, job)
        expected = local_client.http.post("/v1/classifications", json={
            "model": local["fine_tuned_model"], "input": TEXTS}).json()["results"]
        answer = client.http.post("/v1/classifications", json={
            "model": job["fine_tuned_model"], "input": TEXTS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"] == expected
        # Reported as the local executor reports: checkpoints with losses, phases as events.
        assert len(job["checkpoints"]) == len(local["checkpoints"]) > 0
        assert [c["metrics"] for c in job["checkpoints"]] == \
            [c["metrics"] for c in local["checkpoints"]]
        phases = [e["data"]["phase"] for e in job["events"] if e["name"] == "progress"]
        assert phases == [e["data"]["phase"] for e in local["events"] if e["name"] == "progress"]
        assert job["trained_tokens"] == local["trained_tokens"]
        # Its actor is gone once the model is recorded: nothing holds the cluster's CPUs.
        wait_until_gone(actor_name(job["id"]))
        if tracked:
            answers = [client.http.get(f"/v1/fine_tuning/jobs/{job['id']}").text,
                       client.http.get("/v1/fine_tuning/jobs").text]
            ray_job_is_tracked(job, f"s3://{s3.bucket}/ray", tmp_path)
            keys_nowhere(answers, tmp_path)
        local_client.close()
        client.close()


def ray_job_is_tracked(job: dict[str, Any], storage_url: str, tmp_path: Path) -> None:
    """The Ray job's trackers, run by its supervising replica: MLflow's run holds its losses,
    evaluation and model (as published to the store), FINISHED; W&B's offline run the same
    losses and evaluation."""
    events = {e["data"]["type"]: e["data"] for e in job["events"] if e["name"] == "integration"}
    assert events["mlflow"]["status"] == "logging", events
    losses = {c["step_number"]: c["metrics"]["train_loss"] for c in job["checkpoints"]}
    mlflow = MlflowClient(tracking_uri=events["mlflow"]["tracking_uri"])
    run = mlflow.get_run(events["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["base_model"] == "local-ngram"
    assert {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "train_loss")} \
        == losses
    assert run.data.metrics["evaluation.valid_accuracy"] == job["evaluation"]["valid_accuracy"]
    model = Path(mlflow.download_artifacts(run.info.run_id, "model/model.json",
                                           str(tmp_path / "artifact")))
    published = open_blobs(storage_url, tmp_path / "read").local_dir(f"models/{job['id']}")
    assert model.read_bytes() == (published / "model.json").read_bytes()
    assert events["wandb"]["status"] == "offline", events
    wandb_run = read_run(Path(events["wandb"]["run_dir"]))
    assert {row["_step"]: row["train_loss"] for row in wandb_run["history"]
            if "train_loss" in row} == losses
    assert wandb_run["summary"]["evaluation.valid_loss"] == job["evaluation"]["valid_loss"]
    assert wandb_run["exit_code"] == 0


def wait_until_gone(name: str, seconds: float = 15) -> None:
    deadline = Deadline(seconds)
    while True:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        assert not deadline.expired(), f"Ray actor {name} still alive after {deadline.describe()}"
        time.sleep(0.2)


def test_a_cancel_from_another_replica_stops_the_ray_run(ray_address: str, s3: S3,
                                                         tmp_path: Path) -> None:
    shared = {"database_url": f"sqlite:///{tmp_path / 'shared.sqlite3'}"}
    storage = f"s3://{s3.bucket}/cancel"
    with running_factory(tmp_path / "a", storage_url=storage, executor="ray",
                         ray_address=ray_address, replica_id="a", **shared) as server_a, \
            running_factory(tmp_path / "b", storage_url=storage, executor="ray",
                            ray_address=ray_address, replica_id="b", **shared) as server_b:
        a, b = FactoryClient(server_a.url), FactoryClient(server_b.url)
        file = a.upload(jsonl(sentiment_rows(200)))
        created = a.create_job(file["id"], **LONG_JOB)
        a.wait(created["id"], statuses=("RUNNING",), timeout_s=60)
        name = actor_name(created["id"])
        wait_for_actor(name)  # the actor exists and trains
        r = b.http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "CANCELLATION_REQUESTED", r.text
        wait_until_gone(name, seconds=5)  # B killed the actor itself
        job = a.wait(created["id"], timeout_s=15)
        assert job["status"] == "CANCELLED" and job["fine_tuned_model"] is None, job
        statuses = [e["data"]["status"] for e in job["events"] if e["name"] == "status-updated"]
        assert statuses[-2:] == ["CANCELLATION_REQUESTED", "CANCELLED"]
        a.close()
        b.close()


@contextlib.contextmanager
def taken_over(tmp_path: Path, s3: S3, ray_address: str, rows: int, a_address: str | None = None,
               **body: Any) -> Iterator[tuple[FactoryClient, str, Any]]:
    """Replicas A (a real process) and B (in this process) sharing a database and the store, both
    on Ray (A at `a_address` if given, else as B), with 2 s leases: A takes a job (`body`) and
    makes its actor, then gets SIGKILL (a crash: nothing recorded) as soon as the actor exists;
    B takes the lapsed lease. Yields B's client, the job's id and the actor A made, once B says
    it supervises the job."""
    shared = {**s3.env(), "FACTORY_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.sqlite3'}",
              "FACTORY_STORAGE_URL": f"s3://{s3.bucket}/{tmp_path.name}",
              "FACTORY_EXECUTOR": "ray", "FACTORY_RAY_ADDRESS": ray_address,
              "FACTORY_LEASE_S": "2"}
    a = FactoryProcess(tmp_path / "a", env={**shared, "FACTORY_REPLICA_ID": "a",
                                            "FACTORY_RAY_ADDRESS": a_address or ray_address}
                       ).start()
    try:
        with running_factory(tmp_path / "b", database_url=shared["FACTORY_DATABASE_URL"],
                             storage_url=shared["FACTORY_STORAGE_URL"], executor="ray",
                             ray_address=ray_address, replica_id="b", lease_s=2) as server:
            on_a, on_b = FactoryClient(a.url), FactoryClient(server.url)
            file = on_a.upload(jsonl(sentiment_rows(rows)))
            created = on_a.create_job(file["id"], **body)
            actor = wait_for_actor(actor_name(created["id"]))
            a.kill()
            deadline = Deadline(30)
            while True:  # B takes the job over
                job = on_b.job(created["id"])
                changed = [e["data"] for e in job["events"] if e["name"] == "supervisor-changed"]
                if changed:
                    break
                assert job["status"] == "RUNNING", job
                assert not deadline.expired(), "no replica took the job over"
                time.sleep(0.2)
            assert changed == [{"from": "a", "to": "b"}]
            yield on_b, created["id"], actor
            on_a.close()
            on_b.close()
    finally:
        a.stop()


def test_killing_the_supervising_replica_leaves_the_ray_run_to_the_other(
        ray_address: str, s3: S3, tmp_path: Path) -> None:
    """A (a real process, SIGKILLed) supervises a Ray training; B takes the lapsed lease and
    follows the same actor (the training never stopped), then a cancel on B ends it: the job is
    never left RUNNING without a supervisor."""
    with taken_over(tmp_path, s3, ray_address, 200, **LONG_JOB) as (on_b, job_id, actor):
        name = actor_name(job_id)
        assert ray.get_actor(name, namespace=NAMESPACE)._actor_id == actor._actor_id
        r = on_b.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert r.status_code == 200, r.text
        job = on_b.wait(job_id, timeout_s=15)
        assert job["status"] == "CANCELLED" and job["fine_tuned_model"] is None, job
        wait_until_gone(name)


def test_a_ray_run_taken_over_ends_in_success_served_by_the_new_supervisor(
        ray_address: str, s3: S3, tmp_path: Path, integrations: list[dict[str, Any]]) -> None:
    """A dies while its Ray actor trains (local-ngram: seconds on the actor, but A dies as soon
    as the actor exists, before its worker has even imported the trainer); B follows the same
    actor from A's cursor to its result, records the model once, and serves it. A reaches the
    cluster through Ray Client (`ray://`, as the k8s overlay does: the head's Ray Client server,
    waited for), B as a driver on the GCS: the named detached actor is the same to both. The
    job's trackers lived in A (its keys in A's memory): B says, per integration, that their runs
    stopped with A, and holds no key."""
    with taken_over(tmp_path, s3, ray_address, 400, a_address=ray_client_address(),
                    integrations=integrations) as (on_b, job_id, _actor):
        job = on_b.wait(job_id, timeout_s=60)
        assert job["status"] == "SUCCESS", job
        interrupted = [e["data"] for e in job["events"] if e["name"] == "integration"
                       and e["data"]["status"] == "interrupted"]
        assert [e["type"] for e in interrupted] == ["wandb", "mlflow"], job["events"]
        for event in interrupted:
            assert "replica a " in event["reason"] and job_id in event["reason"], event
        keys_nowhere([on_b.http.get(f"/v1/fine_tuning/jobs/{job_id}").text], tmp_path)
        model = job["fine_tuned_model"]
        steps = [c["step_number"] for c in job["checkpoints"]]
        assert steps and len(steps) == len(set(steps)), steps  # no checkpoint twice
        answer = on_b.http.post("/v1/classifications", json={"model": model, "input": TEXTS})
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert len(results) == len(TEXTS) and all(r["sentiment"]["scores"] for r in results)
        models = [m["id"] for m in on_b.http.get("/v1/models").json()["data"]]
        assert models.count(model) == 1, models
        jobs = on_b.http.get("/v1/fine_tuning/jobs").json()["data"]
        assert [j["status"] for j in jobs] == ["SUCCESS"], jobs
        wait_until_gone(actor_name(job_id))  # B let the actor go too


def wait_for_actor(name: str, seconds: float = 60) -> Any:
    deadline = Deadline(seconds)
    while True:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            assert not deadline.expired(), f"no Ray actor {name}"
            time.sleep(0.2)


def test_a_job_chooses_cpu_or_gpu_on_ray_and_never_waits_for_a_missing_gpu(
        ray_address: str, s3: S3, tmp_path: Path) -> None:
    """The cluster has no GPU (`--num-gpus 0`) and the factory says FACTORY_DEVICE=cuda: a
    "cuda" job is a 422 naming `device`; a job that leaves it to the factory fails at once
    (before any actor waits for a GPU) with that reason; a "cpu" job's actor asks for CPUs
    only, so Ray places it and it answers (before the change, it asked for a GPU and stayed
    pending forever)."""
    assert "GPU" not in ray.cluster_resources()  # type: ignore[no-untyped-call]
    with ray_factory(tmp_path, s3, ray_address, device="cuda") as server:
        client = FactoryClient(server.url)
        file = client.upload(jsonl(sentiment_rows(40)))
        tiny = {"model": "local-minilm", "training_files": [file["id"]],
                "hyperparameters": {"training_steps": 2, "seq_len": 32}}
        r = client.http.post("/v1/fine_tuning/jobs", json={**tiny, "device": "cuda"})
        assert r.status_code == 422, r.text
        assert r.json()["param"] == "device" and "no GPU" in r.json()["message"], r.text
        job = client.wait(client.create_job(file["id"], **tiny, suffix="default")["id"])
        assert job["status"] == "FAILED" and "no GPU" in job["error"], job
        with pytest.raises(ValueError):  # no actor was made for it
            ray.get_actor(actor_name(job["id"]), namespace=NAMESPACE)
        created = client.create_job(file["id"], **tiny, device="cpu")
        actor = wait_for_actor(actor_name(created["id"]))
        assert ray.get(actor.poll.remote(10_000), timeout=60) is not None  # placed: it answers
        r = client.http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
        assert r.status_code == 200, r.text
        assert client.wait(created["id"], timeout_s=15)["status"] == "CANCELLED"
        wait_until_gone(actor_name(created["id"]))
        client.close()
