"""Corrected labels and the review queue: the loop from live predictions back to training data.

- **Feedback** (`POST /feedback`): the correct labels of an item, named by the `id` of an earlier
  response and the item's index (for tasks with `feedback: true`, whose responses are remembered
  for `GATEWAY_FEEDBACK_WINDOW_S`), or by the task and the input itself. Each correction is
  checked against the labels the task's model has (a typo must not become training data),
  appended to a Redis Stream per task, and acknowledged only once Redis has it. A later
  correction of the same item replaces the earlier one at export (deduplicated per item).
- **Review queue** (task `review: {max_margin, sample}`): answers whose top-two score margin is
  under `max_margin` on some target (the model is unsure), plus a random control share `sample`
  (so reviewers also see what the model finds easy), are appended with their scores to another
  stream, off the response path.
- Both streams are capped per task (`GATEWAY_FEEDBACK_MAX_PER_TASK`, trimmed approximately, the
  oldest first) and live in the Redis of `GATEWAY_FEEDBACK_REDIS_URL` (default the cache's), shared
  by every replica. A cache Redis evicts and may not persist: run this one with
  `maxmemory-policy noeviction` and AOF persistence (docs/configuration.md).
- `GET /feedback/{task}` and `GET /review/{task}` page through them for
  `classifier-gateway feedback export` and `review export`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson

from service.gateway.classifier import Outcome, decorate
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result
from service.gateway.redis_clients import RedisPy
from service.gateway.registry import TaskSpec
from service.gateway.tenants import DEFAULT_TENANT
from service.tracing import ITEMS, TASK, Tracing, span

log = logging.getLogger("service.gateway.feedback")
#: How long `recall` waits for this replica's response records still being written before it
#: calls an id unknown: a write is one pipelined round trip (well under 10 ms), so 2 s only
#: matters when Redis is stalled, and then the caller gets its 404 rather than a hang.
RECALL_SETTLE_S = 2.0
_StreamRows = list[tuple[bytes | str, dict[bytes | str, bytes | str]]]  # XRANGE's reply


def item_digest(task: str, item: Any) -> str:
    """Which item a correction is about, whatever key order or route it came by."""
    return hashlib.sha256(orjson.dumps((task, item), option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def margin(result: Result) -> float:
    """The smallest top-two score margin over the result's targets (1.0 for one-label targets)."""
    smallest = 1.0
    for body in result.values():
        scores = sorted((body.get("scores") or {}).values(), reverse=True) \
            if isinstance(body, dict) else []
        if len(scores) >= 2:
            smallest = min(smallest, float(scores[0]) - float(scores[1]))
    return smallest


def label_sets(result: Result) -> dict[str, set[str]]:
    return {target: set((body.get("scores") or {}) if isinstance(body, dict) else ())
            for target, body in result.items()}


def predicted(task: TaskSpec, result: Result) -> dict[str, str | list[str]]:
    """The answer's labels as the caller saw them: the top label, or for a multi-label target
    every label at or over the task's threshold."""
    out: dict[str, str | list[str]] = {}
    for target, body in decorate(task, result).items():
        out[target] = body["labels"] if "labels" in body else body["label"]
    return out


class FeedbackUnavailable(Exception):
    """No Redis to keep feedback in, or it did not answer: nothing was stored."""


@dataclass(frozen=True)
class Remembered:
    """What a response said, kept for id-based feedback."""

    task: str
    kind: str
    items: list[Any]
    models: list[str]
    labels: list[dict[str, list[str]]]


class FeedbackBook:
    """See the module docstring. `redis` comes from redis_clients.open_redis; None: no Redis."""

    def __init__(self, redis: RedisPy | None, prefix: str, metrics: GatewayMetrics, *,
                 window_s: int, max_per_task: int, rng: random.Random | None = None,
                 tracing: Tracing | None = None) -> None:
        self._client = None if redis is None else redis.client
        self._tracing = tracing
        self._prefix = prefix
        self._metrics = metrics
        self._window_s = window_s
        self._cap = max_per_task
        self._rng = rng or random.Random()
        self._jobs: set[asyncio.Task[None]] = set()
        #: The write in flight for each response id that has one (`recall` waits on it alone).
        self._writing: dict[str, asyncio.Task[None]] = {}

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _key(self, what: str, task: str) -> str:
        return f"{self._prefix}:{what}:{{{task}}}"  # one task's keys in one cluster slot

    # -- after each response (hot path: nothing to do for tasks without feedback or review) --
    def after(self, response_id: str, task: TaskSpec, items: Sequence[Any], outcome: Outcome, *,
              key_id: str | None = None, tenant: str = DEFAULT_TENANT) -> None:
        """`key_id` and `tenant`: who sent the request, recorded with each review entry so that a
        tenant's entries can be exported alone."""
        if self._client is None or not (task.feedback or task.review is not None):
            return
        picks: list[dict[str, Any]] = []
        review = task.review
        if review is not None:
            for index, (item, result, model) in enumerate(
                    zip(items, outcome.results, outcome.models, strict=True)):
                low = margin(result)
                reason = ("low_margin" if low < review.max_margin else
                          "control" if self._rng.random() < review.sample else None)
                if reason is not None:
                    picks.append({"input": item, "scores": {t: b.get("scores") for t, b in
                                                            result.items()},
                                  "predicted": predicted(task, result),
                                  "model": model, "margin": round(low, 6), "reason": reason,
                                  "response_id": response_id, "index": index,
                                  "key_id": key_id, "tenant": tenant})
        remember = None
        if task.feedback:
            remember = orjson.dumps({"task": task.name, "kind": task.kind, "items": list(items),
                                     "models": outcome.models,
                                     "labels": [{t: sorted(s) for t, s in label_sets(r).items()}
                                                for r in outcome.results]})
        if picks or remember is not None:
            job = asyncio.get_running_loop().create_task(
                self._write_after(task.name, response_id, remember, picks))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)
            if remember is not None:
                self._writing[response_id] = job
                job.add_done_callback(lambda _: self._writing.pop(response_id, None))

    async def _write_after(self, task: str, response_id: str, remember: bytes | None,
                           picks: list[dict[str, Any]]) -> None:
        # A child of the request's span (the task inherits its context), ending after it.
        with span(self._tracing, "gateway.review", {TASK: task, ITEMS: len(picks)}):
            await self._write_after_untraced(task, response_id, remember, picks)

    async def _write_after_untraced(self, task: str, response_id: str, remember: bytes | None,
                                    picks: list[dict[str, Any]]) -> None:
        assert self._client is not None
        try:
            pipe = self._client.pipeline(transaction=False)
            if remember is not None:
                pipe.set(f"{self._prefix}:response:{response_id}", remember, ex=self._window_s)
            for pick in picks:
                pipe.xadd(self._key("review", task), {"entry": orjson.dumps(pick)},
                          maxlen=self._cap, approximate=True)
            await pipe.execute()
        except Exception as exc:  # the caller has its answer; only the record is lost
            log.warning("task %s: review/feedback record not saved (%s: %s)", task,
                        type(exc).__name__, exc)
            self._metrics.child(self._metrics.review_dropped, task).inc(len(picks))
            return
        for pick in picks:
            self._metrics.child(self._metrics.review_items, task, pick["reason"]).inc()

    async def recall(self, response_id: str) -> Remembered | None:
        if self._client is None:
            raise FeedbackUnavailable("feedback needs Redis: set GATEWAY_FEEDBACK_REDIS_URL or "
                                      "GATEWAY_REDIS_URL")
        raw = await self._get_response(response_id)
        writing = self._writing.get(response_id)
        if raw is None and writing is not None:
            # The record is written off the response path (`after`), so a client that sends
            # feedback as soon as it has its answer can come before it: on a busy replica, CI
            # saw the id unknown right after /classify. Let this id's write, in flight on this
            # replica, land (bounded by the client's timeouts), then look again. An id with no
            # write here (unknown, expired, another replica's) does not wait.
            await asyncio.wait({writing}, timeout=RECALL_SETTLE_S)
            raw = await self._get_response(response_id)
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Remembered(data["task"], data["kind"], data["items"], data["models"],
                          data["labels"])

    async def _get_response(self, response_id: str) -> bytes | str | None:
        assert self._client is not None
        try:
            raw: bytes | str | None = await self._client.get(
                f"{self._prefix}:response:{response_id}")
        except Exception as exc:
            raise FeedbackUnavailable(f"Redis did not answer ({type(exc).__name__})") from None
        return raw

    # -- POST /feedback --
    async def add(self, task: str, item: Any, labels: dict[str, Any], model: str | None,
                  response_id: str | None, index: int | None, *, key_id: str | None = None,
                  tenant: str = DEFAULT_TENANT) -> tuple[str, bool]:
        """Append one correction; (its stream id, whether it replaces an earlier one). A
        correction replaces an earlier one of the same item by the same tenant only: tenants
        may label alike inputs differently."""
        if self._client is None:
            raise FeedbackUnavailable("feedback needs Redis: set GATEWAY_FEEDBACK_REDIS_URL or "
                                      "GATEWAY_REDIS_URL")
        digest = item_digest(task, item if tenant == DEFAULT_TENANT else [tenant, item])
        entry = {"input": item, "labels": labels, "model": model, "response_id": response_id,
                 "index": index, "digest": digest, "received_at": round(time.time(), 3),
                 "key_id": key_id, "tenant": tenant}
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.xadd(self._key("feedback", task), {"entry": orjson.dumps(entry)},
                      maxlen=self._cap, approximate=True)
            stream_id = _text((await pipe.execute())[0])
            earlier = await self._client.hget(self._key("feedback-latest", task), digest)
            await self._client.hset(self._key("feedback-latest", task), digest, stream_id)
        except Exception as exc:
            raise FeedbackUnavailable(f"Redis did not take it ({type(exc).__name__}: {exc})") \
                from None
        self._metrics.child(self._metrics.feedback_items, task).inc()
        return stream_id, earlier is not None

    # -- GET /feedback/{task}, GET /review/{task} --
    async def page(self, what: str, task: str, after: str, limit: int,
                   tenant: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Entries after stream id `after` ("0" from the start); and the cursor for the next page
        (None at the end). Feedback pages hold only each item's latest correction; with `tenant`,
        only that tenant's entries (entries from before tenants count as `default`'s), so a page
        may hold fewer than `limit` and still have a next one."""
        if self._client is None:
            raise FeedbackUnavailable("feedback needs Redis: set GATEWAY_FEEDBACK_REDIS_URL or "
                                      "GATEWAY_REDIS_URL")
        try:
            # redis-py types a stream entry's id and fields as optional (XCLAIM's replies may
            # hold deleted entries); XRANGE's never do, and a missing stream gives [].
            rows = cast(_StreamRows, await self._client.xrange(
                self._key(what, task), min=f"({after}" if after != "0" else "-", max="+",
                count=limit))
            latest = (await self._client.hgetall(self._key("feedback-latest", task))
                      if what == "feedback" else {})
        except Exception as exc:
            raise FeedbackUnavailable(f"Redis did not answer ({type(exc).__name__})") from None
        latest_ids = {_text(v) for v in latest.values()}
        out = []
        for stream_id, fields in rows:
            sid = _text(stream_id)
            entry = orjson.loads(fields[b"entry"] if b"entry" in fields else fields["entry"])
            if what == "feedback" and sid not in latest_ids:
                continue  # replaced by a later correction of the same item
            if tenant is not None and entry.get("tenant", DEFAULT_TENANT) != tenant:
                continue
            out.append({"id": sid, **entry})
        cursor = _text(rows[-1][0]) if len(rows) == limit else None
        return out, cursor

    async def aclose(self) -> None:
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=2.0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
