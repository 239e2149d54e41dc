"""Shadow models: a sampled share of a task's items also goes to another model, only to learn how
often the two agree on live traffic before that model takes any.

Why it is built this way:
- The caller never waits for, fails by, or sees the shadow: comparisons run in background tasks
  started after the answer is known (a cached answer is compared too: the primary's result is at
  hand), so they are never in the request's latency.
- Shed first: at most `max_pending` items wait for their shadow answer at any time; beyond that,
  and whenever the shadow fails or is slow, a comparison is dropped and counted
  (`gateway_shadow_dropped_total{task,reason}`), never retried at the caller's expense.
- Shadow items go through the same cache lookup and micro-batcher lane as any traffic to that
  model (so a busy lane's 429 is just another dropped comparison).
- Agreement is judged per target on the top label; the confusion table (task model's label x
  shadow's label) lives in Redis (`store.py`), shared by every replica.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

from service.gateway.classifier import Classifier
from service.gateway.errors import GatewayError, UpstreamTimeout
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result
from service.gateway.registry import TaskSpec
from service.gateway.store import Pair, ShadowStore
from service.tracing import ITEMS, MODEL, TASK, span

log = logging.getLogger("service.gateway.shadow")


def top_label(body: Any) -> str | None:
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, dict) or not scores:
        return None
    best: str = max(scores, key=scores.__getitem__)
    return best


def compare(primary: Sequence[Result], shadow: Sequence[Result]) -> tuple[list[Pair], int]:
    """(target, primary's top label, shadow's top label) for each item and target both answer;
    also how many item-targets the shadow left unanswered."""
    pairs: list[Pair] = []
    missing = 0
    for mine, theirs in zip(primary, shadow, strict=True):
        for target, body in mine.items():
            ours, other = top_label(body), top_label(theirs.get(target))
            if ours is None or other is None:
                missing += 1
                continue
            pairs.append((target, ours, other))
    return pairs, missing


class ShadowRunner:
    """The classifier's `ShadowSink`: see the module docstring."""

    def __init__(self, classifier: Classifier, store: ShadowStore, metrics: GatewayMetrics, *,
                 max_pending: int, rng: random.Random | None = None) -> None:
        self._classifier = classifier
        self._store = store
        self._metrics = metrics
        self._max_pending = max_pending
        self._rng = rng or random.Random()
        self._pending = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return self._pending

    def offer(self, task: TaskSpec, items: Sequence[Any], results: Sequence[Result],
              models: Sequence[str]) -> None:
        shadow = task.shadow
        if shadow is None or shadow.sample <= 0.0:
            return
        # The task's answers: its model's, or a cascade's final ones, whichever stage gave them
        # (not a fallback's or a canary's).
        answering = {task.model, *(stage.model for stage in task.cascade)}
        picked = [(item, result) for item, result, model in zip(items, results, models, strict=True)
                  if model in answering and self._rng.random() < shadow.sample]
        if not picked:
            return
        if self._pending + len(picked) > self._max_pending:
            self._drop(task, "queue_full", len(picked))
            return
        self._pending += len(picked)
        job = asyncio.get_running_loop().create_task(self._compare(task, picked),
                                                     name=f"shadow-{task.name}")
        self._tasks.add(job)
        job.add_done_callback(self._tasks.discard)

    async def _compare(self, task: TaskSpec, picked: list[tuple[Any, Result]]) -> None:
        assert task.shadow is not None
        # A child of the request's span (the task inherits its context), ending after it.
        with span(self._classifier.tracing, "gateway.shadow",
                  {TASK: task.name, MODEL: task.shadow.model, ITEMS: len(picked)}):
            await self._compare_untraced(task, picked)

    async def _compare_untraced(self, task: TaskSpec, picked: list[tuple[Any, Result]]) -> None:
        assert task.shadow is not None
        upstream, route = task.shadow_route()
        try:
            answers = await self._classifier.answer(task, upstream, route,
                                                    [item for item, _ in picked])
        except UpstreamTimeout:
            self._drop(task, "timeout", len(picked))
            return
        except GatewayError as exc:
            log.info("task %s: shadow %s failed (%s); comparisons dropped", task.name,
                     route.model, exc.message)
            self._drop(task, "error", len(picked))
            return
        except Exception:
            log.exception("task %s: shadow comparison failed", task.name)
            self._drop(task, "error", len(picked))
            return
        finally:
            self._pending -= len(picked)
        pairs, missing = compare([result for _, result in picked], answers)
        if missing:
            self._drop(task, "target_missing", missing)
        counter = self._metrics.shadow_comparisons
        for target, ours, other in pairs:
            self._metrics.child(counter, task.name, target,
                                "agree" if ours == other else "disagree").inc()
        if pairs:
            await self._store.record(task.name, task.model, route.model, pairs)

    def _drop(self, task: TaskSpec, reason: str, count: int) -> None:
        self._metrics.child(self._metrics.shadow_dropped, task.name, reason).inc(count)

    async def aclose(self) -> None:
        """Shutdown: comparisons still waiting are dropped (they never matter to a caller)."""
        for job in list(self._tasks):
            job.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
