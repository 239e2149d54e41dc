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
- When the model is the factory's, the hour and the day are also compared with the label mix of
  its training data, read once per model from the factory's job (`GET /v1/models/{id}`, then
  `GET /v1/fine_tuning/jobs/{job}`: its `validation` report counts each label); a model whose
  upstream does not say (Mistral's API, other servers) has only the window reference.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result
from service.gateway.registry import TaskSpec, UpstreamSpec

log = logging.getLogger("service.gateway.drift")

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


def training_shares(job: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per target, each label's share of the training data, from a factory job's `validation`
    report (`{"training:FILE": {"targets": {name: {"labels": {label: count}}}}}`); {} when the job
    does not say."""
    counts: dict[str, Counter[str]] = {}
    validation = job.get("validation")
    if not isinstance(validation, dict):
        return {}
    for role, report in validation.items():
        if not str(role).startswith("training:") or not isinstance(report, dict):
            continue
        for name, target in (report.get("targets") or {}).items():
            labels = target.get("labels") if isinstance(target, dict) else None
            if isinstance(labels, dict):
                counts.setdefault(str(name), Counter()).update(
                    {str(k): int(v) for k, v in labels.items()})
    return {name: shares(c) for name, c in counts.items()}


async def fetch_training_shares(upstream: UpstreamSpec, model: str,
                                timeout_s: float = 2.0) -> dict[str, dict[str, float]]:
    """The training label mix of `model` from its upstream, when that is the factory (see the
    module docstring); {} when the upstream cannot say or does not answer."""
    if upstream.protocol != "mistral":
        return {}
    headers = {"accept": "application/json"}
    key = upstream.api_key()
    if key:
        headers["authorization"] = f"Bearer {key}"
    root = upstream.wire.root(upstream.base_url)
    try:
        async with httpx.AsyncClient(base_url=root, headers=headers, timeout=timeout_s,
                                     follow_redirects=False) as client:
            card = (await client.get(f"/v1/models/{model}")).raise_for_status().json()
            job_id = card.get("job") if isinstance(card, dict) else None
            if not isinstance(job_id, str) or not job_id:
                return {}
            job = (await client.get(f"/v1/fine_tuning/jobs/{job_id}")).raise_for_status().json()
    except (httpx.HTTPError, ValueError) as exc:
        # No URL nor key in the message: the type is enough to act on.
        log.info("drift: no training distribution for %s (%s)", model, type(exc).__name__)
        return {}
    return training_shares(job) if isinstance(job, dict) else {}


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
        #: model -> its training label shares per target ({}: the upstream does not say).
        self.training: dict[str, dict[str, dict[str, float]]] = {}

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
            training = self.training.get(model, {}).get(target)
            day_shares = shares(day)
            targets[target] = {
                "training": None if not training else {
                    "distribution": training,
                    "psi_hour": psi(current, training) if current else None,
                    "psi_day": psi(day_shares, training) if day_shares else None},
                "hour": {"items": sum(hour.values()), "distribution": current},
                "day": {"items": sum(day.values()), "distribution": day_shares},
                "reference": {"window": "the 23 hours before the last hour",
                              "items": sum(before.values()), "distribution": reference},
                "psi": index,
                "drifted": index is not None and index > PSI_THRESHOLD,
                "moved": [{"label": label, "hour": current.get(label, 0.0),
                           "reference": reference.get(label, 0.0)} for label in moved[:5]],
            }
        return {"task": task.name, "model": task.model, "threshold": PSI_THRESHOLD,
                "scope": "this replica", "targets": targets}
