"""`GET /tasks/{name}/stats` and `gateway_predicted_labels_total` on a real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from redis.exceptions import RedisError

from service.commands.demo_runner import DATASETS, TASKS, train_task
from service.gateway.drift import REDIS_TTL_S, RedisCounts, psi
from service.gateway.redis_clients import open_redis
from tests.support.factory import running_factory
from tests.support.fake_upstream import running_fake_upstream
from tests.support.gateway import gateway_for, gateway_stack
from tests.support.redis_cluster import start_cluster
from tests.support.redis_server import RedisServer, free_port
from tests.support.waits import Deadline


def test_stats_report_the_labels_answered_and_the_metric_counts_them(tmp_path: Path) -> None:
    with gateway_stack(tmp_path) as stack:
        texts = [f"text number {i}" for i in range(7)]
        r = httpx.post(f"{stack.url}/classify", json={"task": "sentiment", "input": texts})
        assert r.status_code == 200, r.text
        labels = [res["sentiment"]["label"] for res in r.json()["results"]]
        stats = httpx.get(f"{stack.url}/tasks/sentiment/stats")
        assert stats.status_code == 200, stats.text
        body = stats.json()
        assert body["task"] == "sentiment" and body["threshold"] == 0.2
        hour = body["targets"]["sentiment"]["hour"]
        assert hour["items"] == 7
        assert hour["distribution"] == {label: labels.count(label) / 7 for label in set(labels)}
        assert body["scope"] == "this replica"  # no Redis: the replica's own memory
        # No reference yet (nothing older than an hour): no index, not drifted.
        assert body["targets"]["sentiment"]["psi"] is None
        assert not body["targets"]["sentiment"]["drifted"]
        metrics = httpx.get(f"{stack.url}/metrics").text
        for label in set(labels):
            line = (f'gateway_predicted_labels_total{{label="{label}",target="sentiment",'
                    f'task="sentiment"}} {float(labels.count(label))}')
            assert line in metrics
        assert httpx.get(f"{stack.url}/tasks/nope/stats").status_code == 404


def test_a_factory_model_is_compared_with_its_training_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = f"fk-{uuid.uuid4().hex}"
    monkeypatch.setenv("DRIFT_FACTORY_KEY", key)
    sentiment = next(task for task in TASKS if task.name == "sentiment")
    counts = Counter(json.loads(line)["labels"]["sentiment"]
                     for line in (DATASETS / sentiment.dataset).read_text().splitlines() if line)
    with running_factory(tmp_path / "factory", api_key=key) as factory:
        with httpx.Client(base_url=factory.url, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            model = train_task(client, sentiment)
        tasks = {"sentiment": {"upstream": "local", "model": model, "kind": "text"}}
        upstreams = {"local": {"base_url": factory.url, "api_key_env": "DRIFT_FACTORY_KEY"}}
        with gateway_for(tmp_path, "", upstreams, tasks) as url:
            texts = ["I love it", "Terrible, broken", "It is a chair", "Great value"]
            assert httpx.post(f"{url}/classify", json={"task": "sentiment", "input": texts},
                              timeout=30).status_code == 200
            body = httpx.get(f"{url}/tasks/sentiment/stats", timeout=30).json()
    target = body["targets"]["sentiment"]
    total = sum(counts.values())
    assert target["training"]["distribution"] == {
        label: n / total for label, n in sorted(counts.items())}
    hour = target["hour"]["distribution"]
    assert target["training"]["psi_hour"] == pytest.approx(
        psi(hour, target["training"]["distribution"]))


def test_two_replicas_on_one_redis_report_the_same_stats_counting_every_item(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Behind a load balancer, whichever replica answers `GET /tasks/{name}/stats` reports
    the traffic of both: the counts live in Redis (drift.py)."""
    tasks = {"sentiment": {"upstream": "fake", "model": "ft:classifier:test:sentiment",
                           "kind": "text"}}
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    with running_fake_upstream() as fake, contextlib.ExitStack() as stack:
        upstreams = {"fake": {"base_url": str(fake.url)}}
        replicas = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(stack.enter_context(gateway_for(
                tmp_path / name, redis_server.url, upstreams, tasks, cache_prefix=prefix)))
        a, b = replicas
        labels: list[str] = []
        for url, texts in ((a, [f"to a {i}" for i in range(5)]),
                           (b, [f"to b {i}" for i in range(8)]),
                           (a, ["to a again"])):
            r = httpx.post(f"{url}/classify", json={"task": "sentiment", "input": texts})
            assert r.status_code == 200, r.text
            labels += [res["sentiment"]["label"] for res in r.json()["results"]]
        # A replica's read flushes its own counts; the other's reach Redis within a second.
        deadline = Deadline(10)
        while True:
            first = httpx.get(f"{a}/tasks/sentiment/stats").json()
            hour = first["targets"].get("sentiment", {}).get("hour", {})
            if hour.get("items") == len(labels) or deadline.expired():
                break
            time.sleep(0.1)
        second = httpx.get(f"{b}/tasks/sentiment/stats").json()
    assert first["scope"] == "all replicas"
    assert hour["items"] == 14
    assert hour["distribution"] == {label: labels.count(label) / 14 for label in set(labels)}
    assert first["targets"]["sentiment"]["day"]["items"] == 14
    assert second == first


def test_stats_answer_503_naming_the_setting_when_their_redis_is_down(tmp_path: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with gateway_stack(tmp_path, redis_url=down, redis_backoff_s=60) as stack:
        r = httpx.post(f"{stack.url}/classify", json={"task": "sentiment", "input": ["x"]})
        assert r.status_code == 200, r.text  # answers never wait for the counts
        stats = httpx.get(f"{stack.url}/tasks/sentiment/stats", timeout=30)
    assert stats.status_code == 503, stats.text
    message = stats.json()["error"]["message"]
    assert "GATEWAY_REDIS_URL" in message and "127.0.0.1" not in message


async def test_counts_a_flush_could_not_write_go_with_the_next_one(own_redis: RedisServer) -> None:
    """Redis down: `add` still only updates memory (the answers never wait), the failed flush
    keeps its counts, and once Redis is back they reach it, added to the newer ones."""
    backend = open_redis(own_redis.url, 0.5)
    assert backend is not None
    counts = RedisCounts(backend, f"test:{uuid.uuid4().hex[:8]}", flush_s=3600)
    now = int(time.time()) // 60
    a, b = "l\x1fm\x1ft\x1fa", "l\x1fm\x1ft\x1fb"
    try:
        counts.add("t", now - 1, {a: 2})
        await counts.flush()
        own_redis.kill()
        counts.add("t", now - 1, {a: 3})
        counts.add("t", now - 90, {b: 1})  # before the last hour
        with pytest.raises((RedisError, OSError, TimeoutError)):
            await counts.flush()
        own_redis.restart()  # no persistence: the first 2 are gone with the old process
        counts.add("t", now - 90, {b: 4})
        deadline = Deadline(10)
        while True:  # redis-py reconnects on a later call
            try:
                hour, before = await counts.windows("t", now)
                break
            except (RedisError, OSError, TimeoutError):
                if deadline.expired():
                    raise
                await asyncio.sleep(0.1)
        assert (hour, before) == (Counter({a: 3}), Counter({b: 5}))
        assert 0 < await backend.client.ttl(counts.key("t", now - 1)) <= REDIS_TTL_S
    finally:
        await counts.aclose()
        await backend.aclose()


async def test_counts_work_on_a_redis_cluster(tmp_path: Path) -> None:
    """A task's buckets share one slot (`{task}`), so the summing script may read them all."""
    cluster = start_cluster(tmp_path / "cluster")
    backend = open_redis(cluster.url, 2.0)
    assert backend is not None and backend.kind == "cluster"
    counts = RedisCounts(backend, f"test:{uuid.uuid4().hex[:8]}", flush_s=3600)
    now = int(time.time()) // 60
    try:
        for task in ("sentiment", "intent"):  # two tasks: two slots
            counts.add(task, now, {"l\x1fm\x1ft\x1fa": 2})
            counts.add(task, now - 61, {"l\x1fm\x1ft\x1fb": 1})
        for task in ("sentiment", "intent"):
            assert await counts.windows(task, now) == (Counter({"l\x1fm\x1ft\x1fa": 2}),
                                                       Counter({"l\x1fm\x1ft\x1fb": 1}))
    finally:
        await counts.aclose()
        await backend.aclose()
        cluster.stop()
