"""The sampled prediction log (service/gateway/predictions.py) on a real Redis and a real gateway."""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from service.cli import main
from service.factory.data import validate_file
from service.gateway.classifier import Outcome
from service.gateway.metrics import GatewayMetrics
from service.gateway.predictions import PredictionLog
from service.gateway.redis_clients import open_redis
from service.gateway.registry import parse_registry
from tests.support.gateway import gateway_stack
from tests.support.redis_server import RedisServer

MODEL = "ft:classifier:test:sentiment"


def tasks(log: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"sentiment": {"upstream": "fake", "model": MODEL, "kind": "text", "log": log}}


def test_sample_one_logs_every_prediction_with_its_response_id(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with gateway_stack(tmp_path, redis_url=redis_server.url,
                       tasks=tasks({"sample": 1.0})) as stack:
        texts = [f"secret text {i}" for i in range(5)]
        r = httpx.post(f"{stack.url}/classify", json={"task": "sentiment", "input": texts})
        assert r.status_code == 200, r.text
        answer = r.json()
        entries: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(entries) < 5 and time.monotonic() < deadline:
            page = httpx.get(f"{stack.url}/predictions/sentiment", params={"since": "1h"})
            assert page.status_code == 200, page.text
            entries = page.json()["entries"]
            time.sleep(0.05)
        assert [e["index"] for e in entries] == [0, 1, 2, 3, 4]
        assert {e["response_id"] for e in entries} == {answer["id"]}
        for entry, result in zip(entries, answer["results"], strict=True):
            assert entry["labels"] == {"sentiment": result["sentiment"]["label"]}
            assert entry["model"] == MODEL and entry["cache"] == "miss"
            assert entry["latency_ms"] > 0 and 0 <= entry["margin"] <= 1
            assert "input" not in entry and len(entry["input_sha256"]) == 64
        assert not any("secret text" in str(entry) for entry in entries)
        # Pages like GET /feedback/{task}: `next` is the cursor, `after` takes it.
        first = httpx.get(f"{stack.url}/predictions/sentiment", params={"limit": 2}).json()
        assert len(first["entries"]) == 2 and first["next"] == first["entries"][1]["id"]
        rest = httpx.get(f"{stack.url}/predictions/sentiment",
                         params={"after": first["next"], "limit": 10}).json()
        assert [e["index"] for e in rest["entries"]] == [2, 3, 4] and rest["next"] is None
        assert httpx.get(f"{stack.url}/predictions/sentiment",
                         params={"since": "soon"}).status_code == 422
        metrics = httpx.get(f"{stack.url}/metrics").text
        assert 'gateway_predictions_logged_total{task="sentiment"} 5.0' in metrics


def _task(log: dict[str, Any]) -> Any:
    registry = parse_registry({"upstreams": {"up": {"base_url": "http://127.0.0.1:1"}},
                               "tasks": {"t": {"upstream": "up", "model": "m", "log": log}}})
    return registry.tasks["t"]


def _outcome(n: int) -> Outcome:
    results = [{"t": {"scores": {"a": 0.7, "b": 0.3}}} for _ in range(n)]
    return Outcome(results, "miss", ["m"] * n, id=uuid.uuid4().hex)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_retention_trims_by_age_and_inputs_are_kept_only_when_asked(
        redis_server: RedisServer) -> None:
    redis = open_redis(redis_server.url, 1.0)
    assert redis is not None
    clock = Clock()
    log = PredictionLog(redis, f"test:{uuid.uuid4().hex[:8]}", GatewayMetrics(CollectorRegistry()),
                        max_per_task=1000, max_queue=100, clock=clock)
    task = _task({"sample": 1.0, "inputs": True, "retention_days": 7})
    try:
        # An entry eight days old (stream ids are milliseconds) is trimmed by the next write.
        old = int((clock.now - 8 * 86400) * 1000)
        await redis.client.xadd(log.key("t"), {"entry": b"{}"}, id=f"{old}-0")
        log.offer(task, ["kept input"], _outcome(1), 0.001)
        await log.flush_once()
        entries, _ = await log.page("t", "0", None, 10)
        assert [e["input"] for e in entries] == ["kept input"]
        clock.now += 6 * 86400  # six days on: younger than the retention, stays
        await log.trim(task)
        assert len((await log.page("t", "0", None, 10))[0]) == 1
        clock.now += 2 * 86400  # eight days on: gone
        await log.trim(task)
        assert (await log.page("t", "0", None, 10))[0] == []
    finally:
        await log.aclose()
        await redis.aclose()


async def test_a_full_queue_drops_and_counts_without_waiting(redis_server: RedisServer) -> None:
    redis = open_redis(redis_server.url, 1.0)
    assert redis is not None
    metrics = GatewayMetrics(CollectorRegistry())
    log = PredictionLog(redis, f"test:{uuid.uuid4().hex[:8]}", metrics, max_per_task=1000,
                        max_queue=3)
    task = _task({"sample": 1.0})
    try:
        started = time.perf_counter()
        log.offer(task, [f"item {i}" for i in range(10)], _outcome(10), 0.001)
        assert time.perf_counter() - started < 0.05  # the caller never waits for Redis
        assert log.queued == 3
        value = metrics.registry.get_sample_value
        assert value("gateway_predictions_dropped_total",
                     {"task": "t", "reason": "queue_full"}) == 7
        await log.aclose()
        assert value("gateway_predictions_logged_total", {"task": "t"}) == 3
    finally:
        await redis.aclose()


def test_predictions_export_writes_training_jsonl_once_labels_are_checked(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with gateway_stack(tmp_path, redis_url=redis_server.url,
                       tasks=tasks({"sample": 1.0, "inputs": True})) as stack:
        texts = ["first logged text", "second logged text"]
        r = httpx.post(f"{stack.url}/classify", json={"task": "sentiment", "input": texts})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(httpx.get(
                f"{stack.url}/predictions/sentiment").json()["entries"]) < 2:
            time.sleep(0.05)
        out = tmp_path / "log.jsonl"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["predictions", "export", "--task", "sentiment", "--since", "1h",
                         "--out", str(out), "--gateway-url", stack.url]) == 0
    assert "2 logged predictions of task sentiment" in printed.getvalue()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["text"] for line in lines] == texts
    assert [line["labels"]["sentiment"] for line in lines] == [
        res["sentiment"]["label"] for res in r.json()["results"]]
    assert {line["response_id"] for line in lines} == {r.json()["id"]}
    report = validate_file(out)  # the factory takes it for training as it is
    assert report.error_count == 0 and report.valid == 2, report.to_dict()
