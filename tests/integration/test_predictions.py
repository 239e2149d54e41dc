"""The sampled prediction log (service/gateway/predictions.py) on a real Redis and a real gateway."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.cli import main
from service.commands.datacheck import problem
from service.factory.data import validate_file
from service.gateway.classifier import Outcome
from service.gateway.metrics import GatewayMetrics
from service.gateway.predictions import PredictionLog
from service.gateway.redis_clients import open_redis
from service.gateway.registry import parse_registry
from tests.support.gateway import gateway_stack
from tests.support.redis_server import RedisServer
from tests.support.waits import Deadline, stretched

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
    # 5 s for Redis: at load 8 a CI run's three writes missed a 1 s timeout and were dropped.
    redis = open_redis(redis_server.url, 5.0)
    assert redis is not None
    metrics = GatewayMetrics(CollectorRegistry())
    log = PredictionLog(redis, f"test:{uuid.uuid4().hex[:8]}", metrics, max_per_task=1000,
                        max_queue=3)
    task = _task({"sample": 1.0})
    try:
        started = time.perf_counter()
        log.offer(task, [f"item {i}" for i in range(10)], _outcome(10), 0.001)
        # the caller never waits for Redis
        assert time.perf_counter() - started < stretched(0.05)
        assert log.queued == 3
        value = metrics.registry.get_sample_value
        assert value("gateway_predictions_dropped_total",
                     {"task": "t", "reason": "queue_full"}) == 7
        await log.aclose()
        assert value("gateway_predictions_logged_total", {"task": "t"}) == 3
    finally:
        await redis.aclose()


def _exported(stack_url: str, out: Path, *args: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["predictions", "export", *args, "--since", "1h", "--out", str(out),
                     "--gateway-url", stack_url]) == 0
    return printed.getvalue()


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    """A Parquet export read back with pyarrow, as the JSONL lines it stands for: maps as dicts,
    `messages` from its JSON, and a row's nulls dropped (fields its line does not have)."""
    import pyarrow.parquet as pq

    def plain(value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return {k: plain(v) for k, v in value}
        return value

    rows = []
    for row in pq.read_table(path).to_pylist():
        line = {k: plain(v) for k, v in row.items() if v is not None}
        if "messages" in line:
            line["messages"] = json.loads(line["messages"])
        rows.append(line)
    return rows


def test_predictions_export_writes_training_jsonl_and_the_same_rows_as_parquet(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """The log's JSONL goes to `finetune --train` once labels are checked (the factory's own
    validation, as finetune runs it), and has the fields of `review export`'s JSONL lines (but
    `reason`); the Parquet export holds the same rows and fields. A log that keeps only the
    inputs' hashes exports, but finetune refuses it, saying what is missing."""
    logged = {**tasks({"sample": 1.0, "inputs": True}),
              "audit": {"upstream": "fake", "model": MODEL, "kind": "text",
                        "log": {"sample": 1.0}}}
    with gateway_stack(tmp_path, redis_url=redis_server.url, tasks=logged) as stack:
        texts = ["first logged text", "second logged text", "third, ünïcode"]
        r = httpx.post(f"{stack.url}/classify", json={"task": "sentiment", "input": texts})
        assert r.status_code == 200, r.text
        assert httpx.post(f"{stack.url}/classify",
                          json={"task": "audit", "input": ["private"]}).status_code == 200
        deadline = Deadline(10)
        while not deadline.expired() and (
                len(httpx.get(f"{stack.url}/predictions/sentiment").json()["entries"]) < 3
                or not httpx.get(f"{stack.url}/predictions/audit").json()["entries"]):
            time.sleep(0.05)
        out = tmp_path / "log.jsonl"
        printed = _exported(stack.url, out, "--task", "sentiment")
        table = tmp_path / "log.parquet"
        printed_parquet = _exported(stack.url, table, "--task", "sentiment", "--format",
                                    "parquet")
        hashed = tmp_path / "audit.jsonl"
        _exported(stack.url, hashed, "--task", "audit")
    assert "3 logged predictions of task sentiment" in printed and "(jsonl)" in printed
    assert "(parquet)" in printed_parquet
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["text"] for line in lines] == texts
    assert [line["labels"]["sentiment"] for line in lines] == [
        res["sentiment"]["label"] for res in r.json()["results"]]
    assert {line["response_id"] for line in lines} == {r.json()["id"]}
    report = validate_file(out)  # the factory takes it for training as it is
    assert report.error_count == 0 and report.valid == 3, report.to_dict()
    assert problem(str(out), report) is None  # and so does finetune's check before uploading
    assert {"text", "labels", "scores", "model", "margin"} <= set(lines[0])
    # Parquet: the same rows, the same fields, the same values.
    assert _parquet_rows(table) == lines
    # inputs: false: only the hash, which finetune cannot train on, and says so.
    (audit,) = [json.loads(line) for line in hashed.read_text().splitlines()]
    assert "text" not in audit and len(audit["input_sha256"]) == 64
    reason = problem(str(hashed), validate_file(hashed))
    assert reason is not None and "text" in reason, reason


def test_parquet_without_pyarrow_names_the_extra_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # As if pyarrow were not installed: importing it raises ImportError.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    out = tmp_path / "log.parquet"
    code = main(["predictions", "export", "--task", "sentiment", "--format", "parquet",
                 "--out", str(out), "--gateway-url", "http://127.0.0.1:9"])
    assert code != 0 and not out.exists()
    err = capsys.readouterr().err
    assert "pyarrow" in err and "classifier-gateway[export]" in err and "--format jsonl" in err
