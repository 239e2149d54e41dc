"""`GET /tasks/{name}/stats` and `gateway_predicted_labels_total` on a real gateway."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.gateway import gateway_stack


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
