"""MicroBatcher: packs cache misses of concurrent requests into upstream batches, per model.

Why it looks like this:
- At low load batching must cost nothing: an item that finds a free batch slot and an empty queue
  leaves at once. Batches form only from what queues while all `max_concurrent_batches` slots of its
  lane are busy; a partial batch then waits at most `max_wait_s` after its first item for company.
- Single flight: an item whose key is already pending (from this request or another) shares that
  item's future instead of going upstream twice.
- Futures are shared between callers, so callers never cancel them: they `release()` what they were
  waiting for, and an item nobody waits for any more is dropped before it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from service.gateway.errors import (
    GatewayError,
    QueueFull,
    ShuttingDown,
    UpstreamBadResponse,
    UpstreamError,
)
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result, Route
from service.tracing import BATCH_SIZE, ITEMS, MODEL, UPSTREAM, Tracing, iter_links, span

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext

_SHUTDOWN_MESSAGE = "The gateway is shutting down; retry on another replica."


class BatchSender(Protocol):
    """What the batcher needs of an upstream client."""

    async def classify(self, route: Route, inputs: list[Any], *,
                       deadline: float) -> list[Result]: ...


@dataclass(frozen=True)
class LaneKey:
    """One queue per model on an upstream; `endpoint` is the metric label of its path."""

    upstream: str
    endpoint: str
    route: Route

    @property
    def model(self) -> str:
        return self.route.model


@dataclass(eq=False)
class PendingItem:
    key: str
    payload: Any
    ttl_s: int
    deadline: float
    future: asyncio.Future[Result]
    lane: LaneKey
    enqueued_at: float = field(default_factory=time.monotonic)
    waiters: int = 1
    sent: bool = False
    leaves_now: bool = False  # arrived at an idle lane: sent at the end of this event-loop turn
    #: Tracing only: the spans of the requests waiting for this item (the batch links to them),
    #: and the span of its wait in the queue, ended when it leaves.
    traces: list[SpanContext] | None = None
    wait_span: Span | None = None


@dataclass(eq=False)
class _Lane:
    key: LaneKey
    sender: BatchSender
    queue: deque[PendingItem] = field(default_factory=deque)
    in_flight: int = 0
    timer: asyncio.TimerHandle | None = None
    flush_soon: bool = False


OnResults = Callable[[Sequence[PendingItem], Sequence[Result]], None]


def _retrieve(future: asyncio.Future[Result]) -> None:
    # A caller that went away leaves a shared future nobody reads; mark its exception as seen so that
    # asyncio does not log "exception was never retrieved" for an error that was already reported.
    if not future.cancelled():
        future.exception()


class MicroBatcher:
    def __init__(self, *, max_batch_items: int, max_wait_s: float, max_concurrent_batches: int,
                 max_queue_items: int, metrics: GatewayMetrics,
                 on_results: OnResults | None = None, tracing: Tracing | None = None) -> None:
        self.max_batch_items = max_batch_items
        self.max_wait_s = max_wait_s
        self.max_concurrent_batches = max_concurrent_batches
        self.max_queue_items = max_queue_items
        self._metrics = metrics
        self._on_results = on_results
        self._lanes: dict[LaneKey, _Lane] = {}
        self._pending: dict[str, PendingItem] = {}
        self._batches: set[asyncio.Task[None]] = set()
        self._draining = False
        self._tracing = tracing

    def shared(self, items: Sequence[tuple[str, Any]]) -> int:
        """How many of `items` would join an item already pending (single flight)."""
        return sum(1 for key, _ in items if key in self._pending)

    @property
    def queued_items(self) -> int:
        return sum(len(lane.queue) for lane in self._lanes.values())

    def submit(self, lane_key: LaneKey, sender: BatchSender,
               items: Sequence[tuple[str, Any]], *, ttl_s: int,
               deadline: float) -> list[PendingItem]:
        """Queue `(key, payload)` items; returns one PendingItem per item, shared where in flight.

        All or nothing: when the lane's queue cannot take the new items, nothing is queued and
        QueueFull (429) is raised, so a caller never holds half a request."""
        lane = self._lanes.get(lane_key)
        if lane is None:
            lane = self._lanes[lane_key] = _Lane(lane_key, sender)
        lane.sender = sender
        fresh = sum(1 for key, _ in items if key not in self._pending)
        idle = not lane.queue and lane.in_flight < self.max_concurrent_batches
        # How many fresh items the end-of-turn flush will send; the rest wait in the queue.
        leaving = ((self.max_concurrent_batches - lane.in_flight) * self.max_batch_items
                   if idle else 0)
        if fresh and len(lane.queue) + fresh > self.max_queue_items:
            raise QueueFull(
                f"The gateway's queue for model {lane_key.model!r} is full "
                f"({self.max_queue_items} items); retry after the Retry-After delay or lower "
                "the request rate.",
                retry_after_s=1.0,
            )
        loop = asyncio.get_running_loop()
        out: list[PendingItem] = []
        traced = self._tracing.current() if self._tracing is not None else None
        wait_span = None
        if traced is not None and fresh and self._tracing is not None:
            wait_span = self._tracing.start("gateway.batcher.wait", {
                UPSTREAM: lane_key.upstream, MODEL: lane_key.model, ITEMS: fresh})
        for key, payload in items:
            item = self._pending.get(key)
            if item is not None:
                if traced is not None and item.traces is not None:
                    item.traces.append(traced)
                item.waiters += 1
                item.deadline = max(item.deadline, deadline)  # matters only while unsent
                item.ttl_s = max(item.ttl_s, ttl_s)
                out.append(item)
                continue
            future: asyncio.Future[Result] = loop.create_future()
            future.add_done_callback(_retrieve)
            item = PendingItem(key, payload, ttl_s, deadline, future, lane_key,
                               leaves_now=leaving > 0)
            if traced is not None:
                item.traces, item.wait_span = [traced], wait_span
            leaving -= 1
            self._pending[key] = item
            lane.queue.append(item)
            out.append(item)
        if fresh:
            self._metrics.queue_depth.inc(fresh)
            if idle and not lane.flush_soon:
                # "At once" means at the end of this event-loop turn: requests that arrived in the
                # same burst submit within the turn and leave in the same batch, at no added latency.
                lane.flush_soon = True
                loop.call_soon(self._flush_now, lane)
            elif not lane.flush_soon:
                self._pump(lane)
        return out

    def _flush_now(self, lane: _Lane) -> None:
        lane.flush_soon = False
        self._pump(lane, immediate=True)

    def release(self, items: Sequence[PendingItem]) -> None:
        """The caller stopped waiting (timeout, disconnect). Items nobody waits for are dropped
        before they are sent; items already sent still complete and fill the cache."""
        for item in items:
            item.waiters -= 1
            if item.waiters <= 0 and not item.sent and not item.future.done():
                item.future.cancel()
                _end(item.wait_span)
                if self._pending.get(item.key) is item:
                    del self._pending[item.key]
                # Out of the queue now, not when it reaches the head: dead items must not count
                # against admission (429) nor make an idle lane look busy.
                lane = self._lanes.get(item.lane)
                if lane is not None:
                    with contextlib.suppress(ValueError):
                        lane.queue.remove(item)
                        self._metrics.queue_depth.dec()

    def _pump(self, lane: _Lane, *, immediate: bool = False) -> None:
        """Send what may go now. `immediate`: the items just arrived at an idle lane (free slot,
        empty queue), so they leave at once instead of waiting for company."""
        while lane.queue and lane.in_flight < self.max_concurrent_batches:
            ready = (
                self._draining
                or immediate
                or len(lane.queue) >= self.max_batch_items
                or time.monotonic() - lane.queue[0].enqueued_at >= self.max_wait_s
            )
            if not ready:
                self._arm_timer(lane)
                return
            self._dispatch(lane)

    def _arm_timer(self, lane: _Lane) -> None:
        if lane.timer is not None:
            return
        delay = lane.queue[0].enqueued_at + self.max_wait_s - time.monotonic()

        def fire() -> None:
            lane.timer = None
            self._pump(lane)

        lane.timer = asyncio.get_running_loop().call_later(max(0.0, delay), fire)

    def _dispatch(self, lane: _Lane) -> None:
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        batch: list[PendingItem] = []
        now = time.monotonic()
        while lane.queue and len(batch) < self.max_batch_items:
            item = lane.queue.popleft()
            self._metrics.queue_depth.dec()
            if item.future.done():
                continue
            item.sent = True
            _end(item.wait_span)
            self._metrics.batch_wait.observe(now - item.enqueued_at)
            batch.append(item)
        if not batch:
            return
        lane.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(lane, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send(self, lane: _Lane, batch: list[PendingItem]) -> None:
        key = lane.key
        failed = False
        metrics = self._metrics
        metrics.child(metrics.batch_size, key.upstream, key.endpoint).observe(len(batch))
        tracing = self._tracing
        traced = [] if tracing is None else [c for item in batch for c in item.traces or ()]
        try:
            # One span for the batch: a child of the first request it carries, linked to all.
            with span(tracing if traced else None, "gateway.upstream.batch",
                      {UPSTREAM: key.upstream, MODEL: key.model, BATCH_SIZE: len(batch)},
                      links=list(iter_links(tracing, traced)) if tracing and traced else (),
                      parent=traced[0] if traced else None):
                results = await lane.sender.classify(
                    key.route, [item.payload for item in batch],
                    deadline=max(item.deadline for item in batch),
                )
            if len(results) != len(batch):
                raise UpstreamBadResponse(
                    f"Upstream {key.upstream!r} returned {len(results)} results for "
                    f"{len(batch)} inputs of model {key.model!r}; check that the upstream "
                    "speaks the protocol its tasks-file entry names."
                )
        except (GatewayError, UpstreamError) as exc:
            failed = True
            self._fail(batch, exc)
        except asyncio.CancelledError:  # only drain() cancels a batch: tell its waiters why
            self._fail(batch, ShuttingDown(_SHUTDOWN_MESSAGE, retry_after_s=1.0))
            raise
        except Exception as exc:  # an upstream client bug must still release every waiter
            failed = True
            self._fail(batch, UpstreamBadResponse(f"Upstream call failed unexpectedly: {exc!r}"))
        else:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
            if self._on_results is not None:
                self._on_results(batch, results)
        finally:
            for item in batch:
                if self._pending.get(item.key) is item:
                    del self._pending[item.key]
            lane.in_flight -= 1
            if failed:
                # One turn later: the failed items' callbacks run first, and requests that have
                # just failed release their other queued items before the next batch forms.
                asyncio.get_running_loop().call_soon(self._pump, lane)
            else:
                self._pump(lane)

    @staticmethod
    def _fail(batch: Sequence[PendingItem], exc: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: send what is queued without waiting for company, and wait for every batch."""
        self._draining = True
        for lane in self._lanes.values():
            self._pump(lane)
        deadline = time.monotonic() + timeout_s
        while self._batches or self.queued_items:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._batches:
                await asyncio.wait(set(self._batches), timeout=remaining)
            else:
                await asyncio.sleep(0.01)
            for lane in self._lanes.values():
                self._pump(lane)
        for task in list(self._batches):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # A batch task cancelled before it started never ran its handler, and queued items never
        # got a batch: nobody may be left waiting on a future that will never complete.
        stranded = [item for item in self._pending.values() if not item.future.done()]
        self._fail(stranded, ShuttingDown(_SHUTDOWN_MESSAGE, retry_after_s=1.0))
        self._pending.clear()


def _end(wait_span: Span | None) -> None:
    """End an item's queue-wait span (shared by the items of one submit: the first to leave ends
    it, so it measures the first item's wait)."""
    if wait_span is not None and wait_span.is_recording():
        wait_span.end()
