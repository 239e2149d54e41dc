"""Fan-out (issue 23, §3): one `/classify` or `/classify-chat` call naming several tasks, end to end:
a real gateway and Redis in front of the fake upstream (the "dead" upstream is a closed port, so a
task on it fails for real)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_cascade import cached
from tests.support.fake_upstream import FakeUpstream, running_fake_upstream
from tests.support.gateway import gateway_for
from tests.support.redis_server import RedisServer

TARGETS = {"moderation": ["ok", "flagged"], "intent": ["buy", "cancel", "other"],
           "language": ["en", "fr"]}
CONVERSATION = {"messages": [{"role": "user", "content": "where is my order?"}]}


def tasks_file(fake: FakeUpstream) -> tuple[dict[str, Any], dict[str, Any]]:
    upstreams = {"local": {"base_url": str(fake.url)}, "dead": {"base_url": "http://127.0.0.1:9"}}
    tasks = {
        "moderation": {"upstream": "local", "model": "ft:moderation", "feedback": True},
        "intent": {"upstream": "local", "model": "ft:intent", "multi_label_targets": ["intent"],
                   "threshold": 0.3},
        "language": {"upstream": "local", "model": "ft:language"},
        "broken": {"upstream": "dead", "model": "ft:broken", "target": "moderation"},
        "broken2": {"upstream": "dead", "model": "ft:broken2", "target": "moderation"},
        "chat_intent": {"upstream": "local", "model": "ft:chat", "kind": "chat",
                        "target": "intent"},
        "chat_language": {"upstream": "local", "model": "ft:chat-lang", "kind": "chat",
                          "target": "language"},
    }
    return upstreams, tasks


@contextlib.contextmanager
def gateway(tmp_path: Path, redis: RedisServer, prefix: str | None = None,
            **settings: Any) -> Iterator[tuple[str, FakeUpstream]]:
    with running_fake_upstream(TARGETS) as fake:
        upstreams, tasks = tasks_file(fake)
        with gateway_for(tmp_path, redis.url, upstreams, tasks, retry_attempts=1,
                         cache_prefix=prefix or f"test:{uuid.uuid4().hex[:8]}",
                         **settings) as url:
            yield url, fake


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != "id"}


async def test_answers_equal_separate_calls_and_run_concurrently(
        tmp_path: Path, redis_server: RedisServer) -> None:
    texts = ["I want to cancel", "buy two more", "bonjour"]
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    with gateway(tmp_path, redis_server, prefix) as (url, fake):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            fake.delay_s = 0.4
            started = asyncio.get_running_loop().time()
            r = await client.post("/classify", json={"tasks": ["moderation", "intent", "language"],
                                                     "input": texts})
            elapsed = asyncio.get_running_loop().time() - started
            fake.delay_s = 0.0
            assert r.status_code == 200, r.text
            assert r.headers["x-cache"] == "miss"
            assert r.headers["x-model"] == "ft:moderation, ft:intent, ft:language"
            answers = r.json()["tasks"]
            assert list(answers) == ["moderation", "intent", "language"]
            # One upstream call per task (its own batching lane), all three at once.
            assert sorted(call.model for call in fake.calls) == [
                "ft:intent", "ft:language", "ft:moderation"]
            assert elapsed < 1.1, elapsed  # 3 x 0.4 s in sequence
            # The fan-out filled each task's cache: 3 items x 3 tasks, under each task's model.
            await cached(redis_server.url, prefix, 9)
            again = await client.post("/classify", json={
                "tasks": ["moderation", "intent", "language"], "input": texts})
            assert again.headers["x-cache"] == "hit"
            assert len(fake.calls) == 3
            for name, answer in answers.items():
                alone = await client.post("/classify", json={"task": name, "input": texts})
                assert alone.headers["x-cache"] == "hit"
                assert without_ids(answer) == without_ids(alone.json())
                assert without_ids(again.json()["tasks"][name]) == without_ids(answer)
                assert len(answer["id"]) == 32
            metrics = (await client.get("/metrics")).text
    assert re.search(r'gateway_requests_total\{route="/classify",status="200",task="\(fanout\)"\} '
                     r'[1-9]', metrics)
    assert re.search(r'gateway_model_items_total\{model="ft:intent",task="intent"\} [1-9]', metrics)


async def test_chat_tasks_fan_out_too(tmp_path: Path, redis_server: RedisServer) -> None:
    with gateway(tmp_path, redis_server) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify-chat", json={
                "tasks": ["chat_intent", "chat_language"], "input": [CONVERSATION]})
            alone = await client.post("/classify-chat", json={"task": "chat_language",
                                                              "input": CONVERSATION})
    assert r.status_code == 200, r.text
    assert without_ids(r.json()["tasks"]["chat_language"]) == without_ids(alone.json())
    assert r.json()["tasks"]["chat_intent"]["results"][0]["intent"]["label"] in TARGETS["intent"]


async def test_a_failing_task_holds_its_error_and_the_call_answers_200(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with gateway(tmp_path, redis_server) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify", json={"tasks": ["moderation", "broken"],
                                                     "input": "hello"})
            alone = await client.post("/classify", json={"task": "broken", "input": "hello"})
    assert r.status_code == 200, r.text
    answers = r.json()["tasks"]
    assert answers["moderation"]["results"][0]["moderation"]["label"] in TARGETS["moderation"]
    assert alone.status_code == 503
    assert answers["broken"] == alone.json()  # today's error shape, as the task alone answers
    assert r.headers["x-model"] == "ft:moderation"


async def test_the_call_fails_only_when_every_task_fails(tmp_path: Path,
                                                         redis_server: RedisServer) -> None:
    with gateway(tmp_path, redis_server) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify", json={"tasks": ["broken", "broken2"],
                                                     "input": "hello"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "upstream_unavailable"
    message = r.json()["error"]["message"]
    assert message.startswith("Every task failed: broken: ") and "broken2: " in message
    assert "retry-after" in r.headers


async def test_a_slow_task_times_out_alone(tmp_path: Path, redis_server: RedisServer) -> None:
    """Each task keeps its own deadline: the short one gives up, the other still answers."""
    with running_fake_upstream(TARGETS) as fake:
        upstreams, tasks = tasks_file(fake)
        tasks["language"]["timeout_s"] = 0.3
        with gateway_for(tmp_path, redis_server.url, upstreams, tasks) as url:
            fake.delay_s = 0.8
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                r = await client.post("/classify", json={"tasks": ["moderation", "language"],
                                                         "input": "b"})
    assert r.status_code == 200, r.text
    answers = r.json()["tasks"]
    assert answers["language"]["error"]["type"] == "upstream_timeout"
    assert answers["moderation"]["model"] == "ft:moderation"


async def test_feedback_names_a_fan_out_answer_by_its_tasks_id(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Each task's entry is a response of its own: POST /feedback takes its id."""
    with gateway(tmp_path, redis_server) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify", json={"tasks": ["intent", "moderation"],
                                                     "input": ["one", "two"]})
            rid = r.json()["tasks"]["moderation"]["id"]
            stored = await client.post("/feedback", json={
                "id": rid, "index": 1, "labels": {"moderation": "flagged"}})
            wrong = await client.post("/feedback", json={
                "id": r.json()["tasks"]["intent"]["id"], "index": 0,
                "labels": {"intent": ["buy"]}})
    assert stored.status_code == 200, stored.text
    assert stored.json()["task"] == "moderation"
    assert wrong.status_code == 404  # intent keeps no responses (no `feedback: true`)


@pytest.mark.parametrize(("path", "body", "status", "needle", "loc"), [
    ("/classify", {"tasks": ["moderation"] * 3, "input": "x"}, 413,
     "tasks names 3 tasks; the limit is 2 per request (GATEWAY_MAX_FANOUT)", None),
    ("/classify", {"tasks": ["moderation", "nope"], "input": "x"}, 404,
     "Unknown task tasks[1] 'nope'; known tasks: broken, broken2, chat_intent", None),
    ("/classify", {"tasks": ["moderation", "moderation"], "input": "x"}, 422,
     "tasks[1] repeats 'moderation' (already tasks[0])", ["body", "tasks", 1]),
    ("/classify", {"tasks": ["moderation", "chat_intent"], "input": "x"}, 400,
     "tasks mixes text tasks (moderation) with chat tasks (chat_intent)", None),
    ("/classify", {"tasks": ["chat_intent"], "input": "x"}, 400,
     "tasks chat_intent classify chat inputs; send them to /classify-chat", None),
    ("/classify-chat", {"tasks": ["chat_intent", "intent"], "input": CONVERSATION}, 400,
     "tasks mixes chat tasks (chat_intent) with text tasks (intent)", None),
    ("/classify", {"task": "moderation", "tasks": ["intent"], "input": "x"}, 400,
     "both `task` and `tasks`", None),
    ("/classify", {"input": "x"}, 422, "send `task` (one task name) or `tasks`",
     ["body", "task"]),
    ("/classify", {"tasks": [], "input": "x"}, 422, "`tasks` must not be empty", None),
    ("/classify", {"tasks": ["moderation"], "input": ["ok", ""]}, 422,
     "input[1] is an empty string", ["body", "input"]),
])
async def test_bad_fan_out_calls_get_a_4xx_naming_the_field(
        tmp_path: Path, redis_server: RedisServer, path: str, body: Any, status: int,
        needle: str, loc: list[Any] | None) -> None:
    with gateway(tmp_path, redis_server, max_fanout=2) as (url, fake):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"], r.text
    if loc is not None:
        assert r.json()["detail"][0]["loc"] == loc
    assert fake.calls == []  # nothing was sent upstream


def test_the_python_example_of_the_docs(tmp_path: Path, redis_server: RedisServer) -> None:
    """The call docs/api.md shows, with the plain httpx client it uses."""
    with gateway(tmp_path, redis_server) as (url, _):
        answer = httpx.post(f"{url}/classify", timeout=30, json={
            "tasks": ["moderation", "intent"], "input": ["I want to cancel my order"]}).json()
    for name, result in answer["tasks"].items():
        assert "error" not in result, (name, result)
    assert answer["tasks"]["intent"]["results"][0]["intent"]["labels"] is not None
