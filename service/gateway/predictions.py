"""The sampled prediction log: a share of a task's answers, kept for a while, for audits, drift
investigations and new training data.

Why it looks like this:
- Per task, `log: {sample, inputs, retention_days}` in the tasks file. Sampling is per item, on
  the response path, and costs one random draw per item; everything else happens off it.
- Off the response path through a bounded queue: `offer()` only builds the sampled entries and
  puts them in a deque of at most `max_queue` entries; one writer task sends them to Redis in
  pipelines. A full queue (Redis slow or down) drops and counts
  (`gateway_predictions_dropped_total{task,reason}`), never waits: a log must not slow answers.
- Never an input unless the task says `inputs: true`; otherwise a keyed hash of it (HMAC-SHA256
  under `GATEWAY_PREDICTIONS_HASH_KEY`, so that equal inputs can be joined without storing them,
  and a guessed input cannot be confirmed without the key).
- One Redis Stream per task, in the feedback Redis. It never grows without bound: each write
  trims it by age (`XTRIM MINID`, the task's `retention_days`, by the injected clock) and by size
  (`MAXLEN ~ GATEWAY_PREDICTIONS_MAX_PER_TASK`).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import orjson

from service.gateway.classifier import Outcome
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result
from service.gateway.redis_clients import RedisPy
from service.gateway.registry import TaskSpec

log = logging.getLogger("service.gateway.predictions")
_StreamRows = list[tuple[bytes | str, dict[bytes | str, bytes | str]]]
_TOP_SCORES = 3


def _top(result: Result) -> tuple[dict[str, Any], dict[str, dict[str, float]], float]:
    """(labels, top scores, smallest top-two margin) over the result's targets."""
    labels: dict[str, Any] = {}
    tops: dict[str, dict[str, float]] = {}
    smallest = 1.0
    for target, body in result.items():
        scores = body.get("scores") if isinstance(body, dict) else None
        if not isinstance(scores, dict) or not scores:
            continue
        ranked = sorted(scores.items(), key=lambda kv: -float(kv[1]))
        labels[target] = ranked[0][0]
        tops[target] = {label: round(float(s), 6) for label, s in ranked[:_TOP_SCORES]}
        if len(ranked) >= 2:
            smallest = min(smallest, float(ranked[0][1]) - float(ranked[1][1]))
    return labels, tops, round(smallest, 6)


class PredictionLog:
    """See the module docstring. `redis` comes from redis_clients.open_redis; None: no Redis,
    and nothing is logged."""

    def __init__(self, redis: RedisPy | None, prefix: str, metrics: GatewayMetrics, *,
                 max_per_task: int, max_queue: int, hash_key: bytes = b"",
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self._client = None if redis is None else redis.client
        self._prefix = prefix
        self._metrics = metrics
        self._cap = max_per_task
        self._max_queue = max_queue
        # Without a configured key, a random one: hashes then join only within this process.
        self._hash_key = hash_key or os.urandom(32)
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue: collections.deque[tuple[str, float, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def key(self, task: str) -> str:
        return f"{self._prefix}:predictions:{{{task}}}"

    def input_hash(self, item: Any) -> str:
        return hmac.new(self._hash_key, orjson.dumps(item, option=orjson.OPT_SORT_KEYS),
                        hashlib.sha256).hexdigest()

    # -- after each response: the sampled items only, then back to the caller --
    def offer(self, task: TaskSpec, items: Sequence[Any], outcome: Outcome,
              latency_s: float, *, key_id: str | None = None,
              tenant: str | None = None) -> None:
        """Sample `items` into the task's log, off the response path. `key_id` and `tenant`:
        the issued key that asked (tenants.py), recorded where there is one, never a secret."""
        spec = task.log
        if spec is None or self._client is None or spec.sample <= 0.0:
            return
        now = self._clock()
        split = outcome.split
        for index, (item, result, model) in enumerate(
                zip(items, outcome.results, outcome.models, strict=True)):
            if spec.sample < 1.0 and self._rng.random() >= spec.sample:
                continue
            if len(self._queue) >= self._max_queue:
                self._metrics.child(self._metrics.predictions_dropped, task.name,
                                    "queue_full").inc()
                continue
            labels, tops, low = _top(result)
            entry: dict[str, Any] = {
                "time": round(now, 3), "task": task.name, "model": model,
                "response_id": outcome.id, "index": index, "labels": labels, "scores": tops,
                "margin": low, "latency_ms": round(latency_s * 1000, 3),
                "cache": outcome.cache_status}
            if key_id:
                entry["key_id"], entry["tenant"] = key_id, tenant
            if split:
                entry["models"] = outcome.models
            if spec.inputs:
                entry["input"] = item
            else:
                entry["input_sha256"] = self.input_hash(item)
            self._queue.append((task.name, now - spec.retention_days * 86400,
                                orjson.dumps(entry)))
        if self._queue:
            self._wake.set()
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self.flush_once()

    async def flush_once(self, max_entries: int = 500) -> None:
        """Send up to `max_entries` queued entries in one pipeline, trimming each stream."""
        assert self._client is not None
        batch = [self._queue.popleft() for _ in range(min(max_entries, len(self._queue)))]
        oldest: dict[str, float] = {}
        for task, keep_after, _ in batch:
            oldest[task] = max(oldest.get(task, 0.0), keep_after)
        try:
            pipe = self._client.pipeline(transaction=False)
            for task, _, entry in batch:
                pipe.xadd(self.key(task), {"entry": entry}, maxlen=self._cap, approximate=True)
            for task, keep_after in oldest.items():
                pipe.xtrim(self.key(task), minid=f"{max(int(keep_after * 1000), 0)}-0",
                           approximate=False)
            await pipe.execute()
        except Exception as exc:  # the callers have their answers; only these entries are lost
            log.warning("prediction log: %d entries not saved (%s)", len(batch),
                        type(exc).__name__)
            for task, _, _ in batch:
                self._metrics.child(self._metrics.predictions_dropped, task, "error").inc()
            return
        for task, _, _ in batch:
            self._metrics.child(self._metrics.predictions_logged, task).inc()

    async def trim(self, task: TaskSpec) -> None:
        """Trim one task's stream by age now (also done on every write)."""
        assert self._client is not None and task.log is not None
        keep_after = self._clock() - task.log.retention_days * 86400
        await self._client.xtrim(self.key(task.name),
                                 minid=f"{max(int(keep_after * 1000), 0)}-0", approximate=False)

    # -- GET /predictions/{task} --
    async def page(self, task: str, after: str, since_s: float | None, limit: int
                   ) -> tuple[list[dict[str, Any]], str | None]:
        """Entries after stream id `after` ("0": from the start, or from `since_s` seconds ago);
        and the cursor for the next page (None at the end)."""
        assert self._client is not None
        if after != "0":
            low = f"({after}"
        elif since_s is not None:
            low = f"{max(int((self._clock() - since_s) * 1000), 0)}-0"
        else:
            low = "-"
        rows = cast(_StreamRows, await self._client.xrange(self.key(task), min=low, max="+",
                                                           count=limit))
        out = []
        for stream_id, fields in rows:
            raw = fields[b"entry"] if b"entry" in fields else fields["entry"]
            out.append({"id": _text(stream_id), **orjson.loads(raw)})
        cursor = _text(rows[-1][0]) if len(rows) == limit else None
        return out, cursor

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def aclose(self) -> None:
        """Shutdown: what is queued gets one more chance, bounded in time."""
        if self._client is not None and self._queue:
            try:
                async with asyncio.timeout(2.0):
                    while self._queue:
                        await self.flush_once()
            except TimeoutError:
                pass
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
