"""Issue 12, section 4 end to end, all real: the factory fine-tunes `local-minilm` (2 steps on 48
short texts, `ngram_blend: false`), `classifier-gateway models export` fetches it over the
factory's HTTP API, KServe's own model server (`kserve` from PyPI) serves the export with the
runtime the export carries, and the gateway's `kserve-v2` upstream answers `/classify` with the
factory's labels and scores (within 1e-3; measured: equal to the factory's 6 rounded decimals).
What cannot be exported is refused over HTTP and by the CLI with the reason and the remedy.

~60 s on 2 shared cores: training ~35 s (the trainer process imports torch), KServe's start ~5 s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from service.cli import main
from service.gateway.app import create_app
from service.gateway.settings import Settings
from tests.support.factory import FactoryClient, jsonl, running_factory, sentiment_rows
from tests.support.processes import stop, wait_ready
from tests.support.redis_server import free_port
from tests.support.servers import serve

LABELS = ["negative", "positive"]
TEXTS = [r["text"] for r in sentiment_rows(10, seed=11)] + [
    "the meal was fine, but the service was slow and the waiter was rude",
    "the hotel was terrible " * 60 + "yet the view was wonderful"]


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A real factory with a `local-minilm` model trained for export and a `local-ngram` one:
    (url, minilm model id, ngram model id)."""
    with running_factory(tmp_path_factory.mktemp("factory")) as server:
        client = FactoryClient(server.url)
        try:
            file_id = client.upload(jsonl(sentiment_rows(48)))["id"]
            minilm = client.create_job(file_id, model="local-minilm", hyperparameters={
                "training_steps": 2, "learning_rate": 4e-5, "ngram_blend": False})
            ngram = client.wait(client.create_job(file_id)["id"])
            done = client.wait(minilm["id"], timeout_s=400)
            assert done["status"] == "SUCCESS" and ngram["status"] == "SUCCESS", (done, ngram)
            yield server.url, done["fine_tuned_model"], ngram["fine_tuned_model"]
        finally:
            client.close()


def _factory_scores(url: str, model: str) -> list[dict[str, float]]:
    r = httpx.post(f"{url}/v1/classifications", json={"model": model, "input": TEXTS},
                   timeout=60)
    assert r.status_code == 200, r.text
    return [result["sentiment"]["scores"] for result in r.json()["results"]]


def _start_kserve(directory: Path, name: str, log: Path) -> tuple[Any, str]:
    import subprocess

    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, str(directory / "kserve_model.py"), "--model_dir", str(directory),
         "--model_name", name, "--http_port", str(port)],
        cwd=directory, stdout=handle, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": ""})  # the export alone: nothing of this repository
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, f"{url}/v2/models/{name}/ready", 120, "KServe did not start")
    except BaseException:
        process.kill()
        raise RuntimeError(f"KServe did not start; its log:\n{log.read_text()}") from None
    return process, url


def test_a_factory_model_exported_to_kserve_answers_through_the_gateway_as_on_the_factory(
        factory: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, model_id, _ = factory
    monkeypatch.setenv("FACTORY_URL", url)
    out = tmp_path / "export"
    assert main(["models", "export", model_id, "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported {model_id} as onnx to {out}" in printed
    assert "protocol: kserve-v2" in printed and "labels: [negative, positive]" in printed
    assert "note:" not in printed  # trained without the blend: nothing differs from the factory
    report = orjson.loads((out / "export.json").read_bytes())
    assert report["targets"][0]["matches_factory"] and report["model"] == model_id

    factory_scores = _factory_scores(url, model_id)
    process, kserve_url = _start_kserve(out / "sentiment", "sentiment", tmp_path / "kserve.log")
    try:
        metadata = httpx.get(f"{kserve_url}/v2/models/sentiment").json()
        assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32",
                                        "shape": [-1, 2]}]
        direct = httpx.post(f"{kserve_url}/v2/models/sentiment/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]},
            timeout=60)
        assert direct.status_code == 200, direct.text
        (output,) = direct.json()["outputs"]
        assert output["name"] == "probabilities" and output["shape"] == [len(TEXTS), 2]
        rows = [output["data"][2 * i:2 * i + 2] for i in range(len(TEXTS))]
        for want, got in zip(factory_scores, rows, strict=True):
            assert dict(zip(LABELS, got, strict=True)) == pytest.approx(want, abs=1e-6)

        tasks_file = tmp_path / "tasks.yaml"
        tasks_file.write_text(yaml.safe_dump({
            "upstreams": {"kserve": {"base_url": kserve_url, "protocol": "kserve-v2"},
                          "local": {"base_url": url}},
            "tasks": {"sentiment": {"upstream": "kserve", "model": "sentiment",
                                    "target": "sentiment", "labels": LABELS},
                      "sentiment-factory": {"upstream": "local", "model": model_id}}}))
        with (serve(create_app(Settings(tasks_file=tasks_file, redis_url=""))) as gateway,
              httpx.Client(base_url=gateway.url, timeout=60) as client):
            served = client.post("/classify", json={"task": "sentiment", "input": TEXTS})
            assert served.status_code == 200, served.text
            on_factory = client.post("/classify", json={"task": "sentiment-factory",
                                                        "input": TEXTS})
            assert on_factory.status_code == 200, on_factory.text
    finally:
        stop(process)
    through_kserve = [r["sentiment"] for r in served.json()["results"]]
    through_factory = [r["sentiment"] for r in on_factory.json()["results"]]
    for want, kserve_result, factory_result in zip(factory_scores, through_kserve,
                                                   through_factory, strict=True):
        assert kserve_result["scores"] == pytest.approx(want, abs=1e-3)
        assert kserve_result["scores"] == pytest.approx(factory_result["scores"], abs=1e-3)
        assert kserve_result["label"] == factory_result["label"] == max(want, key=want.__getitem__)
    # Both labels occur: the comparison is not of one constant answer.
    assert {r["label"] for r in through_kserve} == set(LABELS)


def test_hf_export_over_the_cli_writes_a_transformers_directory_and_says_it_is_float32(
        factory: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, model_id, _ = factory
    monkeypatch.setenv("FACTORY_URL", url)
    out = tmp_path / "hf"
    assert main(["models", "export", model_id, "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code=True" in printed and "float32" in printed
    config = orjson.loads((out / "sentiment" / "config.json").read_bytes())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["auto_map"]["AutoModelForSequenceClassification"].startswith(
        "modeling_minilm_classifier.")
    assert {"model.safetensors", "tokenizer.json", "modeling_minilm_classifier.py"} <= {
        p.name for p in (out / "sentiment").iterdir()}


def test_what_cannot_be_exported_is_refused_over_http_and_by_the_cli(
        factory: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url, model_id, ngram_id = factory
    r = httpx.get(f"{url}/v1/models/{ngram_id}/export", params={"format": "onnx"})
    assert r.status_code == 409 and r.json()["code"] == "model_not_exportable"
    assert "no inference server loads that form" in r.json()["message"]
    assert "fine-tune local-minilm" in r.json()["message"]
    r = httpx.get(f"{url}/v1/models/{model_id}/export", params={"format": "torchscript"})
    assert r.status_code == 400 and "use one of onnx, hf" in r.json()["message"]
    r = httpx.get(f"{url}/v1/models/ft:classifier:local-minilm:nope/export")
    assert r.status_code == 404
    r = httpx.get(f"{url}/v1/models/local-minilm/export")
    assert r.status_code == 404 and "fine-tune it first" in r.json()["message"]

    # The remedy the refusal names: `ngram_blend` is local-minilm's; local-ngram refuses it.
    files = httpx.get(f"{url}/v1/files").json()["data"]
    r = httpx.post(f"{url}/v1/fine_tuning/jobs", json={
        "model": "local-ngram", "training_files": [files[0]["id"]],
        "hyperparameters": {"training_steps": 5, "ngram_blend": False}})
    assert r.status_code == 422 and "leave ngram_blend out" in r.json()["message"]

    monkeypatch.setenv("FACTORY_URL", url)
    assert main(["models", "export", ngram_id, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "HTTP 409" in err and "no inference server loads that form" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["models", "export", model_id, "--out", str(tmp_path / "full")]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
