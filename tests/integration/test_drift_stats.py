"""`GET /tasks/{name}/stats` and `gateway_predicted_labels_total` on a real gateway."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from service.commands.demo_runner import DATASETS, TASKS, train_task
from service.gateway.drift import psi
from tests.support.factory import running_factory
from tests.support.gateway import gateway_for, gateway_stack


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
