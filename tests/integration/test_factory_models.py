"""The factory with its base models, through the HTTP API: what a user sees when a base model is
missing, a hyperparameter is out of a model's range, a model on disk is damaged, or a training
process dies. Each gives a 4xx naming the field or a FAILED job with a reason a user can act on,
leaves nothing half-written, and the factory keeps serving."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.factory import LONG_JOB, FactoryClient, jsonl, running_factory, sentiment_rows
from tests.support.waits import Deadline


@pytest.fixture()
def factory(tmp_path: Path) -> Iterator[tuple[FactoryClient, Path]]:
    with running_factory(tmp_path / "data") as server:
        client = FactoryClient(server.url)
        yield client, tmp_path / "data"
        client.close()


def _cards(client: FactoryClient) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in client.http.get("/v1/models").json()["data"]}


def test_the_encoder_is_listed_and_mistral_names_mean_it(
        factory: tuple[FactoryClient, Path]) -> None:
    client, _ = factory
    cards = _cards(client)
    assert cards["local-minilm"]["available"] is True
    assert cards["local-minilm"]["base_model_capabilities"]["pretrained"] is True
    assert cards["ministral-3b-latest"]["served_by"] == "local-minilm"
    assert cards["local-minilm"]["aliases"] == ["ministral-3b-latest", "ministral-8b-latest",
                                                "mistral-small-latest"]


def test_without_the_encoder_extra_it_is_unavailable_with_the_install_command(
        factory: tuple[FactoryClient, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = factory
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "torch" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    cards = _cards(client)
    assert cards["local-minilm"]["available"] is False
    assert "pip install" in cards["local-minilm"]["unavailable_reason"]
    assert cards["ministral-3b-latest"]["served_by"] == "local-ngram"
    file = client.upload(jsonl(sentiment_rows(60)))
    r = client.http.post("/v1/fine_tuning/jobs", json={
        "model": "local-minilm", "training_files": [file["id"]],
        "hyperparameters": {"training_steps": 10}})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["param"] == "model" and body["code"] == "model_unavailable"
    assert "torch" in body["message"] and "pip install" in body["message"]
    # Mistral's name still trains, on the n-gram model, and the factory keeps serving.
    job = client.train(jsonl(sentiment_rows(60)), model="ministral-3b-latest")
    assert job["fine_tuned_model"].startswith("ft:classifier:ministral-3b-latest:")
    r = client.http.post("/v1/classifications", json={"model": job["fine_tuned_model"],
                                                      "input": "great"})
    assert r.status_code == 200


@pytest.mark.parametrize("seq_len", [8, 600])
def test_seq_len_outside_the_encoders_range_is_422_naming_the_field(
        factory: tuple[FactoryClient, Path], seq_len: int) -> None:
    client, _ = factory
    file = client.upload(jsonl(sentiment_rows(20)))
    r = client.http.post("/v1/fine_tuning/jobs", json={
        "model": "local-minilm", "training_files": [file["id"]],
        "hyperparameters": {"training_steps": 10, "seq_len": seq_len}})
    assert r.status_code == 422, r.text
    assert r.json()["param"] == "hyperparameters.seq_len"
    assert "512" in r.json()["message"]


def test_a_damaged_model_answers_409_and_others_keep_serving(
        factory: tuple[FactoryClient, Path]) -> None:
    client, data_dir = factory
    broken = client.train(jsonl(sentiment_rows(60)))
    healthy = client.train(jsonl(sentiment_rows(60, seed=1)), suffix="healthy")
    model_dir = data_dir / "models" / broken["id"]
    assert (model_dir / "model.json").exists(), sorted(p.name for p in data_dir.iterdir())
    (model_dir / "model.json").write_bytes(b"{truncated")
    r = client.http.post("/v1/classifications", json={"model": broken["fine_tuned_model"],
                                                      "input": "great"})
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "model_unreadable" and "train" in r.json()["message"]
    r = client.http.post("/v1/classifications", json={"model": healthy["fine_tuned_model"],
                                                      "input": "great"})
    assert r.status_code == 200


def test_a_killed_training_process_fails_the_job_with_a_reason_and_leaves_nothing(
        factory: tuple[FactoryClient, Path]) -> None:
    """The kernel's OOM killer sends SIGKILL: the job says so and what to do."""
    client, data_dir = factory
    file = client.upload(jsonl(sentiment_rows(100)))
    job = client.create_job(file["id"], **LONG_JOB)
    client.wait(job["id"], ("RUNNING",))
    deadline = time.monotonic() + 30
    pids: list[int] = []
    while not pids and time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", f"service.factory.trainer .*{job['id']}"],
                               capture_output=True, text=True, check=False)
        pids = [int(p) for p in found.stdout.split()]
        time.sleep(0.1)
    assert pids, "no trainer process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    failed = client.wait(job["id"])
    assert failed["status"] == "FAILED"
    assert "SIGKILL" in failed["error"] and "memory" in failed["error"]
    assert not list((data_dir / "models").glob(f"{job['id']}*"))
    assert client.train(jsonl(sentiment_rows(40)))["status"] == "SUCCESS"


#: A local-minilm job small enough to train in seconds on a CPU: where it runs is what is tested.
TINY_MINILM = {"model": "local-minilm",
               "hyperparameters": {"training_steps": 2, "seq_len": 32, "learning_rate": 1e-4}}


def test_a_job_chooses_cpu_or_gpu_and_never_waits_for_a_missing_gpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FACTORY_DEVICE=cuda on a factory whose PyTorch sees no GPU: a job's own `device` wins
    ("cpu" trains on the CPU, says so, and shows what it asked for); a "cuda" job is a 422
    naming the field with what to do; a job that leaves it to the factory fails at once with
    that reason; local-ngram ignores the device."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    with running_factory(tmp_path / "data", device="cuda") as server:
        client = FactoryClient(server.url)
        file = client.upload(jsonl(sentiment_rows(40)))
        r = client.http.post("/v1/fine_tuning/jobs", json={
            **TINY_MINILM, "training_files": [file["id"]], "device": "cuda"})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["param"] == "device" and body["code"] == "device_unavailable", body
        assert "no CUDA GPU" in body["message"] and '"cpu"' in body["message"], body
        r = client.http.post("/v1/fine_tuning/jobs", json={
            **TINY_MINILM, "training_files": [file["id"]], "device": "tpu"})
        assert r.status_code == 422, r.text
        assert [d["loc"][-1] for d in r.json()["detail"]] == ["device"], r.text

        created = client.create_job(file["id"], **TINY_MINILM, device="cpu")
        assert created["device"] == "cpu", created
        deadline = Deadline(90)
        while True:  # the device is said as the model loads: no need to train it to the end
            job = client.job(created["id"])
            devices = [e["data"] for e in job["events"] if e["name"] == "device"]
            if devices or job["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
                break
            assert not deadline.expired(), job
            time.sleep(0.2)
        assert [d["device"] for d in devices] == ["cpu"], job
        client.http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
        assert client.wait(created["id"])["status"] == "CANCELLED"

        job = client.wait(client.create_job(file["id"], **TINY_MINILM, suffix="default")["id"])
        assert job["status"] == "FAILED" and job["device"] is None, job
        assert "no CUDA GPU" in job["error"], job

        job = client.train(jsonl(sentiment_rows(40)), model="local-ngram", device="cuda")
        assert not [e for e in job["events"] if e["name"] == "device"], job["events"]
        client.close()
