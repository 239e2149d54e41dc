"""Corrected labels and the review queue, end to end: a real gateway and Redis in front of the fake
Mistral-compatible upstream; the CLI's exports in process; what they write loads back through the
factory's own validation."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.cli import main
from service.factory.data import validate_file
from service.gateway.app import create_app
from service.gateway.settings import Settings
from tests.support.fake_upstream import expected_scores, running_fake_upstream
from tests.support.redis_server import RedisServer
from tests.support.servers import serve

TARGETS = {"sentiment": ["negative", "neutral", "positive"]}


@contextlib.contextmanager
def gateway(tasks_file: Path, redis_url: str, prefix: str) -> Iterator[str]:
    settings = Settings(tasks_file=tasks_file, redis_url=redis_url, cache_prefix=prefix,
                        retry_backoff_s=0.01, drain_timeout_s=2.0)
    with serve(create_app(settings)) as server:
        yield server.url


def write_tasks(path: Path, upstream_url: str) -> None:
    path.write_text(yaml.safe_dump({
        "upstreams": {"local": {"base_url": upstream_url}},
        "tasks": {"sentiment": {"upstream": "local", "model": "ft:v3", "feedback": True,
                                "review": {"max_margin": 0.2, "sample": 0.0}},
                  "intent": {"upstream": "local", "model": "ft:chat", "kind": "chat"}}}))


def margin(scores: dict[str, float]) -> float:
    top, second = sorted(scores.values(), reverse=True)[:2]
    return top - second


def cli(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


async def until(client: httpx.AsyncClient, path: str, count: int) -> dict[str, Any]:
    """The stream's page once it holds `count` entries (they are written off the response path)."""
    deadline = time.monotonic() + 10
    page: dict[str, Any] = (await client.get(path)).json()
    while len(page["entries"]) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        page = (await client.get(path)).json()
    return page


async def test_feedback_and_review_round_trip_through_a_restart_and_the_exports(
        tmp_path: Path, redis_server: RedisServer) -> None:
    tasks_file = tmp_path / "tasks.yaml"
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    texts = [f"order number {i} arrived" for i in range(60)]
    unsure = [t for t in texts if margin(expected_scores(t, TARGETS)["sentiment"]) < 0.2]
    assert 0 < len(unsure) < len(texts)  # the queue is a real selection, not all or nothing
    conversation = {"messages": [{"role": "user", "content": "book a table"}]}
    with running_fake_upstream(TARGETS) as fake:
        write_tasks(tasks_file, str(fake.url))
        with gateway(tasks_file, redis_server.url, prefix) as gw:
            async with httpx.AsyncClient(base_url=gw, timeout=30) as client:
                answer = (await client.post("/classify", json={"task": "sentiment",
                                                               "input": texts})).json()
                rid = answer["id"]
                # By response id and index.
                r = await client.post("/feedback", json={"id": rid, "index": 3,
                                                         "labels": {"sentiment": "neutral"}})
                assert r.status_code == 200, r.text
                assert r.json()["duplicate"] is False
                # The same item again, by its input this time: it replaces the first.
                r = await client.post("/feedback", json={"task": "sentiment", "input": texts[3],
                                                         "labels": {"sentiment": "positive"}})
                assert (r.status_code, r.json()["duplicate"]) == (200, True)
                r = await client.post("/feedback", json={"task": "intent", "input": conversation,
                                                         "labels": {"sentiment": "negative"}})
                assert r.status_code == 200, r.text
                # Bad input names the field.
                bad = [({"id": "nope", "index": 0, "labels": {"sentiment": "neutral"}}, 404,
                        "Unknown response id 'nope'"),
                       ({"id": rid, "index": 60, "labels": {"sentiment": "neutral"}}, 400,
                        "index: response"),
                       ({"id": rid, "index": 0, "labels": {"sentiment": "great"}}, 400,
                        "labels.sentiment: 'great' is not a label of the model"),
                       ({"id": rid, "index": 0, "labels": {"topic": "x"}}, 400,
                        "labels.topic: the model has no target 'topic'"),
                       ({"task": "sentiment", "input": conversation,
                         "labels": {"sentiment": "neutral"}}, 400, "input: task 'sentiment'"),
                       ({"id": rid, "task": "sentiment", "index": 0, "input": "x",
                         "labels": {"sentiment": "neutral"}}, 422, "either by `id`")]
                for body, status, message in bad:
                    r = await client.post("/feedback", json=body)
                    assert r.status_code == status, (body, r.text)
                    assert message in r.json()["error"]["message"], r.text
                review = await until(client, "/review/sentiment", len(unsure))
        # A new gateway process on the same Redis: everything acknowledged is still there.
        with gateway(tasks_file, redis_server.url, prefix) as gw:
            async with httpx.AsyncClient(base_url=gw, timeout=30) as client:
                page = (await client.get("/feedback/sentiment")).json()
            assert [(e["input"], e["labels"]) for e in page["entries"]] == [
                (texts[3], {"sentiment": "positive"})]
            out = tmp_path / "feedback.jsonl"
            assert "1 corrected example of task sentiment" in cli("feedback", "export", "--task", "sentiment",
                                                 "--out", str(out), "--gateway-url", gw)
            chat_out = tmp_path / "chat-feedback.jsonl"
            cli("feedback", "export", "--task", "intent", "--out", str(chat_out),
                "--gateway-url", gw)
            queue = tmp_path / "review.jsonl"
            cli("review", "export", "--task", "sentiment", "--out", str(queue),
                "--gateway-url", gw)
            studio = tmp_path / "review.json"
            cli("review", "export", "--task", "sentiment", "--format", "label-studio",
                "--out", str(studio), "--gateway-url", gw)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"text": texts[3], "labels": {"sentiment": "positive"}}]
    assert [json.loads(line) for line in chat_out.read_text().splitlines()] == [
        {"messages": conversation["messages"], "labels": {"sentiment": "negative"}}]
    for path in (out, chat_out, queue):
        report = validate_file(path)
        assert report.error_count == 0 and report.valid > 0, (path, report.to_dict())
    # The review queue is exactly the answers the model was unsure of, with its own answer.
    assert sorted(e["input"] for e in review["entries"]) == sorted(unsure)
    queued = [json.loads(line) for line in queue.read_text().splitlines()]
    assert sorted(q["text"] for q in queued) == sorted(unsure)
    for q in queued:
        scores = expected_scores(q["text"], TARGETS)["sentiment"]
        assert q["labels"] == {"sentiment": max(scores, key=scores.__getitem__)}
        assert q["reason"] == "low_margin" and q["margin"] == pytest.approx(margin(scores), abs=1e-6)
    tasks = json.loads(studio.read_text())
    assert len(tasks) == len(unsure)
    first = tasks[0]
    assert first["predictions"][0]["model_version"] == "ft:v3"
    assert first["predictions"][0]["result"][0]["from_name"] == "sentiment"
    assert first["data"]["text"] in unsure
    for studio_task in tasks:  # the model's own score of its answer; the margin named apart
        scores = expected_scores(studio_task["data"]["text"], TARGETS)["sentiment"]
        assert studio_task["predictions"][0]["score"] == pytest.approx(max(scores.values()),
                                                                       abs=1e-6)
        assert studio_task["data"]["margin"] == pytest.approx(margin(scores), abs=1e-6)


async def test_feedback_without_redis_says_what_to_set(tmp_path: Path) -> None:
    with running_fake_upstream(TARGETS) as fake:
        write_tasks(tmp_path / "tasks.yaml", str(fake.url))
        with gateway(tmp_path / "tasks.yaml", "", "test:none") as gw:
            async with httpx.AsyncClient(base_url=gw, timeout=30) as client:
                r = await client.post("/feedback", json={"task": "sentiment", "input": "x",
                                                         "labels": {"sentiment": "neutral"}})
    assert r.status_code == 503 and "GATEWAY_FEEDBACK_REDIS_URL" in r.json()["error"]["message"]


@pytest.mark.parametrize("setting", ["GATEWAY_FEEDBACK_REDIS_URL", "GATEWAY_REDIS_URL"])
async def test_a_bad_feedback_redis_url_is_named_by_the_setting_that_holds_it(
        tmp_path: Path, setting: str) -> None:
    """The Redis of feedback, keys and quotas comes from GATEWAY_FEEDBACK_REDIS_URL when it is
    set, else from GATEWAY_REDIS_URL: the start-up error names the one to fix."""
    with running_fake_upstream(TARGETS) as fake:
        write_tasks(tmp_path / "tasks.yaml", str(fake.url))
        bad = "redis://127.0.0.1:notaport/0"
        feedback_url, cache_url = ((bad, "") if setting == "GATEWAY_FEEDBACK_REDIS_URL"
                                   else ("", bad))
        app = create_app(Settings(tasks_file=tmp_path / "tasks.yaml", cache_prefix="test:bad",
                                  feedback_redis_url=feedback_url, redis_url=cache_url))
        with pytest.raises(ValueError) as caught:
            async with app.router.lifespan_context(app):
                pass
    message = str(caught.value)
    assert setting in message and "port" in message
    if setting == "GATEWAY_FEEDBACK_REDIS_URL":
        assert "GATEWAY_REDIS_URL" not in message.replace("GATEWAY_FEEDBACK_REDIS_URL", "")


async def test_feedback_sent_before_the_response_record_lands_still_finds_it(
        tmp_path: Path, own_redis: RedisServer) -> None:
    """The response record is written off the response path. A client that sends feedback as
    soon as it has its answer must not get "Unknown response id" while that write is still on
    its way: here the feedback Redis holds writes for 0.5 s (CLIENT PAUSE WRITE; reads go on),
    so the record lands only after the feedback's first look."""
    import redis

    tasks_file = tmp_path / "tasks.yaml"
    with running_fake_upstream(TARGETS) as fake:
        write_tasks(tasks_file, str(fake.url))
        settings = Settings(tasks_file=tasks_file, redis_url="", feedback_redis_url=own_redis.url,
                            cache_prefix=f"test:{uuid.uuid4().hex[:8]}")
        with serve(create_app(settings)) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                assert (await client.post("/classify", json={"task": "sentiment",
                                                             "input": "warm up"})).status_code == 200
                admin = redis.Redis.from_url(own_redis.url)
                admin.client_pause(500, all=False)  # CLIENT PAUSE 500 WRITE
                answer = await client.post("/classify", json={"task": "sentiment",
                                                              "input": "arrived late"})
                assert answer.status_code == 200, answer.text
                r = await client.post("/feedback", json={"id": answer.json()["id"], "index": 0,
                                                         "labels": {"sentiment": "negative"}})
                assert r.status_code == 200, r.text
                admin.close()
