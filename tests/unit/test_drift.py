"""Drift signals (service/gateway/drift.py): bounded label counts, windows, the stability index."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from service.gateway.drift import DAY_S, HOUR_S, PSI_THRESHOLD, LabelDrift, psi, training_shares
from service.gateway.metrics import GatewayMetrics
from service.gateway.registry import TaskSpec, parse_registry

MODEL = "ft:classifier:sentiment"
REGISTRY = parse_registry({
    "upstreams": {"up": {"base_url": "http://127.0.0.1:1"}},
    "tasks": {"sentiment": {"upstream": "up", "model": MODEL, "kind": "text"}},
})
TASK: TaskSpec = REGISTRY.tasks["sentiment"]
LABELS = ("positive", "negative", "neutral")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_040.0  # on a minute boundary

    def __call__(self) -> float:
        return self.now


def answer(top: str) -> dict[str, object]:
    scores = {label: 0.1 for label in LABELS}
    scores[top] = 0.8
    return {"sentiment": {"scores": scores}}


def feed(drift: LabelDrift, clock: Clock, mix: dict[str, int], seconds: int) -> None:
    """`mix` items per minute (label -> count), for `seconds`."""
    for _ in range(seconds // 60):
        results = [answer(label) for label, n in mix.items() for _ in range(n)]
        drift.observe(TASK, results, [MODEL] * len(results))
        clock.now += 60


def run(hour_mix: dict[str, int]) -> dict[str, Any]:
    clock = Clock()
    drift = LabelDrift(GatewayMetrics(CollectorRegistry()), clock)
    feed(drift, clock, {"positive": 7, "negative": 2, "neutral": 1}, DAY_S - HOUR_S)
    feed(drift, clock, hour_mix, HOUR_S)
    clock.now -= 1  # inside the last minute fed
    target: dict[str, Any] = asyncio.run(drift.stats(TASK))["targets"]["sentiment"]
    return target


def test_a_shifted_label_mix_raises_the_index_above_the_threshold() -> None:
    target = run({"positive": 3, "negative": 6, "neutral": 1})
    assert target["psi"] > PSI_THRESHOLD and target["drifted"]
    assert target["hour"]["items"] == 600
    assert target["hour"]["distribution"]["negative"] == 0.6
    assert target["reference"]["distribution"]["negative"] == 0.2
    assert [m["label"] for m in target["moved"]][:2] in (["positive", "negative"],
                                                         ["negative", "positive"])


def test_an_unshifted_mix_stays_below_the_threshold() -> None:
    target = run({"positive": 7, "negative": 2, "neutral": 1})
    assert target["psi"] < 0.01 and not target["drifted"]
    nearly = run({"positive": 6, "negative": 3, "neutral": 1})
    assert nearly["psi"] < PSI_THRESHOLD and not nearly["drifted"]


def test_labels_stay_bounded_by_the_models_own() -> None:
    clock = Clock()
    metrics = GatewayMetrics(CollectorRegistry())
    drift = LabelDrift(metrics, clock)
    drift.observe(TASK, [answer("positive")], [MODEL])
    # A later answer naming a label the model never had counts as `other`.
    drift.observe(TASK, [{"sentiment": {"scores": {"invented-1": 0.9, "positive": 0.1}}},
                         {"sentiment": {"scores": {"invented-2": 0.9}}}], [MODEL, MODEL])
    registry = metrics.registry
    value = registry.get_sample_value
    assert value("gateway_predicted_labels_total",
                 {"task": "sentiment", "target": "sentiment", "label": "other"}) == 2
    assert value("gateway_predicted_labels_total",
                 {"task": "sentiment", "target": "sentiment", "label": "positive"}) == 1
    labels = {s.labels["label"] for m in registry.collect() for s in m.samples
              if s.name == "gateway_predicted_labels_total"}
    assert labels == {"positive", "other"}


def test_psi_of_identical_distributions_is_zero_and_a_vanished_label_counts() -> None:
    assert psi({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0.0
    assert psi({"a": 1.0}, {"a": 0.5, "b": 0.5}) > 1.0


def test_training_shares_sum_the_training_files_and_ignore_the_validation_ones() -> None:
    job = {"validation": {
        "training:file-a": {"targets": {"sentiment": {"labels": {"positive": 3, "negative": 1}}}},
        "training:file-b": {"targets": {"sentiment": {"labels": {"negative": 2, "neutral": 2}}}},
        "validation:file-c": {"targets": {"sentiment": {"labels": {"neutral": 100}}}},
    }}
    assert training_shares(job) == {"sentiment": {"negative": 0.375, "neutral": 0.25,
                                                  "positive": 0.375}}
    assert training_shares({"validation": None}) == {}
    assert training_shares({}) == {}
