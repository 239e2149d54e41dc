"""`tasks calibrate --through-gateway`: the stages asked through the gateway's admin route
(`POST /admin/tasks/{name}/cascade/{stage}`), so that a stage on any protocol can be calibrated
(here a TEI server in front of a Mistral-compatible one), with nothing read from or written to
the cache, and only with the admin key."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio

from service.cli import main
from tests.support.fake_inference import FakeServer, expected, running_tei
from tests.support.fake_upstream import FakeUpstream, expected_scores, running_fake_upstream
from tests.support.gateway import gateway_for
from tests.support.redis_server import RedisServer

CHEAP_LABELS = ["negative", "neutral", "positive"]
BIG_TARGETS = {"sentiment": ["negative", "neutral", "positive", "mixed"]}
TEXTS = [f"validation review {i}" for i in range(40)]
ADMIN = "admin-secret-for-calibration"
CLIENT = "client-key-for-calibration"


def cheap_margin(text: str) -> float:
    top, second = sorted(expected(text, CHEAP_LABELS).values(), reverse=True)[:2]
    return top - second


def big_top(text: str) -> str:
    scores = expected_scores(text, BIG_TARGETS)["sentiment"]
    return max(scores, key=scores.__getitem__)


@contextlib.contextmanager
def tei_cascade(tmp_path: Path, redis_url: str, prefix: str
                ) -> Iterator[tuple[str, FakeServer, FakeUpstream]]:
    """A cascade whose cheap stage is a TEI server (protocol `tei`), the last a Mistral one."""
    with running_tei(CHEAP_LABELS) as tei, running_fake_upstream(BIG_TARGETS) as big:
        upstreams = {"tei": {"base_url": tei.url, "protocol": "tei"},
                     "large": {"base_url": str(big.url)}}
        min_margin = statistics.median(cheap_margin(t) for t in TEXTS)
        tasks = {"sentiment": {"upstream": "large", "cascade": [
            {"model": "cheap-v1", "upstream": "tei", "min_margin": round(min_margin, 2)},
            {"model": "ft:big"}]}}
        with gateway_for(tmp_path, redis_url, upstreams, tasks, retry_attempts=1,
                         cache_prefix=prefix, admin_key=ADMIN, api_keys=CLIENT) as url:
            yield url, tei, big


def cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", ADMIN)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


async def keys_under(redis_url: str, prefix: str) -> list[Any]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        return [key async for key in client.scan_iter(match=f"{prefix}*")]
    finally:
        await client.aclose()


async def test_calibrate_through_the_gateway_asks_a_tei_stage_uncached(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps({"text": t, "labels": {"sentiment": big_top(t)}}) + "\n"
                            for t in TEXTS))
    prefix = "test:calibrate-gw"
    with tei_cascade(tmp_path, redis_server.url, prefix) as (url, tei, big):
        code, out, err = cli(monkeypatch, "tasks", "calibrate", "sentiment", "--data", str(data),
                             "--keep", "0.9", "--json", "--through-gateway", "--gateway-url", url,
                             "--tasks", str(tmp_path / "tasks.yaml"))
        assert code == 0, err
        found = json.loads(out)
        # Each stage saw every example once, through the gateway's own clients (TEI's /predict).
        assert sorted(t for call in tei.calls for (t,) in call["inputs"]) == sorted(TEXTS)
        assert sorted(t for call in big.calls for t in call.inputs) == sorted(TEXTS)
        assert await keys_under(redis_server.url, prefix) == []  # nothing cached
        # The figures are the stages' own: the big model is right on every example, and the
        # first stage's margins are TEI's scores as the gateway maps them onto the target.
        assert [s["model"] for s in found["stages"]] == ["cheap-v1", "ft:big"]
        assert found["stages"][1]["macro_f1"] == 1.0
        everything = {row["threshold"]: row["escalation"] for row in found["rows"]}
        assert everything[0.0] == 0.0 and everything[1.0] == 1.0
        for threshold, escalation in everything.items():
            assert escalation == round(sum(cheap_margin(t) < threshold for t in TEXTS)
                                       / len(TEXTS), 6)


async def test_the_stage_route_takes_only_the_admin_key_and_names_what_is_wrong(
        tmp_path: Path, redis_server: RedisServer) -> None:
    with tei_cascade(tmp_path, redis_server.url, "test:stage-route") as (url, _, big):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            path = "/admin/tasks/sentiment/cascade/1"
            body = {"input": TEXTS[:3]}
            for headers in ({}, {"Authorization": f"Bearer {CLIENT}"}):
                assert (await client.post(path, json=body, headers=headers)).status_code == 401
            admin = {"Authorization": f"Bearer {ADMIN}"}
            r = await client.post(path, json=body, headers=admin)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "ft:big"
            assert r.json()["results"] == [{"sentiment": {"scores": expected_scores(
                t, BIG_TARGETS)["sentiment"]}} for t in TEXTS[:3]]
            r = await client.post("/admin/tasks/sentiment/cascade/2", json=body, headers=admin)
            assert r.status_code == 404 and "stage 2 is not one of them" in r.text
            r = await client.post("/admin/tasks/nope/cascade/0", json=body, headers=admin)
            assert r.status_code == 404 and "Unknown task 'nope'" in r.text
            r = await client.post(path, json={"input": [{"messages": [
                {"role": "user", "content": "hi"}]}]}, headers=admin)
            assert r.status_code == 400 and "list of strings" in r.text
            r = await client.post(path, json={"input": []}, headers=admin)
            assert r.status_code == 422 and "input" in r.text
        assert len(big.calls) == 1  # only the one good call reached the upstream
