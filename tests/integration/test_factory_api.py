"""The factory over real HTTP (uvicorn on a loopback port): files, jobs, models, classification,
errors, auth and metrics, in Mistral's wire format (docs/factory.md)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.factory import (
    LONG_JOB,
    FactoryClient,
    chat_rows,
    jsonl,
    running_factory,
    sentiment_rows,
)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[FactoryClient]:
    with running_factory(tmp_path / "data", max_upload_bytes=200_000) as server:
        client = FactoryClient(server.url)
        yield client
        client.close()


def _assert_mistral_error(response: httpx.Response, status: int, fragment: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()
    assert body["object"] == "error"
    assert body["type"] in ("invalid_request_error", "authentication_error")
    assert fragment in body["message"], body
    return body


def test_files_upload_dedupe_list_get_content_delete(factory: FactoryClient) -> None:
    data = jsonl(sentiment_rows(10))
    first = factory.upload(data)
    assert first["object"] == "file" and first["bytes"] == len(data)
    assert isinstance(first["bytes"], int)
    assert first["num_lines"] == 10 and first["purpose"] == "fine-tune"
    assert first["sample_type"] == "pretrain" and first["source"] == "upload"
    assert factory.upload(data)["id"] == first["id"]  # same name and content
    other = factory.upload(data, name="copy.jsonl")
    assert other["id"] != first["id"]
    chat = factory.upload(jsonl(chat_rows(3)), name="chat.jsonl")
    assert chat["sample_type"] == "instruct"

    listing = factory.http.get("/v1/files", params={"page_size": 2}).json()
    assert listing["object"] == "list" and listing["total"] == 3 and len(listing["data"]) == 2
    page2 = factory.http.get("/v1/files", params={"page_size": 2, "page": 1}).json()
    assert len(page2["data"]) == 1
    assert {f["id"] for f in listing["data"] + page2["data"]} == {first["id"], other["id"],
                                                                 chat["id"]}
    got = factory.http.get(f"/v1/files/{first['id']}").json()
    assert got["deleted"] is False and got["filename"] == "train.jsonl"
    assert factory.http.get(f"/v1/files/{first['id']}/content").content == data

    deleted = factory.http.delete(f"/v1/files/{other['id']}").json()
    assert deleted == {"id": other["id"], "object": "file", "deleted": True}
    _assert_mistral_error(factory.http.get(f"/v1/files/{other['id']}"), 404, "no file")
    assert factory.http.get("/v1/files").json()["total"] == 2


def test_oversize_upload_is_413_naming_the_limit(factory: FactoryClient) -> None:
    big = jsonl(sentiment_rows(5000))
    assert len(big) > 200_000
    r = factory.http.post("/v1/files", files={"file": ("big.jsonl", big)})
    body = _assert_mistral_error(r, 413, "200000 bytes")
    assert body["param"] == "file"
    assert factory.http.get("/v1/files").json()["total"] == 0


def test_a_job_reports_its_phases_and_the_steps_its_model_planned(
        factory: FactoryClient) -> None:
    """`progress` on the job: the phase (a `progress` event when each begins) and the steps, as
    the model planned them; at the end, the last step and why it is short of the total (issue
    19: a job could sit minutes in RUNNING with nothing to show, and end at step 38/43)."""
    train = factory.upload(jsonl(sentiment_rows(300, seed=1)))
    created = factory.create_job(train["id"], auto_start=True, suffix="progress")
    job = factory.wait(created["id"])
    assert job["status"] == "SUCCESS", job
    phases = [e["data"]["phase"] for e in job["events"] if e["name"] == "progress"]
    assert phases == ["reading", "featurising", "training", "calibrating"]
    step = max(c["step_number"] for c in job["checkpoints"])
    assert step < 100  # local-ngram's 100 iterations are a budget: it converges first
    assert job["progress"] == {"phase": "done", "done": None, "total": None, "step": step,
                               "total_steps": 100, "stopped": "the solver converged"}


def test_upload_without_file_is_422(factory: FactoryClient) -> None:
    r = factory.http.post("/v1/files", files={"purpose": (None, "fine-tune")})
    assert r.status_code == 422
    assert "`file`" in r.json()["message"]


def test_mistral_example_job_runs_the_recorded_sequence(factory: FactoryClient) -> None:
    train = factory.upload(jsonl(sentiment_rows(300, seed=1)))
    valid = factory.upload(jsonl(sentiment_rows(100, seed=2)), name="valid.jsonl")
    created = factory.create_job(train["id"], validation_files=[valid["id"]], auto_start=True,
                                 suffix="sentiment")
    assert created["status"] == "QUEUED" and created["job_type"] == "classifier"
    assert created["training_files"] == [train["id"]]
    assert created["fine_tuned_model"] is None
    job = factory.wait(created["id"])
    assert job["status"] == "SUCCESS", job
    statuses = [e["data"]["status"] for e in job["events"] if e["name"] == "status-updated"]
    assert statuses == ["QUEUED", "VALIDATING", "VALIDATED", "RUNNING", "SUCCESS"]
    assert job["classifier_targets"] == [{"name": "sentiment", "labels": ["negative", "positive"],
                                          "weight": 1.0, "loss_function": "single_class"}]
    checkpoints = job["checkpoints"]
    # Newest first; local-ngram's steps are solver iterations, which stop at convergence.
    steps = [c["step_number"] for c in checkpoints]
    assert len(steps) >= 2 and steps == sorted(steps, reverse=True) and steps[0] < 100
    for checkpoint in checkpoints:
        metrics = checkpoint["metrics"]
        assert metrics["train_loss"] > 0 and metrics["valid_loss"] > 0
        assert 0 <= metrics["valid_mean_token_accuracy"] <= 1
    # Losses really fall: the last checkpoint is far below the first.
    assert checkpoints[0]["metrics"]["valid_loss"] < checkpoints[-1]["metrics"]["valid_loss"]
    assert job["evaluation"]["targets"]["sentiment"]["macro_f1"] >= 0.95
    assert job["trained_tokens"] > 0
    # A temperature fitted on the validation file after training: the job says where, and ECE
    # (15 bins, top label) before and after; the event says the same as it happens.
    calibration = job["calibration"]
    assert calibration["source"] == "validation" and calibration["examples"] == 100
    report = calibration["targets"]["sentiment"]
    assert report["temperature"] > 0 and report["ece_after"] <= report["ece_before"]
    (event,) = [e for e in job["events"] if e["name"] == "calibration"]
    assert event["data"] == calibration

    model = job["fine_tuned_model"]
    parts = model.split(":")
    assert parts[:3] == ["ft", "classifier", "local-ngram"]
    assert len(parts[3]) == 8 and int(parts[3], 16) >= 0
    assert parts[4] == time.strftime("%Y%m%d", time.gmtime(job["created_at"]))
    assert parts[5] == created["id"].replace("-", "")[:8]

    r = factory.http.post("/v1/classifications", json={
        "model": model, "input": ["the film was wonderful, really great", "awful and broken"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["id"]) == 32 and body["model"] == model
    first, second = (res["sentiment"]["scores"] for res in body["results"])
    assert set(first) == {"negative", "positive"}
    assert math.isclose(sum(first.values()), 1.0, abs_tol=1e-4)
    assert first["positive"] > 0.5 > second["positive"]
    single = factory.http.post("/v1/classifications", json={"model": model, "input": "great"})
    assert len(single.json()["results"]) == 1


def test_chat_job_with_auto_start_false_waits_for_start(factory: FactoryClient) -> None:
    file = factory.upload(jsonl(chat_rows(120)), name="chat.jsonl")
    created = factory.create_job(file["id"], auto_start=False)
    job = factory.wait(created["id"], statuses=("VALIDATED", "FAILED_VALIDATION"))
    assert job["status"] == "VALIDATED"
    time.sleep(0.3)
    assert factory.job(created["id"])["status"] == "VALIDATED"
    started = factory.http.post(f"/v1/fine_tuning/jobs/{created['id']}/start")
    assert started.status_code == 200
    job = factory.wait(created["id"])
    assert job["status"] == "SUCCESS"
    statuses = [e["data"]["status"] for e in job["events"] if e["name"] == "status-updated"]
    assert statuses == ["QUEUED", "VALIDATING", "VALIDATED", "RUNNING", "SUCCESS"]
    again = factory.http.post(f"/v1/fine_tuning/jobs/{created['id']}/start")
    _assert_mistral_error(again, 409, "SUCCESS")

    r = factory.http.post("/v1/chat/classifications", json={
        "model": job["fine_tuned_model"],
        "input": [{"messages": [{"role": "user", "content": "will it rain tomorrow"}]},
                  {"messages": [{"role": "user", "content": "hello there"},
                                {"role": "assistant", "content": "hi!", "prefix": False}]}],
    })
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    weather, greet = (res["intent"]["scores"] for res in results)
    assert max(weather, key=weather.__getitem__) == "weather"
    assert max(greet, key=greet.__getitem__) == "greet"
    assert set(weather) == {"greet", "order", "weather"}


def test_multi_label_target_gives_independent_probabilities(factory: FactoryClient) -> None:
    rows = []
    for i in range(150):
        tags = [t for t, on in (("food", i % 2 == 0), ("drink", i % 3 == 0)) if on] or ["other"]
        words = " ".join({"food": "pizza pasta", "drink": "coffee tea", "other": "weather"}[t]
                         for t in tags)
        rows.append({"text": f"{words} number {i}",
                     "labels": {"tags": tags, "mood": "good" if i % 5 else "bad"}})
    job = factory.train(jsonl(rows))
    targets = {t["name"]: t for t in job["classifier_targets"]}
    assert targets["tags"]["loss_function"] == "multi_class"
    assert targets["tags"]["labels"] == ["drink", "food", "other"]
    assert targets["mood"]["loss_function"] == "single_class"
    r = factory.http.post("/v1/classifications", json={
        "model": job["fine_tuned_model"], "input": ["pizza pasta coffee tea number 1000"]})
    result = r.json()["results"][0]
    tags = result["tags"]["scores"]
    assert tags["food"] > 0.5 and tags["drink"] > 0.5 and tags["other"] < 0.5
    assert sum(tags.values()) > 1.2  # independent sigmoids, not a softmax
    assert math.isclose(sum(result["mood"]["scores"].values()), 1.0, abs_tol=1e-4)


def test_bad_jsonl_fails_validation_with_line_numbers(factory: FactoryClient) -> None:
    rows: list[object] = list(sentiment_rows(6))
    rows[1] = b"{not json"
    rows[3] = {"text": "x", "labels": {}}
    rows[4] = {"messages": [{"role": "robot", "content": "x"}], "labels": {"a": "b"}}
    file = factory.upload(jsonl(rows))
    job = factory.wait(factory.create_job(file["id"])["id"])
    assert job["status"] == "FAILED_VALIDATION"
    assert job["fine_tuned_model"] is None
    errors = next(e for e in job["events"] if e["name"] == "validation-errors")["data"]
    assert errors["error_count"] == 3
    assert [e.split(", ", 1)[1].split(":")[0] for e in errors["errors"]] == [
        "line 2", "line 4", "line 5"]
    assert "not valid JSON" in errors["errors"][0]
    assert "line 2" in job["error"]
    failed = [e for e in job["events"] if e["data"].get("status") == "FAILED_VALIDATION"]
    assert failed and "line 2" in failed[0]["data"]["reason"]


def test_invalid_samples_under_the_skip_percentage_are_skipped(factory: FactoryClient) -> None:
    rows: list[object] = list(sentiment_rows(40))
    rows[7] = b"oops"
    file = factory.upload(jsonl(rows))
    job = factory.wait(factory.create_job(file["id"], invalid_sample_skip_percentage=0.05)["id"])
    assert job["status"] == "SUCCESS"
    assert any(e["name"] == "validation-errors" for e in job["events"])


def test_duplicate_job_in_flight_is_409(factory: FactoryClient) -> None:
    file = factory.upload(jsonl(sentiment_rows(50)))
    first = factory.create_job(file["id"], auto_start=False)
    r = factory.http.post("/v1/fine_tuning/jobs", json={
        "model": "local-ngram", "training_files": [file["id"]],  # plain ids work too
        "hyperparameters": {"training_steps": 100, "learning_rate": 4e-5}})
    body = _assert_mistral_error(r, 409, first["id"])
    assert body["code"] == "duplicate_job"
    other = factory.create_job(file["id"], suffix="other")
    assert other["id"] != first["id"]


def test_dry_run_returns_metadata_and_creates_nothing(factory: FactoryClient) -> None:
    file = factory.upload(jsonl(sentiment_rows(512)))
    r = factory.http.post("/v1/fine_tuning/jobs", params={"dry_run": "true"}, json={
        "model": "local-ngram", "training_files": [{"file_id": file["id"]}],
        "hyperparameters": {"epochs": 30}})
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["object"] == "job.metadata" and meta["training_steps"] == 30
    assert meta["details"]
    assert factory.http.get("/v1/fine_tuning/jobs").json()["total"] == 0


def test_job_errors(factory: FactoryClient) -> None:
    file = factory.upload(jsonl(sentiment_rows(10)))
    base = {"training_files": [file["id"]], "hyperparameters": {"training_steps": 5}}
    r = factory.http.post("/v1/fine_tuning/jobs", json={**base, "model": "gpt-4"})
    assert _assert_mistral_error(r, 404, "gpt-4")["param"] == "model"
    r = factory.http.post("/v1/fine_tuning/jobs", json={**base, "model": "ministral-3b-latest",
                                                        "training_files": ["nope"]})
    _assert_mistral_error(r, 404, "no file 'nope'")
    r = factory.http.post("/v1/fine_tuning/jobs", json={**base, "model": "ministral-3b-latest",
                                                        "hyperparameter": {}})
    assert r.status_code == 422
    assert any(d["loc"][-1] == "hyperparameter" for d in r.json()["detail"])
    r = factory.http.post("/v1/fine_tuning/jobs", json={
        **base, "model": "ministral-3b-latest", "hyperparameters": {"learning_rate": 2}})
    assert r.status_code == 422
    _assert_mistral_error(factory.http.get("/v1/fine_tuning/jobs/unknown"), 404, "unknown")
    _assert_mistral_error(factory.http.post("/v1/fine_tuning/jobs/unknown/cancel"), 404,
                          "unknown")


def test_classification_errors(factory: FactoryClient) -> None:
    r = factory.http.post("/v1/classifications", json={"model": "ft:classifier:nope",
                                                       "input": "x"})
    body = _assert_mistral_error(r, 404, "ft:classifier:nope")
    assert body["code"] == "unknown_model" and body["param"] == "model"
    r = factory.http.post("/v1/classifications", json={"model": "ministral-3b-latest",
                                                       "input": "x"})
    _assert_mistral_error(r, 404, "base model")
    r = factory.http.post("/v1/classifications", json={"model": "m", "inputs": ["x"]})
    assert r.status_code == 422
    locs = [d["loc"] for d in r.json()["detail"]]
    assert ["body", "input"] in locs and ["body", "inputs"] in locs
    # Beside the detail list (Mistral's shape, what the SDK reads), a message in plain words.
    assert r.json()["message"] == "`input` is missing; `inputs` is not a field here"
    r = factory.http.post("/v1/chat/classifications", json={"model": "m", "input": [
        {"messages": [{"role": "robot", "content": "x"}]}]})
    assert r.status_code == 422
    assert r.json()["message"] == ("`input[0].messages[0].role` must be 'system', 'user', "
                                   "'assistant' or 'tool', not 'robot'")


def test_limits_on_classification(tmp_path: Path) -> None:
    with running_factory(tmp_path / "d", max_classify_items=3, max_input_chars=50) as server:
        client = FactoryClient(server.url)
        model = client.train(jsonl(sentiment_rows(40)))["fine_tuned_model"]
        r = client.http.post("/v1/classifications", json={"model": model, "input": ["a"] * 4})
        assert _assert_mistral_error(r, 413, "limit is 3")["param"] == "input"
        r = client.http.post("/v1/classifications", json={"model": model, "input": ["a" * 51]})
        _assert_mistral_error(r, 413, "limit is 50")


def test_cancel_mid_training(factory: FactoryClient) -> None:
    file = factory.upload(jsonl(sentiment_rows(300)))
    created = factory.create_job(file["id"], **LONG_JOB)
    factory.wait(created["id"], statuses=("RUNNING",), timeout_s=30)
    time.sleep(0.5)
    r = factory.http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] in ("CANCELLATION_REQUESTED", "CANCELLED")
    job = factory.wait(created["id"], timeout_s=10)
    assert job["status"] == "CANCELLED"
    statuses = [e["data"]["status"] for e in job["events"] if e["name"] == "status-updated"]
    assert statuses[-2:] == ["CANCELLATION_REQUESTED", "CANCELLED"]
    assert job["fine_tuned_model"] is None
    _assert_mistral_error(factory.http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel"),
                          409, "CANCELLED")
    # The slot is free again: the next job trains.
    assert factory.train(jsonl(sentiment_rows(60)))["status"] == "SUCCESS"


def test_one_job_at_a_time_the_rest_queued(factory: FactoryClient) -> None:
    file = factory.upload(jsonl(sentiment_rows(200)))
    long = factory.create_job(file["id"], **LONG_JOB)
    factory.wait(long["id"], statuses=("RUNNING",), timeout_s=30)
    queued = factory.create_job(file["id"], suffix="second")
    time.sleep(0.5)
    assert factory.job(queued["id"])["status"] == "QUEUED"
    listing = factory.http.get("/v1/fine_tuning/jobs", params={"status": "QUEUED"}).json()
    assert [j["id"] for j in listing["data"]] == [queued["id"]] and listing["total"] == 1
    cancelled = factory.http.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel").json()
    assert cancelled["status"] == "CANCELLED"
    factory.http.post(f"/v1/fine_tuning/jobs/{long['id']}/cancel")
    assert factory.wait(long["id"])["status"] == "CANCELLED"


def test_models_list_retrieve_delete(factory: FactoryClient) -> None:
    model = factory.train(jsonl(sentiment_rows(40)))["fine_tuned_model"]
    cards = factory.http.get("/v1/models").json()
    assert cards["object"] == "list"
    by_id = {c["id"]: c for c in cards["data"]}
    assert by_id["ministral-3b-latest"]["type"] == "base"
    assert by_id["ministral-3b-latest"]["served_by"] in ("local-minilm", "local-ngram")
    assert by_id["local-ngram"]["capabilities"]["classification"] is True
    assert by_id["local-ngram"]["available"] is True
    assert by_id[model]["type"] == "fine-tuned" and by_id[model]["root"] == "local-ngram"
    assert factory.http.get(f"/v1/models/{model}").json()["id"] == model
    assert factory.http.delete(f"/v1/models/{model}").json() == {
        "id": model, "object": "model", "deleted": True}
    r = factory.http.post("/v1/classifications", json={"model": model, "input": "x"})
    _assert_mistral_error(r, 404, model)
    _assert_mistral_error(factory.http.delete(f"/v1/models/{model}"), 404, model)
    _assert_mistral_error(factory.http.delete("/v1/models/local-ngram"), 400, "base model")


def test_metrics_and_health(factory: FactoryClient) -> None:
    model = factory.train(jsonl(sentiment_rows(40)))["fine_tuned_model"]
    factory.http.post("/v1/classifications", json={"model": model, "input": ["a", "b", "c"]})
    assert factory.http.get("/healthz").json()["status"] == "ok"
    text = factory.http.get("/metrics").text
    assert 'factory_jobs_total{status="SUCCESS"} 1.0' in text
    assert 'factory_jobs_total{status="FAILED_VALIDATION"} 0.0' in text
    assert "factory_jobs_running 0.0" in text
    assert 'factory_classify_items_total{endpoint="classifications"} 3.0' in text
    assert 'factory_classify_duration_seconds_count{endpoint="classifications"} 1.0' in text


def test_api_key(tmp_path: Path) -> None:
    with running_factory(tmp_path / "d", api_key="s3cret-key") as server:
        anonymous = httpx.get(f"{server.url}/v1/models")
        body = _assert_mistral_error(anonymous, 401, "Authorization: Bearer")
        assert "s3cret" not in anonymous.text and body["type"] == "authentication_error"
        wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert "s3cret" not in httpx.get(f"{server.url}/metrics").text


def test_restart_keeps_files_jobs_and_models(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_factory(data_dir) as server:
        client = FactoryClient(server.url)
        job = client.train(jsonl(sentiment_rows(60)))
        r = client.http.post("/v1/classifications", json={"model": job["fine_tuned_model"],
                                                          "input": ["great", "awful"]})
        before = r.json()["results"]
        client.close()
    with running_factory(data_dir) as server:
        client = FactoryClient(server.url)
        assert client.http.get("/v1/files").json()["total"] == 1
        again = client.job(job["id"])
        assert again["status"] == "SUCCESS" and again["events"] == job["events"]
        assert again["checkpoints"] == job["checkpoints"]
        r = client.http.post("/v1/classifications", json={"model": job["fine_tuned_model"],
                                                          "input": ["great", "awful"]})
        assert r.json()["results"] == before
        client.close()


def test_validation_errors_keep_only_the_first_twenty(factory: FactoryClient) -> None:
    rows: list[object] = [b"nope"] * 30 + list(sentiment_rows(10))
    file = factory.upload(jsonl(rows))
    job = factory.wait(factory.create_job(file["id"])["id"])
    assert job["status"] == "FAILED_VALIDATION"
    errors = next(e for e in job["events"] if e["name"] == "validation-errors")["data"]
    assert errors["error_count"] == 30 and len(errors["errors"]) == 20
    assert orjson.dumps(job)  # serialisable as is


def test_wandb_key_is_never_echoed(factory: FactoryClient) -> None:
    file = factory.upload(jsonl(sentiment_rows(20)))
    secret = "k" * 40
    job = factory.create_job(file["id"], auto_start=False, integrations=[
        {"type": "wandb", "project": "p", "api_key": secret}])
    assert job["integrations"] == [{"type": "wandb", "project": "p"}]
    assert secret not in factory.http.get(f"/v1/fine_tuning/jobs/{job['id']}").text
    assert secret not in factory.http.get("/v1/fine_tuning/jobs").text


def test_oversize_upload_without_content_length_is_413(factory: FactoryClient) -> None:
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    line = jsonl(sentiment_rows(1))

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(400_000 // len(line)):
            yield line
        yield f"\r\n--{boundary}--\r\n".encode()

    r = factory.http.post("/v1/files", content=body(),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in r.request.headers
    _assert_mistral_error(r, 413, "200000 bytes")
    assert factory.http.get("/v1/files").json()["total"] == 0


def test_shutdown_during_training_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with running_factory(data_dir) as server:
        client = FactoryClient(server.url)
        file = client.upload(jsonl(sentiment_rows(200)))
        job = client.create_job(file["id"], **LONG_JOB)
        client.wait(job["id"], statuses=("RUNNING",), timeout_s=30)
        queued = client.create_job(file["id"], suffix="next", auto_start=False)
        client.close()
    with running_factory(data_dir) as server:
        client = FactoryClient(server.url)
        stopped = client.job(job["id"])
        assert stopped["status"] == "FAILED"
        assert "shut down while this job was RUNNING" in stopped["error"]
        assert client.wait(queued["id"], statuses=("VALIDATED",))["status"] == "VALIDATED"
        client.close()
