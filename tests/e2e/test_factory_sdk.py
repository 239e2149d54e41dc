"""The official SDKs against a running factory, and the factory as a real process that crashes.

`mistralai==2.5.1` (the last with `fine_tuning.jobs`) runs the whole flow in a child interpreter
(it is cached under `.cache/mistralai-2.5.1`, never installed into the environment); the current
`mistralai` (3.x, classification only) runs here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import HTTPValidationError, SDKError

from tests.support.factory import (
    LONG_JOB,
    REPO,
    FactoryClient,
    FactoryProcess,
    chat_rows,
    jsonl,
    run_with_sdk_251,
    running_factory,
    sentiment_rows,
)

KEY = "factory-test-key"
WANDB_KEY = "sdk-flow-wandb-key-" + "0" * 24  # as factory_sdk251_flow.py
FLOW = REPO / "tests" / "support" / "factory_sdk251_flow.py"


@pytest.fixture(scope="module")
def factory_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_factory(tmp_path_factory.mktemp("factory"), api_key=KEY) as server:
        yield server.url


@pytest.fixture(scope="module")
def flow(factory_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("sdk-data")
    text, chat = directory / "text.jsonl", directory / "chat.jsonl"
    text.write_bytes(jsonl(sentiment_rows(400, seed=3)))
    chat.write_bytes(jsonl(chat_rows(150, seed=4)))
    result: dict[str, Any] = run_with_sdk_251(FLOW, factory_url, KEY, str(text), str(chat))
    return result


def test_sdk_251_runs_the_flow(flow: dict[str, Any]) -> None:
    assert flow["version"] == "2.5.1"
    assert isinstance(flow["file_bytes"], int) and flow["file_bytes"] > 0
    assert flow["created_type"] == "ClassifierFineTuningJob"
    assert flow["created_status"] == "QUEUED"
    text_job = flow["text_job"]
    assert text_job["type"] == "ClassifierFineTuningJobDetails"
    assert text_job["status"] == "SUCCESS"
    assert text_job["events"] == ["QUEUED", "VALIDATING", "VALIDATED", "RUNNING", "SUCCESS"]
    assert text_job["model"].startswith("ft:classifier:local-ngram:")
    assert text_job["targets"] == [{"name": "sentiment", "labels": ["negative", "positive"],
                                    "weight": 1.0, "loss_function": "single_class"}]
    assert all(c["metrics"]["valid_loss"] is not None for c in text_job["checkpoints"])
    assert flow["validated_status"] == "VALIDATED"
    assert flow["start_type"] == "ClassifierFineTuningJobDetails"
    assert flow["chat_job"]["status"] == "SUCCESS"
    assert flow["chat_job"]["events"] == ["QUEUED", "VALIDATING", "VALIDATED", "RUNNING",
                                          "SUCCESS"]
    # The W&B integration parses as the SDK's own type, without its key; with no W&B to reach,
    # the run went offline, to sync later.
    (integration,) = flow["chat_job"]["integrations"]
    assert integration["project"] == "sdk-flow" and "api_key" not in integration
    (event,) = flow["chat_job"]["integration_events"]
    assert event["type"] == "wandb" and event["status"] == "offline"
    assert event["sync"] == f"wandb sync {event['run_dir']}"
    assert WANDB_KEY not in orjson.dumps(flow).decode()


def test_sdk_251_classifies_with_the_trained_models(flow: dict[str, Any]) -> None:
    good, bad = (r["sentiment"] for r in flow["classify"])
    assert good["positive"] > 0.5 > bad["positive"]
    assert math.isclose(sum(good.values()), 1.0, abs_tol=1e-4)
    sunny, order = (r["intent"] for r in flow["classify_chat"])
    assert max(sunny, key=sunny.__getitem__) == "weather"
    assert max(order, key=order.__getitem__) == "order"


def test_sdk_251_lists_and_cancels(flow: dict[str, Any]) -> None:
    assert flow["list_total"] == 2
    assert flow["list_types"] == ["ClassifierFineTuningJob"]
    assert len(flow["list_suffix"]) == 1
    assert flow["cancel_status"] in ("CANCELLATION_REQUESTED", "CANCELLED")
    assert flow["cancel_final"] == "CANCELLED"
    kinds = dict(flow["models"])
    assert kinds["ministral-3b-latest"] == "base"
    assert kinds[flow["chat_job"]["model"]] == "fine-tuned"
    assert flow["model_get"] == flow["chat_job"]["model"]
    assert flow["files_total"] == 2 and flow["file_get"] is False


def test_current_sdk_classifies(factory_url: str, flow: dict[str, Any]) -> None:
    client = Mistral(api_key=KEY, server_url=factory_url)
    text_model, chat_model = flow["text_job"]["model"], flow["chat_job"]["model"]
    response = client.classifiers.classify(model=text_model, inputs=["wonderful and great"])
    scores = response.results[0]["sentiment"].scores
    assert scores["positive"] > 0.5 and response.model == text_model
    conversation: Any = {"messages": [{"role": "user", "content": "hello there"},
                                      {"role": "assistant", "content": "Hi! How can I help?"}]}
    chat = client.classifiers.classify_chat(model=chat_model, input=[conversation])
    intent = chat.results[0]["intent"].scores
    assert max(intent, key=intent.__getitem__) == "greet"
    models = client.models.list()
    ids = {getattr(m, "id", None) for m in models.data or []}
    assert ids >= {text_model, chat_model, "ministral-3b-latest"}


def test_current_sdk_sees_mistral_errors(factory_url: str) -> None:
    client = Mistral(api_key=KEY, server_url=factory_url)
    with pytest.raises(SDKError) as unknown:
        client.classifiers.classify(model="ft:classifier:unknown", inputs=["x"])
    assert unknown.value.status_code == 404
    assert "unknown_model" in unknown.value.body
    with pytest.raises(HTTPValidationError) as invalid:
        empty: Any = {"messages": []}
        client.classifiers.classify_chat(model="m", input=[empty])
    assert invalid.value.status_code == 422
    bad_key = Mistral(api_key="wrong", server_url=factory_url)
    with pytest.raises(SDKError) as unauthorized:
        bad_key.classifiers.classify(model="m", inputs=["x"])
    assert unauthorized.value.status_code == 401


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def test_running_job_at_crash_is_failed_with_the_reason(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process = FactoryProcess(data_dir).start()
    try:
        client = FactoryClient(process.url)
        done = client.train(jsonl(sentiment_rows(60)))
        file = client.upload(jsonl(sentiment_rows(300, seed=9)), name="long.jsonl")
        long = client.create_job(file["id"], **LONG_JOB)
        client.wait(long["id"], statuses=("RUNNING",), timeout_s=30)
        queued = client.create_job(file["id"], suffix="after-crash")
        client.close()
        process.kill()
        # The trainer dies with the factory (no orphan keeps a core busy).
        deadline = time.monotonic() + 10
        while _processes_mentioning(str(data_dir)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _processes_mentioning(str(data_dir))
        process.start()
        client = FactoryClient(process.url)
        crashed = client.job(long["id"])
        assert crashed["status"] == "FAILED"
        assert "stopped while this job was RUNNING" in crashed["error"]
        assert crashed["events"][-1]["data"]["status"] == "FAILED"
        assert "RUNNING" in crashed["events"][-1]["data"]["reason"]
        # What was queued survives and runs; what was trained still answers.
        assert client.wait(queued["id"])["status"] == "SUCCESS"
        r = client.http.post("/v1/classifications",
                             json={"model": done["fine_tuned_model"], "input": "great"})
        assert r.status_code == 200
        metrics = client.http.get("/metrics").text
        assert 'factory_jobs_total{status="FAILED"} 1.0' in metrics
        client.close()
    finally:
        process.stop()



def test_sdk_251_flow_fine_tunes_the_encoder(factory_url: str, tmp_path: Path) -> None:
    """Mistral's documented flow with Mistral's model name, which means the fine-tuned encoder
    (`local-minilm`) when the encoder extra is installed, as in CI. One flow, not one per name:
    the SDK sends the name through untouched, and training `local-minilm` by its own name is
    what the CLI, demo and API tests do (a second flow cost ~80-130 s of a CI worker)."""
    base_model = "ministral-3b-latest"
    data = tmp_path / "text.jsonl"
    data.write_bytes(jsonl(sentiment_rows(200, seed=5)))
    flow: dict[str, Any] = run_with_sdk_251(FLOW, "minimal", factory_url, KEY, str(data),
                                            base_model, timeout_s=600)
    assert flow["status"] == "SUCCESS", flow
    assert flow["model"].startswith(f"ft:classifier:{base_model}:")
    devices = [data for name, data in flow["events"] if name == "device"]
    assert devices and devices[0]["device"] == "cpu"
    losses = [c["metrics"]["train_loss"] for c in flow["checkpoints"]]
    assert len(losses) >= 2 and all(loss > 0 for loss in losses)
    positive, negative = flow["classify"]
    assert positive["sentiment"]["positive"] > 0.5 and negative["sentiment"]["negative"] > 0.5
    # SDK 2.5.1 drops fields it does not know: read the base models' cards over plain HTTP.
    cards = {name: httpx.get(f"{factory_url}/v1/models/{name}",
                             headers={"Authorization": f"Bearer {KEY}"}).json()
             for name in (base_model, "local-minilm")}
    assert cards[base_model]["served_by"] == "local-minilm"
    assert cards["local-minilm"]["available"] is True
