"""Canary and shadow models per task, end to end: a real gateway and Redis in front of the fake
Mistral-compatible upstream and the faithful TEI fake, on loopback ports. The two "models" answer
differently (their scores come from different hashes of the input), so every agreement figure is
checked against what each answers directly."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import main
from tests.support.fake_inference import expected as tei_expected
from tests.support.fake_inference import running_tei
from tests.support.fake_upstream import Slow, Status, expected_scores, running_fake_upstream
from tests.support.gateway import gateway_for
from tests.support.redis_server import RedisServer

LABELS = ["negative", "neutral", "positive"]
TARGETS = {"sentiment": LABELS}


@contextlib.contextmanager
def gateway(tmp_path: Path, redis: RedisServer, upstreams: dict[str, Any],
            tasks: dict[str, Any], **settings: Any) -> Iterator[str]:
    with gateway_for(tmp_path, redis.url, upstreams, tasks, **settings) as url:
        yield url


def cli_output(*argv: str) -> str:
    """`classifier-gateway ARGV` in process; its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


def top(scores: dict[str, float]) -> str:
    return max(scores, key=scores.__getitem__)


async def test_canary_takes_its_share_by_item_and_is_sticky(tmp_path: Path,
                                                           redis_server: RedisServer) -> None:
    with running_fake_upstream(TARGETS) as fake, gateway(
            tmp_path, redis_server, {"local": {"base_url": str(fake.url)}},
            {"sentiment": {"upstream": "local", "model": "ft:v3",
                           "canary": {"model": "ft:v4", "weight": 0.2}}}) as gw:
        texts = [f"customer review {i}" for i in range(3000)]
        async with httpx.AsyncClient(base_url=gw, timeout=30) as client:
            first = [await client.post("/classify", json={"task": "sentiment",
                                                          "input": texts[i:i + 100]})
                     for i in range(0, len(texts), 100)]
            assert all(r.status_code == 200 for r in first)
            models = [m for r in first for m in r.json().get("models") or
                      [r.json()["model"]] * 100]
            share = models.count("ft:v4") / len(models)
            assert 0.17 <= share <= 0.23, share  # 3,000 items: 3 standard deviations is 0.022
            assert first[0].headers["x-model"] in ("ft:v3, ft:v4", "ft:v4, ft:v3")
            # Each item went upstream once, to the model that answers it.
            sent = {item: call.model for call in fake.calls for item in call.inputs}
            assert len(sent) == 3000
            assert all(sent[text] == model for text, model in zip(texts, models, strict=True))
            # Sticky: the same inputs go to the same models, now from the cache.
            again = await client.post("/classify", json={"task": "sentiment",
                                                         "input": texts[:100]})
            assert again.headers["x-cache"] == "hit"
            assert again.json()["models"] == models[:100]
            metrics = (await client.get("/metrics")).text
    assert (f'gateway_model_items_total{{model="ft:v4",task="sentiment"}} '
            f'{models.count("ft:v4") + models[:100].count("ft:v4")}.0') in metrics


async def test_a_failing_canary_falls_back_to_the_tasks_model(tmp_path: Path,
                                                             redis_server: RedisServer) -> None:
    with running_fake_upstream(TARGETS) as fake, gateway(
            tmp_path, redis_server,
            {"local": {"base_url": str(fake.url)}, "dead": {"base_url": "http://127.0.0.1:9"}},
            {"sentiment": {"upstream": "local", "model": "ft:v3",
                           "canary": {"model": "ft:v4", "weight": 1.0, "upstream": "dead"}}},
            retry_attempts=1) as gw:
        async with httpx.AsyncClient(base_url=gw, timeout=30) as client:
            r = await client.post("/classify", json={"task": "sentiment", "input": "fine"})
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.headers["x-fallback-from"]) == ("ft:v3", "ft:v4")


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll `predicate` (background comparisons have no event to wait on from outside)."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout_s} s")
        await asyncio.sleep(0.05)


async def test_shadow_agreement_and_confusion_match_what_each_model_answers(
        tmp_path: Path, redis_server: RedisServer) -> None:
    texts = [f"support ticket {i}" for i in range(200)]
    with running_fake_upstream(TARGETS) as fake, running_tei(LABELS) as tei, gateway(
            tmp_path, redis_server,
            {"local": {"base_url": str(fake.url)}, "tei": {"base_url": tei.url, "protocol": "tei"}},
            {"sentiment": {"upstream": "local", "model": "ft:v3",
                           "shadow": {"model": "tei-v4", "upstream": "tei", "sample": 1.0}}}) as gw:
        async with httpx.AsyncClient(base_url=gw, timeout=30) as client:
            answered = []
            for i in range(0, 200, 50):
                r = await client.post("/classify", json={"task": "sentiment",
                                                         "input": texts[i:i + 50]})
                assert r.status_code == 200 and r.json()["model"] == "ft:v3"
                answered += r.json()["results"]
            # Cache hits are compared too.
            hit = await client.post("/classify", json={"task": "sentiment", "input": texts[:10]})
            assert hit.headers["x-cache"] == "hit"

            async def all_compared() -> bool:
                report = (await client.get("/tasks/sentiment/shadow")).json()
                return bool(report["targets"]) and report["targets"]["sentiment"]["compared"] == 210

            await wait_for(all_compared)
            report = (await client.get("/tasks/sentiment/shadow")).json()
            metrics = (await client.get("/metrics")).text
            shown = cli_output("tasks", "show", "sentiment", "--tasks",
                               str(tmp_path / "tasks.yaml"), "--gateway-url", gw)
    # Answers are the primary's own, untouched by the shadow.
    for text, result in zip(texts, answered, strict=True):
        assert result["sentiment"]["scores"] == pytest.approx(expected_scores(text, TARGETS)["sentiment"])
    want: Counter[tuple[str, str]] = Counter()
    for text in [*texts, *texts[:10]]:
        want[(top(expected_scores(text, TARGETS)["sentiment"]), top(tei_expected(text, LABELS)))] += 1
    confusion = report["targets"]["sentiment"]["confusion"]
    got = Counter({(ours, theirs): n for ours, row in confusion.items() for theirs, n in row.items()})
    assert got == want
    agreed = sum(n for (a, b), n in want.items() if a == b)
    assert 0 < agreed < 210  # the two models do disagree: the figures are not vacuous
    assert report["targets"]["sentiment"]["agreed"] == agreed
    assert report["targets"]["sentiment"]["agreement"] == pytest.approx(agreed / 210, abs=1e-6)
    assert report["shared"] is True and report["shadow"]["model"] == "tei-v4"
    assert (f'gateway_shadow_comparisons_total{{agreement="agree",target="sentiment",'
            f'task="sentiment"}} {agreed}.0') in metrics
    assert f"sentiment: {agreed} of 210 agree ({agreed / 210:.1%})" in shown
    assert "shadow tei-v4 vs ft:v3 (all replicas)" in shown


async def test_a_down_or_slow_shadow_changes_no_answer_and_only_loses_comparisons(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with running_fake_upstream(TARGETS) as fake, running_fake_upstream(TARGETS) as shadow, gateway(
            tmp_path, redis_server,
            {"local": {"base_url": str(fake.url)}, "shadow": {"base_url": str(shadow.url)}},
            {"sentiment": {"upstream": "local", "model": "ft:v3", "timeout_s": 1.0,
                           "shadow": {"model": "ft:v4", "upstream": "shadow", "sample": 1.0}}},
            retry_attempts=1, shadow_max_pending=5) as gw:
        async with httpx.AsyncClient(base_url=gw, timeout=30) as client:
            shadow.inject(Slow(3.0))  # slower than the task's 1 s deadline: a timeout
            slow = await client.post("/classify", json={"task": "sentiment", "input": ["a", "b"]})
            assert slow.status_code == 200
            # The answer came while the shadow was still thinking: nothing compared yet.
            assert "gateway_shadow_comparisons_total{" not in (await client.get("/metrics")).text
            shadow.inject(Status(500))
            down = await client.post("/classify", json={"task": "sentiment", "input": ["c"]})
            assert down.status_code == 200
            # Over the 5 pending items allowed: shed at once, never queued.
            many = await client.post("/classify", json={"task": "sentiment",
                                                        "input": [f"x{i}" for i in range(6)]})
            assert many.status_code == 200

            async def dropped() -> bool:
                text = (await client.get("/metrics")).text
                return all(f'gateway_shadow_dropped_total{{reason="{r}",task="sentiment"}}' in text
                           for r in ("timeout", "error", "queue_full"))

            await wait_for(dropped)
        for r, items in ((slow, ["a", "b"]), (down, ["c"])):
            assert [x["sentiment"]["scores"] for x in r.json()["results"]] == [
                pytest.approx(expected_scores(i, TARGETS)["sentiment"]) for i in items]
