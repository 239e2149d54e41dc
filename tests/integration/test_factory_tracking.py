"""A job's `integrations` act: its run is logged to W&B (offline here: no internet) and to a real
`mlflow server`, read back with W&B's record schema and MLflow's client, by the factory replica
that supervises the job, two jobs at once, each its own runs; a cancelled job's runs end not
finished, with its losses so far, as do those of a job whose replica stops; the keys are nowhere
(store, job JSON, events, logs, files); a tracker whose package is missing leaves the job
training, with an event naming what to install."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from mlflow import MlflowClient

from tests.support.factory import (
    LONG_JOB,
    LONG_STEPS,
    REPO,
    FactoryClient,
    FactoryProcess,
    jsonl,
    running_factory,
    sentiment_rows,
)
from tests.support.mlflow_server import mlflow_server
from tests.support.redis_server import free_port
from tests.support.waits import Deadline
from tests.support.wandb_runs import read_run

WANDB_KEY = "wandb-key-under-test-" + "w" * 24
MLFLOW_KEY = "mlflow-token-under-test-" + "m" * 24


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _integration_events(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["data"]["type"]: e["data"] for e in job["events"] if e["name"] == "integration"}


#: The job that is cancelled while it trains: the encoder (local-ngram converges in a second),
#: short sequences, with a checkpoint at every step (the factory's `checkpoints` is its budget),
#: so that it has logged a few losses when the cancel comes.
CANCELLED_JOB: dict[str, Any] = {**LONG_JOB, "hyperparameters": {
    **LONG_JOB["hyperparameters"], "seq_len": 32}}


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` for the module, and W&B where nothing listens (unreachable at
    once, as it is without internet)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
        yield url


def _integrations(mlflow_url: str) -> list[dict[str, Any]]:
    return [{"type": "wandb", "project": "factory-tests", "api_key": WANDB_KEY},
            {"type": "mlflow", "tracking_uri": mlflow_url, "experiment_name": "factory-tests",
             "api_key": MLFLOW_KEY}]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, mlflow_url: str) -> Iterator[dict[str, Any]]:
    """Two jobs with a W&B and an MLflow integration in one factory, tracked at once: a
    local-ngram one trained to the end, and an encoder one cancelled once it has checkpoints."""
    root = tmp_path_factory.mktemp("tracking")
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        with running_factory(root / "data", max_concurrent_jobs=2,
                             checkpoints=LONG_STEPS) as server:
            client = FactoryClient(server.url)
            integrations = _integrations(mlflow_url)
            long = client.create_job(client.upload(jsonl(sentiment_rows(40, seed=3)))["id"],
                                     **CANCELLED_JOB, integrations=integrations)
            train = client.upload(jsonl(sentiment_rows(80, seed=1)))
            valid = client.upload(jsonl(sentiment_rows(30, seed=2)), name="valid.jsonl")
            created = client.create_job(train["id"], validation_files=[valid["id"]],
                                        integrations=integrations)
            job = client.wait(created["id"])
            deadline = Deadline(120)
            while len(client.job(long["id"])["checkpoints"]) < 2:  # the encoder loads, trains
                assert not deadline.expired(), client.job(long["id"])
                time.sleep(0.2)
            assert client.job(long["id"])["status"] == "RUNNING"
            r = client.http.post(f"/v1/fine_tuning/jobs/{long['id']}/cancel")
            assert r.status_code == 200, r.text
            cancelled = client.wait(long["id"], timeout_s=30)
            answers = [orjson.dumps(created).decode(), orjson.dumps(long).decode(),
                       client.http.get(f"/v1/fine_tuning/jobs/{job['id']}").text,
                       client.http.get(f"/v1/fine_tuning/jobs/{long['id']}").text,
                       client.http.get("/v1/fine_tuning/jobs").text]
            yield {"job": job, "events": _integration_events(job), "cancelled": cancelled,
                   "answers": answers, "mlflow": mlflow_url, "data_dir": root / "data",
                   "logs": records.lines}
            client.close()
    finally:
        logging.getLogger().removeHandler(records)


def test_job_lists_its_integrations_without_keys(tracked: dict[str, Any]) -> None:
    job = tracked["job"]
    assert job["status"] == "SUCCESS", job.get("error")
    # Mistral's field holds the W&B integration only (SDK 2.5.1 parses nothing else).
    assert job["integrations"] == [{"type": "wandb", "project": "factory-tests"}]
    assert job["extra_integrations"] == [{"type": "mlflow", "tracking_uri": tracked["mlflow"],
                                          "experiment_name": "factory-tests"}]


def test_wandb_run_is_offline_with_the_jobs_numbers(tracked: dict[str, Any]) -> None:
    job, event = tracked["job"], tracked["events"]["wandb"]
    assert event["status"] == "offline" and "could not be reached" in event["reason"]
    run_dir = Path(event["run_dir"])
    assert run_dir.name.startswith("offline-run-") and event["sync"] == f"wandb sync {run_dir}"
    assert run_dir.is_relative_to(tracked["data_dir"] / "jobs" / job["id"])
    run = read_run(run_dir)
    assert run["run"] == {"project": "factory-tests", "display_name": f"job-{job['id']}"}
    hyper = job["hyperparameters"]
    assert run["config"]["hyperparameters.learning_rate"] == hyper["learning_rate"]
    assert run["config"]["hyperparameters.training_steps"] == hyper["training_steps"]
    assert run["config"]["base_model"] == "local-ngram"
    assert run["config"]["targets.sentiment.labels"] == "negative,positive"
    losses = {row["_step"]: row["train_loss"] for row in run["history"] if "train_loss" in row}
    assert losses == {c["step_number"]: c["metrics"]["train_loss"] for c in job["checkpoints"]}
    assert len(losses) >= 2
    assert run["summary"]["evaluation.valid_accuracy"] == job["evaluation"]["valid_accuracy"]
    assert run["summary"]["evaluation.valid_loss"] == job["evaluation"]["valid_loss"]
    assert run["summary"]["trained_tokens"] == job["trained_tokens"]
    assert run["exit_code"] == 0


def test_mlflow_run_holds_the_jobs_numbers_and_model(tracked: dict[str, Any],
                                                     tmp_path: Path) -> None:
    job, event = tracked["job"], tracked["events"]["mlflow"]
    assert event["status"] == "logging"
    assert event["url"] == (f"{tracked['mlflow']}/#/experiments/{event['experiment_id']}"
                            f"/runs/{event['run_id']}")
    client = MlflowClient(tracking_uri=tracked["mlflow"])
    run = client.get_run(event["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"job-{job['id']}"
    assert run.data.tags["factory.job_id"] == job["id"]
    assert run.data.params["base_model"] == "local-ngram"
    assert float(run.data.params["hyperparameters.learning_rate"]) == \
        job["hyperparameters"]["learning_rate"]
    history = client.get_metric_history(event["run_id"], "train_loss")
    assert {m.step: m.value for m in history} == {
        c["step_number"]: c["metrics"]["train_loss"] for c in job["checkpoints"]}
    assert run.data.metrics["evaluation.valid_accuracy"] == job["evaluation"]["valid_accuracy"]
    assert run.data.metrics["trained_tokens"] == job["trained_tokens"]
    # The model's files, as the factory stored them.
    artifacts = {a.path for a in client.list_artifacts(event["run_id"], "model")}
    assert "model/model.json" in artifacts
    local = Path(client.download_artifacts(event["run_id"], "model/model.json", str(tmp_path)))
    stored = tracked["data_dir"] / "models" / job["id"] / "model.json"
    assert local.read_bytes() == stored.read_bytes()


def test_a_cancelled_jobs_runs_end_not_finished_with_its_losses_so_far(
        tracked: dict[str, Any]) -> None:
    """The cancel ends the job's tracker runs too (a killed trainer used to leave them open):
    MLflow's KILLED, W&B's non-zero exit, each with every loss the job recorded, in runs of their
    own beside the other job's (both tracked at once by one replica)."""
    job, done = tracked["cancelled"], tracked["job"]
    assert job["status"] == "CANCELLED", job
    losses = {c["step_number"]: c["metrics"]["train_loss"] for c in job["checkpoints"]}
    assert len(losses) >= 2, job["checkpoints"]
    events = _integration_events(job)
    mlflow = MlflowClient(tracking_uri=tracked["mlflow"])
    run = mlflow.get_run(events["mlflow"]["run_id"])
    assert run.info.status == "KILLED" and run.info.run_name == f"job-{job['id']}", \
        (run.info, job["events"])
    assert events["mlflow"]["run_id"] != tracked["events"]["mlflow"]["run_id"]
    history = mlflow.get_metric_history(events["mlflow"]["run_id"], "train_loss")
    assert {m.step: m.value for m in history} == losses, job["events"]
    assert not mlflow.list_artifacts(events["mlflow"]["run_id"])  # no model: none was kept
    assert events["wandb"]["status"] == "offline", job["events"]
    assert events["wandb"]["run_dir"] != tracked["events"]["wandb"]["run_dir"]
    wandb_run = read_run(Path(events["wandb"]["run_dir"]))
    assert wandb_run["run"]["display_name"] == f"job-{job['id']}"
    assert {row["_step"]: row["train_loss"] for row in wandb_run["history"]
            if "train_loss" in row} == losses, (wandb_run["history"], job["events"])
    assert wandb_run["exit_code"] not in (None, 0), job["events"]
    assert wandb_run["config"]["base_model"] == "local-minilm"
    # The other job's W&B run has its own numbers only.
    other = read_run(Path(tracked["events"]["wandb"]["run_dir"]))
    assert other["config"]["base_model"] == "local-ngram"
    assert len([row for row in other["history"] if "train_loss" in row]) == \
        len(done["checkpoints"]), (other["history"], done["checkpoints"])


def test_a_replica_that_stops_ends_its_jobs_tracker_runs(mlflow_url: str,
                                                         tmp_path: Path) -> None:
    """A factory stopped (gracefully) while a job trains ends the job's tracker runs as not
    finished, with a `stopped` event each that says why and where the job's own record is: its
    MLflow run is KILLED, its W&B run exits non-zero (they used to stay open)."""
    with running_factory(tmp_path / "data") as server:
        client = FactoryClient(server.url)
        file = client.upload(jsonl(sentiment_rows(40)))
        created = client.create_job(file["id"], **CANCELLED_JOB,
                                    integrations=_integrations(mlflow_url))
        deadline = Deadline(60)
        while set(_integration_events(client.job(created["id"]))) != {"wandb", "mlflow"}:
            assert not deadline.expired(), client.job(created["id"])  # the trackers opened
            time.sleep(0.1)
        client.close()
    with running_factory(tmp_path / "data") as server:  # the same data, read again
        client = FactoryClient(server.url)
        job = client.job(created["id"])
        client.close()
    assert job["status"] == "FAILED" and "shut down" in job["error"], job
    stopped = [e["data"] for e in job["events"] if e["name"] == "integration"
               and e["data"]["status"] == "stopped"]
    assert [e["type"] for e in stopped] == ["wandb", "mlflow"], job["events"]
    for event in stopped:
        assert "stopped supervising" in event["reason"] and created["id"] in event["reason"]
    opened = {e["data"]["type"]: e["data"] for e in job["events"] if e["name"] == "integration"
              and e["data"]["status"] in ("offline", "logging")}
    run = MlflowClient(tracking_uri=mlflow_url).get_run(opened["mlflow"]["run_id"])
    assert run.info.status == "KILLED"
    assert read_run(Path(opened["wandb"]["run_dir"]))["exit_code"] not in (None, 0)


def test_keys_are_nowhere(tracked: dict[str, Any]) -> None:
    for secret in (WANDB_KEY, MLFLOW_KEY):
        for answer in tracked["answers"]:  # the job's JSON (create, get, list), events included
            assert secret not in answer
        assert not [line for line in tracked["logs"] if secret in line]
        # The database, the trainer's log, the job's spec, the offline W&B run: every file.
        assert _files_holding(tracked["data_dir"], secret) == []


def test_missing_tracker_packages_leave_the_job_training(tmp_path: Path) -> None:
    """The factory (a process of its own, where the trackers run) finds `wandb` and `mlflow`
    unimportable (a directory ahead on its path that fails their import, as an environment
    without them does): the job trains, and says what to install."""
    shadow = tmp_path / "shadow"
    for package in ("wandb", "mlflow"):
        (shadow / package).mkdir(parents=True)
        (shadow / package / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n")
    factory = FactoryProcess(tmp_path / "data", env={
        "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}).start()
    try:
        client = FactoryClient(factory.url)
        train = client.upload(jsonl(sentiment_rows(40, seed=1)))
        job = client.wait(client.create_job(train["id"], integrations=[
            {"type": "wandb", "project": "p"},
            {"type": "mlflow", "tracking_uri": "http://127.0.0.1:9"}])["id"])
        client.close()
    finally:
        factory.stop()
    assert job["status"] == "SUCCESS", job.get("error")
    events = _integration_events(job)
    for package, install in (("wandb", "pip install wandb"), ("mlflow", "mlflow-skinny")):
        assert events[package]["status"] == "unavailable"
        assert f"{package!r} package" in events[package]["reason"]
        assert "classifier-gateway[tracking]" in events[package]["reason"]
        assert install in events[package]["reason"]


#: (integration, the field the 422 names, what its message says)
BAD_INTEGRATIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "mlflow", "tracking_uri": "file:///etc"}, "tracking_uri", "https?://"),
    ({"type": "mlflow", "tracking_uri": "http://user:pw@host"}, "tracking_uri", "https?://"),
    ({"type": "mlflow"}, "tracking_uri", "required"),
    ({"type": "wandb"}, "project", "required"),
    ({"type": "wandb", "project": "p", "entity": "e"}, "entity", "not permitted"),
    ({"type": "comet", "project": "p"}, "integrations", "'wandb', 'mlflow'"),
    ({"type": "wandb", "project": "p", "api_key": 7}, "api_key", "string"),
]


def test_bad_integrations_are_422_naming_the_field_never_the_key(tmp_path: Path) -> None:
    with running_factory(tmp_path / "data") as server:
        client = FactoryClient(server.url)
        file = client.upload(jsonl(sentiment_rows(10)))

        def create(integrations: list[dict[str, Any]]) -> Any:
            return client.http.post("/v1/fine_tuning/jobs", json={
                "model": "local-ngram", "training_files": [{"file_id": file["id"]}],
                "hyperparameters": {"training_steps": 10}, "integrations": integrations})

        for integration, field, fragment in BAD_INTEGRATIONS:
            r = create([{"api_key": WANDB_KEY, **integration}])
            assert r.status_code == 422, (integration, r.text)
            assert field in r.json()["message"] and fragment in r.text, r.text
            assert WANDB_KEY not in r.text and "user:pw" not in r.json()["message"]
        many = create([{"type": "wandb", "project": f"p{i}"} for i in range(5)])
        assert many.status_code == 422 and "at most 4" in many.text, many.text
        client.close()
