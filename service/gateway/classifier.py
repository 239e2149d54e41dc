"""Classifier: one request's journey through cache, single flight, batcher, upstream and the
task's fallbacks.

Routes stay thin: they validate and shape; this module decides where each item's answer comes from.
Cached values are the upstream's per-item result in Mistral's shape, so a task's threshold or label
post-processing can change without invalidating the cache, and tasks sharing a model share cache
entries. Entries are keyed by the model that answered: a fallback's answers never pass for the
primary's once it is back.

Cascades: a task with a `cascade` asks its stages in turn, each with the items the stages before it
were not sure of, in one call per stage (`_cascade`); each stage's answers are cached under its own
model. A stage before the last that fails hands all its items on (the cheap model being down must
not fail the call); the last stage has the task's fallbacks.

Fallbacks: when the task's model fails after its retries, or its circuit is open
(`UpstreamUnavailable`), answers with a broken body (`UpstreamBadResponse`) or times out with time
left on the request's deadline, the items the cache did not answer go to the task's fallbacks in
order, each with its own cache lookup and batching. A 4xx the upstream blames on the request
(`UpstreamRejected`) is never retried elsewhere: another model would refuse it too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from service.gateway.batcher import LaneKey, MicroBatcher, OnResults, PendingItem
from service.gateway.cache import ResultCache, cache_key
from service.gateway.errors import (
    ClientGone,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result, Route
from service.gateway.registry import TaskSpec, UpstreamSpec
from service.gateway.tenants import DEFAULT_TENANT
from service.gateway.upstream import UpstreamPool
from service.tracing import (
    CACHE_HITS,
    FALLBACK_FROM,
    ITEMS,
    MODEL,
    SHARED,
    TASK,
    UPSTREAM,
    Tracing,
)

log = logging.getLogger("service.gateway.classifier")

CacheStatus = Literal["hit", "miss", "partial"]
Disconnected = Callable[[], Awaitable[None]]
#: The caller's admission (its quota's decision): returns when the request may go on, raises
#: (a 429) when it may not. Awaited before any item is sent upstream and before an answer is
#: counted or offered anywhere, not before the cache lookup, which may share its Redis write.
Admitted = Callable[[], Awaitable[None]]
# Time a request must have left for a resend after a borrowed timeout; also absorbs timers that fire
# up to a millisecond early.
_RESEND_MIN_S = 0.01


@dataclass(frozen=True)
class Outcome:
    """`models[i]`: the model that answered item i (the task's, its canary's, or a fallback's);
    `fallback_from`: the model that failed when a fallback answered some items."""

    results: list[Result]
    cache_status: CacheStatus
    models: list[str]
    fallback_from: str | None = None
    #: Items answered from the cache (usage counts them per key).
    hits: int = 0
    #: The response's id, given by the route (feedback names a response by it).
    id: str = ""

    @property
    def model(self) -> str:
        """The model that answered every item; the first one's when items split."""
        return self.models[0]

    @property
    def split(self) -> bool:
        return any(m != self.models[0] for m in self.models)


class PredictionSink(Protocol):
    """Where every answered item's labels, and a cascade's items per stage, are counted
    (drift.py). Both are called on the response path and must not wait."""

    def observe(self, task: TaskSpec, results: Sequence[Result],
                models: Sequence[str]) -> None: ...

    def cascaded(self, task: TaskSpec, answered: Sequence[int]) -> None: ...


class ShadowSink(Protocol):
    """Where answered items go to be compared with the task's shadow model (shadow.py)."""

    def offer(self, task: TaskSpec, items: Sequence[Any], results: Sequence[Result],
              models: Sequence[str]) -> None: ...


def sticky_share(task: str, model: str, item: Any) -> float:
    """A number in [0, 1) fixed by the task, the candidate model and the item: the same input goes
    to the same model for as long as the weights stand (so cached answers stay consistent), and a
    new candidate draws a fresh split."""
    digest = hashlib.blake2b(orjson.dumps((task, model, item), option=orjson.OPT_SORT_KEYS),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class _Served:
    results: list[Result]
    misses: int
    model: str
    fallback_from: str | None


#: Failures after which the task's fallbacks are tried (see the module docstring).
FALLBACK_ON = (UpstreamUnavailable, UpstreamBadResponse, UpstreamTimeout)


def cache_scope(upstream: UpstreamSpec, route: Route) -> str:
    """What, besides the model and the item, makes a cached answer this route's: the protocol
    says (`answer_scope`), since only it knows whether its answers depend on the route's target
    and labels."""
    return upstream.wire.answer_scope(upstream.base_url, route)


def _cache_status(hits: int, total: int) -> CacheStatus:
    if hits == 0:
        return "miss"
    return "hit" if hits == total else "partial"


def cache_writer(cache: ResultCache) -> OnResults:
    """The batcher's completion hook: fresh results go to Redis in one pipeline, off the
    response path (the batch's waiters are already answered when this runs)."""

    def write(items: Sequence[PendingItem], results: Sequence[Result]) -> None:
        cache.schedule_set_many([
            (item.key, orjson.dumps(result), item.ttl_s)
            for item, result in zip(items, results, strict=True)
            if item.ttl_s > 0
        ])
    return write


@dataclass(frozen=True)
class CurrentUpstream:
    """Sends a batch through the client the pool holds for this upstream when the batch leaves,
    not when its items were queued: a reload that re-points the upstream retires the old client,
    and items still queued must go through the new one."""

    name: str
    pool: UpstreamPool
    specs: Callable[[], Mapping[str, UpstreamSpec]]

    async def classify(self, route: Route, inputs: list[Any], *,
                       deadline: float) -> list[Result]:
        spec = self.specs().get(self.name)
        if spec is None:
            raise UpstreamUnavailable(
                f"Upstream {self.name!r} was removed from the tasks file while these items "
                "were queued; retry, and the request will use the current tasks.",
                retry_after_s=1.0)
        return await self.pool.get(spec).classify(route, inputs, deadline=deadline)


class Classifier:
    def __init__(self, *, batcher: MicroBatcher, upstreams: UpstreamPool,
                 upstream_specs: Callable[[], Mapping[str, UpstreamSpec]],
                 cache: ResultCache | None, metrics: GatewayMetrics, cache_prefix: str,
                 default_ttl_s: int, default_timeout_s: float,
                 tracing: Tracing | None = None) -> None:
        self._batcher = batcher
        self._upstreams = upstreams
        self._upstream_specs = upstream_specs
        self._senders: dict[str, CurrentUpstream] = {}
        self._cache = cache
        self._metrics = metrics
        self._prefix = cache_prefix
        self._default_ttl_s = default_ttl_s
        self._default_timeout_s = default_timeout_s
        #: None when tracing is off (service/tracing.py): every hook below is then a no-op.
        self.tracing = tracing
        #: Set by the app once built: the label counts of drift.py.
        self.predictions: PredictionSink | None = None
        #: Set by the app once built (they answer through this classifier): see shadow.py.
        self.shadow: ShadowSink | None = None

    async def classify(self, task: TaskSpec, upstream: UpstreamSpec, items: Sequence[Any], *,
                       read_cache: bool = True,
                       disconnected: Disconnected | None = None,
                       tenant: str = DEFAULT_TENANT,
                       admitted: Admitted | None = None, response_id: str = "") -> Outcome:
        """One result per item, in input order, from the cache, the task's model (or its canary,
        for the items the canary's weight sends there) or, when that fails, its fallbacks (see
        the module docstring). Items answered by the task's model are then offered to its shadow.

        `disconnected` returns when the caller hangs up; its items are then released, so that
        nobody's abandoned work is sent upstream.

        `tenant` joins the cache key (and so single flight) unless the task's `cache_scope` is
        `shared`: one tenant is never answered from another's entries. Tenant `default` keeps the
        keys it had before tenants existed.

        `admitted`: the caller's quota decision (see `Admitted`); `response_id`: the answer's
        id, carried by the Outcome (set here rather than copied in by the route: a frozen
        dataclass's `replace` cost 3-5 us per request)."""
        timeout_s = task.timeout_s or self._default_timeout_s
        partition = None if task.cache_scope == "shared" or tenant == DEFAULT_TENANT else tenant
        deadline = time.monotonic() + timeout_s
        ttl_s = self._default_ttl_s if task.cache_ttl_s is None else task.cache_ttl_s
        canary = task.canary
        if task.cascade:
            results, models, misses, fallback_from = await self._cascade(
                task, items, ttl_s, deadline, timeout_s, read_cache, disconnected, partition,
                admitted)
        elif canary is None or canary.weight <= 0.0:
            served = await self._serve(task, task.candidates(), items, ttl_s, deadline,
                                       timeout_s, read_cache, disconnected, partition, admitted)
            results, models = served.results, [served.model] * len(items)
            misses, fallback_from = served.misses, served.fallback_from
        else:
            chosen = [sticky_share(task.name, canary.model, item) < canary.weight
                      for item in items]
            groups = [(chain, [i for i, c in enumerate(chosen) if c == to_canary], to_canary)
                      for chain, to_canary in ((task.candidates(), False),
                                               (task.canary_candidates(), True))]
            groups = [group for group in groups if group[1]]
            done = await asyncio.gather(
                *(self._serve_group(task, chain, [items[i] for i in where], ttl_s, deadline,
                                    timeout_s, read_cache, disconnected, partition, admitted,
                                    canary=to_canary)
                  for chain, where, to_canary in groups),
                return_exceptions=True)
            failed = next((d for d in done if isinstance(d, BaseException)), None)
            if failed is not None:
                raise failed
            results = [{}] * len(items)
            models = [""] * len(items)
            misses, fallback_from = 0, None
            for (_, where, _), part in zip(groups, done, strict=True):
                assert isinstance(part, _Served)
                for i, result in zip(where, part.results, strict=True):
                    results[i], models[i] = result, part.model
                misses += part.misses
                fallback_from = fallback_from or part.fallback_from
        if admitted is not None:
            await admitted()  # nothing is counted for a request its quota refuses
        counted = self._metrics.model_items
        for model in dict.fromkeys(models):
            self._metrics.child(counted, task.name, model).inc(models.count(model))
        if task.shadow is not None and self.shadow is not None:
            self.shadow.offer(task, items, results, models)
        if self.predictions is not None:
            self.predictions.observe(task, results, models)
        if self.tracing is not None:
            self.tracing.set({TASK: task.name, MODEL: ", ".join(dict.fromkeys(models)),
                              ITEMS: len(items), CACHE_HITS: len(items) - misses})
        return Outcome(results, _cache_status(len(items) - misses, len(items)), models,
                       fallback_from, hits=len(items) - misses, id=response_id)

    async def _cascade(self, task: TaskSpec, items: Sequence[Any], ttl_s: int, deadline: float,
                       timeout_s: float, read_cache: bool, disconnected: Disconnected | None,
                       partition: str | None = None, admitted: Admitted | None = None,
                       ) -> tuple[list[Result], list[str], int, str | None]:
        """Results, the model of each, cache misses and the failed model (when the last stage's
        fallback answered), from the task's cascade (see the module docstring); every stage's
        cache in the caller's `partition` (tenant), as for a task without a cascade."""
        results: list[Result] = [{}] * len(items)
        models = [""] * len(items)
        misses = 0
        fallback_from: str | None = None
        pending = list(range(len(items)))
        answered: list[int] = []
        for chain, min_margin in task.cascade_chains():
            asked = [items[i] for i in pending]
            if min_margin is None:  # the last stage: every item left, with the task's fallbacks
                served = await self._serve(task, chain, asked, ttl_s, deadline, timeout_s,
                                           read_cache, disconnected, partition, admitted)
                for i, result in zip(pending, served.results, strict=True):
                    results[i], models[i] = result, served.model
                misses += served.misses
                fallback_from = served.fallback_from
                answered.append(len(pending))
                pending = []
                break
            (upstream, route), = chain
            try:
                served = await self._serve(task, chain, asked, ttl_s, deadline, timeout_s,
                                           read_cache, disconnected, partition, admitted)
            except FALLBACK_ON as exc:
                log.info("task %s: cascade stage %s/%s failed, its items go on: %s",
                         task.name, upstream, route.model, exc.message)
                answered.append(0)
                continue
            misses += served.misses
            left = []
            for i, result in zip(pending, served.results, strict=True):
                if certainty(result, route.target, task) >= min_margin:
                    results[i], models[i] = result, served.model
                else:
                    left.append(i)
            answered.append(len(pending) - len(left))
            pending = left
            if not pending:
                break
        # An item can miss the cache at several stages; counted once, so `hits` never goes
        # below zero (a one-item request that missed twice answered X-Cache `partial`).
        misses = min(misses, len(items))
        if admitted is not None:
            await admitted()  # a refused request's stages count nothing
        for stage, count in enumerate(answered, start=1):
            if count:
                self._metrics.child(self._metrics.cascade_items, task.name, str(stage)).inc(count)
        if self.predictions is not None:  # GET /tasks/{name}'s escalation share (drift.py)
            self.predictions.cascaded(task, answered)
        return results, models, misses, fallback_from

    async def answer(self, task: TaskSpec, upstream: str, route: Route,
                     items: Sequence[Any]) -> list[Result]:
        """One model's answers, through the cache and its batcher lane, under the task's TTL and
        deadline, with no fallback: for shadow comparisons."""
        spec = self._upstream_specs().get(upstream)
        if spec is None:
            raise UpstreamUnavailable(f"Upstream {upstream!r} is not in the tasks file.")
        timeout_s = task.timeout_s or self._default_timeout_s
        ttl_s = self._default_ttl_s if task.cache_ttl_s is None else task.cache_ttl_s
        results, _ = await self._answer(task, spec, route, items, ttl_s,
                                        time.monotonic() + timeout_s, timeout_s, True, None)
        return results

    async def stage_answers(self, task: TaskSpec, stage: int,
                            items: Sequence[Any]) -> tuple[str, list[Result]]:
        """The model of cascade stage `stage` (0-based) and its own answers for `items`, for
        `tasks calibrate` (POST /admin/tasks/{name}/cascade/{stage}): through the stage's batcher
        lane and upstream client (so any protocol), but with TTL 0, so never read from the cache
        nor written to it, no fallback, no routing by margin, and not counted as the task's
        answers (no shadow, drift or cascade counts): what calibration measures is the model."""
        (upstream, route), = task.cascade_chains()[stage][0][:1]
        spec = self._upstream_specs().get(upstream)
        if spec is None:
            raise UpstreamUnavailable(f"Upstream {upstream!r} is not in the tasks file.")
        timeout_s = task.timeout_s or self._default_timeout_s
        results, _ = await self._answer(task, spec, route, items, 0,
                                        time.monotonic() + timeout_s, timeout_s, False, None)
        return route.model, results

    async def _serve_group(self, task: TaskSpec, chain: list[tuple[str, Route]],
                           items: Sequence[Any], ttl_s: int, deadline: float, timeout_s: float,
                           read_cache: bool, disconnected: Disconnected | None,
                           partition: str | None, admitted: Admitted | None, *,
                           canary: bool) -> _Served:
        """`_serve` for one side of a canary split, the canary's side in its own span."""
        if not canary or self.tracing is None:
            return await self._serve(task, chain, items, ttl_s, deadline, timeout_s, read_cache,
                                     disconnected, partition, admitted)
        with self.tracing.span("gateway.canary", {TASK: task.name, MODEL: chain[0][1].model,
                                                  ITEMS: len(items)}):
            return await self._serve(task, chain, items, ttl_s, deadline, timeout_s, read_cache,
                                     disconnected, partition, admitted)

    async def _serve(self, task: TaskSpec, chain: list[tuple[str, Route]], items: Sequence[Any],
                     ttl_s: int, deadline: float, timeout_s: float, read_cache: bool,
                     disconnected: Disconnected | None, partition: str | None = None,
                     admitted: Admitted | None = None) -> _Served:
        """The first model of `chain` that answers: the task's (or canary's), then its
        fallbacks. With a single model, its error is the caller's as it is."""
        specs = self._upstream_specs()
        reasons: list[str] = []
        first: UpstreamError | None = None
        for position, (name, route) in enumerate(chain):
            spec = specs.get(name)
            if spec is None:
                reasons.append(f"{name}/{route.model}: the upstream is no longer in the tasks file")
                continue
            if position > 0 and deadline - time.monotonic() <= _RESEND_MIN_S:
                break
            try:
                if position == 0 or self.tracing is None:  # the common case: no span, no dict
                    results, misses = await self._answer(task, spec, route, items, ttl_s,
                                                         deadline, timeout_s, read_cache,
                                                         disconnected, partition, admitted)
                else:
                    with self.tracing.span("gateway.fallback", {
                            UPSTREAM: name, MODEL: route.model,
                            FALLBACK_FROM: chain[0][1].model}):
                        results, misses = await self._answer(task, spec, route, items, ttl_s,
                                                             deadline, timeout_s, read_cache,
                                                             disconnected, partition, admitted)
            except FALLBACK_ON as exc:
                if len(chain) == 1:
                    raise
                if position > 0:
                    self._metrics.child(self._metrics.fallbacks, task.name, name, "error").inc()
                first = first or exc
                reasons.append(f"{name}/{route.model}: {exc.message}")
                continue
            if position == 0:
                return _Served(results, misses, route.model, None)
            self._metrics.child(self._metrics.fallbacks, task.name, name, "ok").inc()
            log.info("task %s: answered by %s/%s after %s", task.name, name, route.model,
                     "; ".join(reasons))
            return _Served(results, misses, route.model, chain[0][1].model)
        if first is None:
            raise UpstreamUnavailable(f"Task {task.name!r}: no upstream left to ask ("
                                      + "; ".join(reasons) + ").", retry_after_s=1.0)
        if len(reasons) == 1:
            message = (f"Task {task.name!r}: its model failed and the deadline left no time "
                       f"for a fallback ({reasons[0]}).")
        else:
            message = (f"Task {task.name!r}: its model and every fallback failed ("
                       + "; ".join(reasons) + ").")
        raise type(first)(message, retry_after_s=first.retry_after_s)

    async def _answer(self, task: TaskSpec, upstream: UpstreamSpec, route: Route,
                      items: Sequence[Any], ttl_s: int, deadline: float, timeout_s: float,
                      read_cache: bool, disconnected: Disconnected | None,
                      partition: str | None = None, admitted: Admitted | None = None,
                      ) -> tuple[list[Result], int]:
        """Results from the cache and one upstream; also how many items the cache missed.
        `partition`: the tenant whose cache (and single flight) this is, None for the shared one;
        `admitted`: awaited before any miss is sent (or joins another caller's flight)."""
        scope = cache_scope(upstream, route)
        if partition is not None:
            scope = f"{scope}\x00tenant={partition}"
        endpoint = upstream.wire.endpoint(route)
        keys = [cache_key(self._prefix, scope, endpoint, route.model, item) for item in items]
        # Identical items within one request are looked up and sent once.
        unique: dict[str, Any] = {}
        for key, item in zip(keys, items, strict=True):
            unique.setdefault(key, item)
        found: dict[str, Result] = {}
        if self._cache is not None and ttl_s > 0 and read_cache:
            found = await (self._lookup_untraced(task, list(unique)) if self.tracing is None
                           else self._lookup(task, list(unique)))
        misses = [(key, item) for key, item in unique.items() if key not in found]
        if misses:
            if admitted is not None:
                await admitted()
            lane = LaneKey(upstream.name, endpoint, route)
            found.update(await self._fetch(task, lane, misses, ttl_s, deadline, timeout_s,
                                           disconnected))
        miss_keys = {key for key, _ in misses}
        return [found[key] for key in keys], sum(1 for key in keys if key in miss_keys)

    async def _lookup(self, task: TaskSpec, keys: list[str]) -> dict[str, Result]:
        if self.tracing is None:
            return await self._lookup_untraced(task, keys)
        with self.tracing.span("gateway.cache.lookup", {TASK: task.name, ITEMS: len(keys)}):
            found = await self._lookup_untraced(task, keys)
            self.tracing.set({CACHE_HITS: len(found)})
            return found

    async def _lookup_untraced(self, task: TaskSpec, keys: list[str]) -> dict[str, Result]:
        assert self._cache is not None
        metrics = self._metrics
        lookups = metrics.cache_lookups
        values = await self._cache.get_many(keys)
        if values is None:
            metrics.child(lookups, task.name, "error").inc(len(keys))
            return {}
        found: dict[str, Result] = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            try:
                found[key] = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a corrupt entry is a miss; the fresh result overwrites it
        metrics.child(lookups, task.name, "hit").inc(len(found))
        metrics.child(lookups, task.name, "miss").inc(len(keys) - len(found))
        return found

    async def _fetch(self, task: TaskSpec, lane: LaneKey,
                     misses: list[tuple[str, Any]], ttl_s: int, deadline: float,
                     timeout_s: float, disconnected: Disconnected | None) -> dict[str, Result]:
        """Results for `misses`. An item shared through single flight travels with the deadline
        of the batch it went out in, which another caller may have set shorter than ours: when
        such a batch times out while our own deadline is still ahead, the items it took down are
        sent again, under our deadline."""
        out: dict[str, Result] = {}
        while True:
            try:
                out.update(await self._fetch_once(task, lane, misses, ttl_s, deadline,
                                                  timeout_s, disconnected))
                return out
            except _BorrowedTimeout as borrowed:
                out.update(borrowed.done)
                misses = [(key, item) for key, item in misses if key not in out]

    async def _fetch_once(self, task: TaskSpec, lane: LaneKey,
                          misses: list[tuple[str, Any]], ttl_s: int, deadline: float,
                          timeout_s: float, disconnected: Disconnected | None
                          ) -> dict[str, Result]:
        if self.tracing is None:
            return await self._fetch_untraced(task, lane, misses, ttl_s, deadline, timeout_s,
                                              disconnected)
        # The span the batcher's wait spans hang from, and whose context the batch links to.
        with self.tracing.span("gateway.single_flight", {
                TASK: task.name, UPSTREAM: lane.upstream, MODEL: lane.model,
                ITEMS: len(misses), SHARED: self._batcher.shared(misses)}):
            return await self._fetch_untraced(task, lane, misses, ttl_s, deadline, timeout_s,
                                              disconnected)

    async def _fetch_untraced(self, task: TaskSpec, lane: LaneKey,
                              misses: list[tuple[str, Any]], ttl_s: int, deadline: float,
                              timeout_s: float, disconnected: Disconnected | None
                              ) -> dict[str, Result]:
        sender = self._senders.get(lane.upstream)
        if sender is None:
            sender = self._senders[lane.upstream] = CurrentUpstream(
                lane.upstream, self._upstreams, self._upstream_specs)
        pending = self._batcher.submit(lane, sender, misses, ttl_s=ttl_s, deadline=deadline)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._batcher.release(pending)

        # On the first failed batch, the rest of this request's items are released from inside
        # the future's callback, before the batcher sends its next batch. `finished` is our own
        # future (the items' futures are shared and never awaited directly): True once every item
        # is done or one failed, False when the deadline or a disconnect comes first.
        finished = _all_done([item.future for item in pending], on_failure=release)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _settle, finished)
        watcher = None
        # Only items that wait in a queue can be dropped, so only then is a disconnect worth a
        # watcher task; items that leave in this event-loop turn are sent whatever happens.
        if disconnected is not None and not all(item.leaves_now for item in pending):
            watcher = asyncio.ensure_future(disconnected())
            watcher.add_done_callback(lambda _: _settle(finished))
        try:
            complete = await finished
        except asyncio.CancelledError:
            release()
            raise
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
        if not complete:
            release()
            if watcher is not None and watcher.done() and not watcher.cancelled():
                raise ClientGone("The client disconnected before the upstream answered.")
            raise UpstreamTimeout(
                f"Task {task.name!r} got no answer within its {timeout_s:g} s deadline; raise "
                "`timeout_s` for the task or check the upstream's latency."
            )
        out: dict[str, Result] = {}
        for item in pending:
            future = item.future
            if not future.done() or future.cancelled() or future.exception() is not None:
                # One batch failed (or this item was dropped at the same instant by another
                # caller): the answer is an error already, so the items still queued are not sent.
                release()
                failed = next((i.future for i in pending if i.future.done()
                               and not i.future.cancelled() and i.future.exception()), None)
                error = failed.exception() if failed is not None else None
                if isinstance(error, UpstreamTimeout) and deadline - time.monotonic() > _RESEND_MIN_S:
                    raise _BorrowedTimeout({i.key: i.future.result() for i in pending
                                            if i.future.done() and not i.future.cancelled()
                                            and i.future.exception() is None})
                if error is not None:
                    raise error
                raise UpstreamTimeout("The request was abandoned before the upstream answered.")
            out[item.key] = future.result()
        return out


class _BorrowedTimeout(Exception):
    """A batch timed out on another caller's shorter deadline; ours has time left."""

    def __init__(self, done: dict[str, Result]) -> None:
        super().__init__("a shared batch timed out before this request's deadline")
        self.done = done


def _all_done(futures: list[asyncio.Future[Result]],
              on_failure: Callable[[], None]) -> asyncio.Future[bool]:
    """A future set to True when all of `futures` have completed, or as soon as one fails, without
    owning (or cancelling) them: they are shared with other callers through single flight."""
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    left = len(futures)

    def one_done(future: asyncio.Future[Result]) -> None:
        nonlocal left
        left -= 1
        failed = not future.cancelled() and future.exception() is not None
        if failed:
            on_failure()
        if (left == 0 or failed) and not done.done():
            done.set_result(True)

    for future in futures:
        future.add_done_callback(one_done)
    return done


def _settle(finished: asyncio.Future[bool]) -> None:
    """The deadline passed or the caller left before the items were done."""
    if not finished.done():
        finished.set_result(False)


def certainty(result: Result, target: str, task: TaskSpec) -> float:
    """How sure a cascade stage is of an item, on the task's target: the top score of a
    multi-label target; else the top-two margin (the top score alone with one label). A result
    without that target's scores is not sure at all: the item goes on."""
    body = result.get(target)
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, dict) or not scores:
        return -1.0
    ranked = sorted((float(s) for s in scores.values()), reverse=True)
    if target in task.multi_label_targets or len(ranked) == 1:
        return ranked[0]
    return ranked[0] - ranked[1]


def decorate(task: TaskSpec, result: Result) -> dict[str, Any]:
    """Add `label` (single-label target) or `labels` (multi-label target, by the task's threshold).

    Builds new dicts: `result` may be shared with other requests through single flight."""
    out: dict[str, Any] = {}
    for target, body in result.items():
        scores = body.get("scores") if isinstance(body, dict) else None
        if not isinstance(scores, dict) or not scores:
            raise UpstreamBadResponse(
                f"Upstream result for target {target!r} of task {task.name!r} has no scores."
            )
        if target in task.multi_label_targets:
            chosen = sorted((lbl for lbl, s in scores.items() if s >= task.threshold),
                            key=lambda lbl: -scores[lbl])
            out[target] = {"scores": scores, "labels": chosen}
        else:
            out[target] = {"scores": scores, "label": max(scores, key=scores.__getitem__)}
    return out
