"""Cascades (issue 23, §1) end to end: a real gateway and Redis in front of two fake upstreams whose
"models" answer differently (the big one knows a fourth label, so its scores differ), so that every
item's answer can be traced to the model named for it, and the cheap model's margins, known from
`expected_scores`, say exactly which items must escalate."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio

from service.cli import main
from service.commands.calibration import macro_f1
from tests.support.fake_upstream import FakeUpstream, expected_scores, running_fake_upstream
from tests.support.gateway import gateway_for
from tests.support.redis_server import RedisServer

CHEAP_TARGETS = {"sentiment": ["negative", "neutral", "positive"]}
BIG_TARGETS = {"sentiment": ["negative", "neutral", "positive", "mixed"]}
TEXTS = [f"customer review number {i}" for i in range(30)]
DEAD = "http://127.0.0.1:9"


def margin(text: str) -> float:
    top, second = sorted(expected_scores(text, CHEAP_TARGETS)["sentiment"].values(),
                         reverse=True)[:2]
    return top - second


#: Half the items are sure enough for the cheap model.
MIN_MARGIN = statistics.median(margin(text) for text in TEXTS)


@contextlib.contextmanager
def cascade(tmp_path: Path, redis: RedisServer, *, big_url: str | None = None,
            cheap_url: str | None = None, prefix: str | None = None, **task: Any
            ) -> Iterator[tuple[str, FakeUpstream, FakeUpstream]]:
    with running_fake_upstream(CHEAP_TARGETS) as cheap, \
            running_fake_upstream(BIG_TARGETS) as big:
        upstreams = {"small": {"base_url": cheap_url or str(cheap.url)},
                     "large": {"base_url": big_url or str(big.url)},
                     "spare": {"base_url": str(big.url)}}
        tasks = {"sentiment": {"upstream": "large", "cascade": [
            {"model": "ft:cheap", "min_margin": MIN_MARGIN, "upstream": "small"},
            {"model": "ft:big"}], **task}}
        with gateway_for(tmp_path, redis.url, upstreams, tasks, retry_attempts=1,
                         cache_prefix=prefix or f"test:{uuid.uuid4().hex[:8]}") as url:
            yield url, cheap, big


async def cached(redis_url: str, prefix: str, count: int, timeout_s: float = 10.0) -> None:
    """Wait until the cache holds `count` entries under `prefix`: answers are written just after
    the response goes out, so a request sent at once may still miss."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while len(await client.keys(f"{prefix}:*")) < count:
            assert time.monotonic() < deadline, f"fewer than {count} cache entries"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


def sent(fake: FakeUpstream) -> list[Any]:
    return [item for call in fake.calls for item in call.inputs]


async def test_each_item_is_answered_by_the_first_stage_sure_enough_and_cached_per_stage(
        tmp_path: Path, redis_server: RedisServer) -> None:
    sure = [margin(text) >= MIN_MARGIN for text in TEXTS]
    assert 10 <= sum(sure) <= 20  # both stages have work
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    with cascade(tmp_path, redis_server, prefix=prefix) as (url, cheap, big):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify", json={"task": "sentiment", "input": TEXTS})
            assert r.status_code == 200, r.text
            body = r.json()
            expected_models = ["ft:cheap" if ok else "ft:big" for ok in sure]
            assert body["models"] == expected_models
            assert r.headers["x-model"] == "ft:cheap, ft:big"
            for text, model, result in zip(TEXTS, body["models"], body["results"], strict=True):
                targets = CHEAP_TARGETS if model == "ft:cheap" else BIG_TARGETS
                assert result["sentiment"]["scores"] == expected_scores(text, targets)["sentiment"]
            # The cheap model saw every item, the big one only the unsure ones, in one call.
            assert sent(cheap) == TEXTS
            assert len(big.calls) == 1
            assert sent(big) == [t for t, ok in zip(TEXTS, sure, strict=True) if not ok]
            # Each stage's answers are cached under its own model: nothing goes upstream again.
            await cached(redis_server.url, prefix, len(TEXTS) + len(TEXTS) - sum(sure))
            again = await client.post("/classify", json={"task": "sentiment", "input": TEXTS})
            assert again.headers["x-cache"] == "hit"
            assert again.json()["models"] == expected_models
            assert (len(cheap.calls), len(big.calls)) == (1, 1)
            stats = (await client.get("/tasks/sentiment")).json()
            metrics = (await client.get("/metrics")).text
    n_cheap = sum(sure)
    assert [(stage["model"], stage["min_margin"]) for stage in stats["cascade"]] == [
        ("ft:cheap", MIN_MARGIN), ("ft:big", None)]
    assert stats["cascade_stats"] == {"items": 60, "answered": [2 * n_cheap, 60 - 2 * n_cheap],
                                      "escalated_share": round(1 - n_cheap / 30, 6)}
    assert f'gateway_cascade_items_total{{stage="1",task="sentiment"}} {2 * n_cheap}.0' in metrics
    assert (f'gateway_cascade_items_total{{stage="2",task="sentiment"}} '
            f'{60 - 2 * n_cheap}.0') in metrics


async def test_a_failing_last_stage_falls_back(tmp_path: Path, redis_server: RedisServer) -> None:
    with cascade(tmp_path, redis_server, big_url=DEAD,
                 fallbacks=[{"upstream": "spare", "model": "ft:backup"}]) as (url, _, big):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify", json={"task": "sentiment", "input": TEXTS})
    assert r.status_code == 200, r.text
    sure = [margin(text) >= MIN_MARGIN for text in TEXTS]
    assert r.json()["models"] == ["ft:cheap" if ok else "ft:backup" for ok in sure]
    assert r.headers["x-fallback-from"] == "ft:big"
    assert [call.model for call in big.calls] == ["ft:backup"]  # "spare" is the same server
    assert sent(big) == [t for t, ok in zip(TEXTS, sure, strict=True) if not ok]


async def test_a_failing_first_stage_hands_every_item_on(tmp_path: Path,
                                                         redis_server: RedisServer) -> None:
    with cascade(tmp_path, redis_server, cheap_url=DEAD) as (url, _, big):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify", json={"task": "sentiment", "input": TEXTS})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "ft:big" and "models" not in r.json()
    assert sent(big) == TEXTS


async def test_a_cascade_task_in_a_fan_out_call(tmp_path: Path, redis_server: RedisServer) -> None:
    with cascade(tmp_path, redis_server) as (url, _, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            alone = await client.post("/classify", json={"task": "sentiment", "input": TEXTS})
            r = await client.post("/classify", json={"tasks": ["sentiment"], "input": TEXTS})
    assert r.json()["tasks"]["sentiment"]["models"] == alone.json()["models"]


def cli_json(*argv: str) -> Any:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue())


def big_top(text: str) -> str:
    scores = expected_scores(text, BIG_TARGETS)["sentiment"]
    return max(scores, key=scores.__getitem__)


async def test_calibrate_writes_a_threshold_that_reproduces_what_it_printed(
        tmp_path: Path, redis_server: RedisServer) -> None:
    texts = [f"validation review {i}" for i in range(80)]
    gold = [big_top(text) for text in texts]  # the big model is right, the cheap one sometimes
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps({"text": t, "labels": {"sentiment": g}}) + "\n"
                            for t, g in zip(texts, gold, strict=True)))
    with cascade(tmp_path, redis_server) as (url, cheap, big):
        tasks = str(tmp_path / "tasks.yaml")
        found = cli_json("tasks", "calibrate", "sentiment", "--data", str(data), "--keep", "0.95",
                         "--write", "--json", "--tasks", tasks)
        assert [stage["macro_f1"] for stage in found["stages"]][1] == 1.0
        chosen = found["chosen"]
        rows = {row["threshold"]: row for row in found["rows"]}
        assert rows[chosen["threshold"]] == chosen
        # The lowest escalation that keeps 0.95 of the big model's macro-F1.
        assert chosen["macro_f1"] >= 0.95
        assert all(row["escalation"] >= chosen["escalation"] for row in found["rows"]
                   if row["macro_f1"] >= 0.95)
        assert 0 < chosen["escalation"] < 1
        # Each stage saw every example once, asked directly: the gateway's cache is not involved.
        assert (sent(cheap), sent(big)) == (texts, texts)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def written() -> bool:
                stages = (await client.get("/tasks/sentiment")).json()["cascade"]
                return bool(stages[0]["min_margin"] == chosen["threshold"])
            await wait_until(written)
            r = await client.post("/classify", json={"task": "sentiment", "input": texts})
    body = r.json()
    models = body.get("models") or [body["model"]] * len(texts)
    labels = [result["sentiment"]["label"] for result in body["results"]]
    assert sum(m != "ft:cheap" for m in models) / len(texts) == chosen["escalation"]
    assert round(macro_f1(gold, labels), 6) == chosen["macro_f1"]


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "the gateway did not reload the tasks file"
        await asyncio.sleep(0.05)


async def test_calibrate_prints_its_table_and_refuses_a_task_without_a_cascade(
        tmp_path: Path, redis_server: RedisServer) -> None:
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps({"text": t, "labels": {"sentiment": big_top(t)}}) + "\n"
                            for t in TEXTS))
    with cascade(tmp_path, redis_server):
        tasks = str(tmp_path / "tasks.yaml")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["tasks", "calibrate", "sentiment", "--data", str(data),
                         "--tasks", tasks]) == 0
        assert "threshold  escalation  macro-F1" in out.getvalue()
        assert "<- chosen" in out.getvalue() and "chosen min_margin 0." in out.getvalue()
        assert f"min_margin: {MIN_MARGIN}" in (tmp_path / "tasks.yaml").read_text()  # not written
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["tasks", "calibrate", "nope", "--data", str(data), "--tasks", tasks]) != 0
        assert "no task 'nope' with a cascade" in err.getvalue()
        assert "tasks with one: sentiment" in err.getvalue()


async def test_the_shadow_compares_the_cascades_final_answers(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with cascade(tmp_path, redis_server,
                 shadow={"model": "ft:shadow", "sample": 1.0, "upstream": "spare"}) as (url, _, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            r = await client.post("/classify", json={"task": "sentiment", "input": TEXTS})
            assert len(set(r.json()["models"])) == 2  # both stages answered

            async def compared() -> bool:
                report = (await client.get("/tasks/sentiment/shadow")).json()
                return bool(report["targets"].get("sentiment", {}).get("compared") == len(TEXTS))
            await wait_until(compared)
