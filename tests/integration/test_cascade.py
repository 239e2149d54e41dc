"""Cascades (issue 23, §1) end to end: a real gateway and Redis in front of two fake upstreams whose
"models" answer differently (the big one knows a fourth label, so its scores differ), so that every
item's answer can be traced to the model named for it, and the cheap model's margins, known from
`expected_scores`, say exactly which items must escalate."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

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
            cheap_url: str | None = None, **task: Any
            ) -> Iterator[tuple[str, FakeUpstream, FakeUpstream]]:
    with running_fake_upstream(CHEAP_TARGETS) as cheap, \
            running_fake_upstream(BIG_TARGETS) as big:
        upstreams = {"small": {"base_url": cheap_url or str(cheap.url)},
                     "large": {"base_url": big_url or str(big.url)},
                     "spare": {"base_url": str(big.url)}}
        tasks = {"sentiment": {"upstream": "large", "cascade": [
            {"model": "ft:cheap", "min_margin": MIN_MARGIN, "upstream": "small"},
            {"model": "ft:big"}], **task}}
        with gateway_for(tmp_path, redis.url, upstreams, tasks, retry_attempts=1) as url:
            yield url, cheap, big


def sent(fake: FakeUpstream) -> list[Any]:
    return [item for call in fake.calls for item in call.inputs]


async def test_each_item_is_answered_by_the_first_stage_sure_enough_and_cached_per_stage(
        tmp_path: Path, redis_server: RedisServer) -> None:
    sure = [margin(text) >= MIN_MARGIN for text in TEXTS]
    assert 10 <= sum(sure) <= 20  # both stages have work
    with cascade(tmp_path, redis_server) as (url, cheap, big):
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
