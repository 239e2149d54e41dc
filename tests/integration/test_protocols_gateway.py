"""The gateway in front of servers that speak other protocols than Mistral's, and fallbacks
between them: a real gateway and Redis, faithful fakes of TEI and vLLM (tests/support/
fake_inference.py) and the Mistral-speaking fake upstream, all on loopback ports. The caller's
API stays the same whatever serves the task."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_inference import FakeServer, expected, running_tei, running_vllm
from tests.support.fake_upstream import Status, running_fake_upstream
from tests.support.gateway import gateway_for
from tests.support.redis_server import RedisServer, free_port

SENTIMENT = ("negative", "neutral", "positive")
TOXICITY = ("clean", "toxic")


@contextlib.contextmanager
def gateway(tmp_path: Path, redis: RedisServer, upstreams: dict[str, Any],
            tasks: dict[str, Any], **settings: Any) -> Iterator[str]:
    with gateway_for(tmp_path, redis.url, upstreams, tasks, **settings) as url:
        yield url


async def post(url: str, path: str, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return await client.post(path, json=body)


def sent_texts(fake: FakeServer) -> list[str]:
    out: list[str] = []
    for call in fake.calls:
        if "inputs" in call:  # TEI
            out += [sequence[0] for sequence in call["inputs"]]
        else:
            out += call["input"]
    return out


async def test_tei_task_splits_batches_to_the_servers_limit_and_names_its_target(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with running_tei(SENTIMENT, max_client_batch_size=4) as tei, gateway(
            tmp_path, redis_server, {"tei": {"base_url": tei.url, "protocol": "tei"}},
            {"mood": {"upstream": "tei", "model": "sentiment-v3", "target": "sentiment"}}) as gw:
        texts = [f"review number {i}" for i in range(10)]
        r = await post(gw, "/classify", {"task": "mood", "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "sentiment-v3" and r.headers["x-model"] == "sentiment-v3"
        for text, result in zip(texts, body["results"], strict=True):
            scores = expected(text, SENTIMENT)
            assert result == {"sentiment": {"scores": pytest.approx(scores),
                                            "label": max(scores, key=scores.__getitem__)}}
        # TEI's /info said 4 a call: 10 items went as 4 + 4 + 2, each text its own sequence.
        assert sorted(len(call["inputs"]) for call in tei.calls) == [2, 4, 4]
        assert sorted(sent_texts(tei)) == sorted(texts)
        assert all(call["truncate"] is True for call in tei.calls)
        # The Mistral-compatible route answers in Mistral's shape from the same task.
        r = await post(gw, "/v1/classifications", {"model": "mood", "input": "fine"})
        assert r.json()["results"] == [{"sentiment": {"scores": pytest.approx(
            expected("fine", SENTIMENT))}}]
        described = (await httpx.AsyncClient().get(f"{gw}/tasks/mood")).json()
        assert described["upstream"]["protocol"] == "tei"
        assert described["target"] == "sentiment"


async def test_vllm_chat_task_renders_conversations_and_names_probabilities_by_labels(
        tmp_path: Path, redis_server: RedisServer) -> None:
    conversation = {"messages": [{"role": "user", "content": "you are awful"},
                                 {"role": "assistant", "content": "sorry"}]}
    rendered = "user: you are awful\nassistant: sorry"
    with running_vllm(TOXICITY) as vllm, gateway(
            tmp_path, redis_server, {"vllm": {"base_url": f"{vllm.url}/v1", "protocol": "vllm"}},
            {"tox": {"upstream": "vllm", "model": "vllm-model", "kind": "chat",
                     "labels": list(TOXICITY), "multi_label_targets": ["tox"],
                     "threshold": 0.4}}) as gw:
        r = await post(gw, "/classify-chat", {"task": "tox", "input": conversation})
        assert r.status_code == 200, r.text
        scores = expected(rendered, TOXICITY)
        assert r.json()["results"] == [{"tox": {
            "scores": pytest.approx(scores),
            "labels": sorted((k for k, v in scores.items() if v >= 0.4), key=lambda k: -scores[k])}}]
        assert vllm.calls == [{"model": "vllm-model", "input": [rendered]}]


async def test_a_failing_primary_falls_back_and_the_cache_keys_by_the_model_that_answered(
        tmp_path: Path, redis_server: RedisServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every attempt is refused
    with running_tei(TOXICITY) as tei, gateway(
            tmp_path, redis_server,
            {"vllm": {"base_url": dead, "protocol": "vllm"},
             "tei": {"base_url": tei.url, "protocol": "tei"}},
            {"tox": {"upstream": "vllm", "model": "tox-v4", "labels": list(TOXICITY),
                     "fallbacks": [{"upstream": "tei", "model": "tox-v3"}]}}) as gw:
        r = await post(gw, "/classify", {"task": "tox", "input": ["hello", "world"]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tox-v3"
        assert r.headers["x-model"] == "tox-v3" and r.headers["x-fallback-from"] == "tox-v4"
        assert r.json()["results"][0]["tox"]["scores"] == pytest.approx(expected("hello", TOXICITY))
        assert len(tei.calls) == 1
        # Cached under the fallback's model: a repeat is a hit, still reported as tox-v3.
        r = await post(gw, "/classify", {"task": "tox", "input": ["hello", "world"]})
        assert (r.json()["model"], r.headers["x-cache"]) == ("tox-v3", "hit")
        assert len(tei.calls) == 1
        metrics = (await httpx.AsyncClient().get(f"{gw}/metrics")).text
        assert 'gateway_fallbacks_total{result="ok",task="tox",upstream="tei"} 2.0' in metrics


async def test_a_fallback_never_hides_a_4xx_caused_by_the_request(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with running_vllm(TOXICITY) as vllm, running_tei(TOXICITY) as tei, gateway(
            tmp_path, redis_server,
            {"vllm": {"base_url": vllm.url, "protocol": "vllm"},
             "tei": {"base_url": tei.url, "protocol": "tei"}},
            {"tox": {"upstream": "vllm", "model": "vllm-model", "labels": list(TOXICITY),
                     "fallbacks": [{"upstream": "tei", "model": "tox-v3"}]}}) as gw:
        vllm.faults.append(400)
        r = await post(gw, "/classify", {"task": "tox", "input": "x"})
        assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_rejected"
        assert "injected" in r.json()["error"]["message"]
        assert tei.calls == []


async def test_every_fallback_failing_answers_with_each_reason(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with running_fake_upstream() as mistral, running_tei(TOXICITY) as tei, gateway(
            tmp_path, redis_server,
            {"factory": {"base_url": str(mistral.url)},
             "tei": {"base_url": tei.url, "protocol": "tei"}},
            {"tox": {"upstream": "factory", "model": "ft:tox",
                     "fallbacks": [{"upstream": "tei", "model": "tox-v3"}]}},
            retry_attempts=1) as gw:
        mistral.inject(Status(503))
        tei.faults.append(424)
        r = await post(gw, "/classify", {"task": "tox", "input": "x"})
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "its model and every fallback failed" in message
        assert "factory/ft:tox" in message and "tei/tox-v3" in message
        assert "Inference failed" in message
        # Both recovered: the task's own model answers again, and says so.
        r = await post(gw, "/classify", {"task": "tox", "input": "x"})
        assert r.status_code == 200 and r.json()["model"] == "ft:tox"
        assert "x-fallback-from" not in r.headers
