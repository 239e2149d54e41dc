"""Drift signals: what labels a task's model predicts, counted, windowed and compared.

Why it looks like this:
- `gateway_predicted_labels_total{task,target,label}` must stay bounded whatever the upstream
  answers: a target's labels are the task's `labels` when the tasks file names them, else the
  labels of the first answer the model gave (a classifier scores every label it knows, so one
  answer carries its whole label set), at most `MAX_LABELS`; anything else counts as `other`.
- The distribution over the last hour and day is kept in this replica's memory, in one-minute
  buckets (at most a day's worth, each at most `MAX_LABELS + 1` counts), so `GET
  /tasks/{name}/stats` answers without Redis. The Prometheus rule (deploy/prometheus) computes the
  same index cluster-wide from the counter.
- The population stability index compares the last hour with the 23 hours before it:
  `PSI = sum((p - q) * ln(p / q))` over labels, shares floored at `EPSILON` so that a label
  that appears or vanishes counts heavily but finitely. Above `PSI_THRESHOLD` (0.2, the usual
  "significant shift") the mix of answers has moved.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result
from service.gateway.registry import TaskSpec

MAX_LABELS = 64
OTHER = "other"
EPSILON = 1e-4
PSI_THRESHOLD = 0.2
HOUR_S = 3600
DAY_S = 86400
_BUCKET_S = 60


def psi(current: dict[str, float], reference: dict[str, float]) -> float:
    """Population stability index of two label distributions (shares summing to 1)."""
    total = 0.0
    for label in current.keys() | reference.keys():
        p = max(current.get(label, 0.0), EPSILON)
        q = max(reference.get(label, 0.0), EPSILON)
        total += (p - q) * math.log(p / q)
    return total


def shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: n / total for label, n in sorted(counts.items())} if total else {}


class _Target:
    """One (task, model, target): its allowed labels and its per-minute counts."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = frozenset(labels[:MAX_LABELS])
        self.buckets: deque[tuple[int, Counter[str]]] = deque()

    def add(self, minute: int, label: str) -> None:
        if not self.buckets or self.buckets[-1][0] != minute:
            self.buckets.append((minute, Counter()))
            while self.buckets and self.buckets[0][0] <= minute - DAY_S // _BUCKET_S:
                self.buckets.popleft()
        self.buckets[-1][1][label] += 1

    def window(self, now_minute: int, start_s: int, end_s: int) -> Counter[str]:
        """Counts from `start_s` to `end_s` seconds ago."""
        low, high = now_minute - start_s // _BUCKET_S, now_minute - end_s // _BUCKET_S
        out: Counter[str] = Counter()
        for minute, counts in self.buckets:
            if low < minute <= high:
                out.update(counts)
        return out


class LabelDrift:
    """Counts each answered item's top label per target (see the module docstring)."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self._targets: dict[tuple[str, str, str], _Target] = {}

    def observe(self, task: TaskSpec, results: Sequence[Result], models: Sequence[str]) -> None:
        minute = int(self._clock()) // _BUCKET_S
        counter = self._metrics.predicted_labels
        for result, model in zip(results, models, strict=True):
            for target, body in result.items():
                scores = body.get("scores") if isinstance(body, dict) else None
                if not isinstance(scores, dict) or not scores:
                    continue
                top = max(scores, key=scores.__getitem__)
                state = self._targets.get((task.name, model, target))
                if state is None:
                    known = task.route().labels or tuple(scores)
                    state = self._targets[(task.name, model, target)] = _Target(list(known))
                label = top if top in state.labels else OTHER
                state.add(minute, label)
                self._metrics.child(counter, task.name, target, label).inc()

    def stats(self, task: TaskSpec) -> dict[str, Any]:
        """The task model's label distribution per target over the last hour and day, and the
        index of the hour against the 23 hours before it."""
        now_minute = int(self._clock()) // _BUCKET_S
        targets: dict[str, Any] = {}
        for (name, model, target), state in self._targets.items():
            if name != task.name or model != task.model:
                continue
            hour = state.window(now_minute, HOUR_S, 0)
            day = state.window(now_minute, DAY_S, 0)
            before = state.window(now_minute, DAY_S, HOUR_S)
            current, reference = shares(hour), shares(before)
            index = psi(current, reference) if current and reference else None
            moved = sorted(current.keys() | reference.keys(),
                           key=lambda label: -abs(current.get(label, 0.0)
                                                  - reference.get(label, 0.0)))
            targets[target] = {
                "hour": {"items": sum(hour.values()), "distribution": current},
                "day": {"items": sum(day.values()), "distribution": shares(day)},
                "reference": {"window": "the 23 hours before the last hour",
                              "items": sum(before.values()), "distribution": reference},
                "psi": index,
                "drifted": index is not None and index > PSI_THRESHOLD,
                "moved": [{"label": label, "hour": current.get(label, 0.0),
                           "reference": reference.get(label, 0.0)} for label in moved[:5]],
            }
        return {"task": task.name, "model": task.model, "threshold": PSI_THRESHOLD,
                "scope": "this replica", "targets": targets}
