"""MicroBatcher against an in-memory sender: batching, single flight, admission, drops, errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from service.gateway.batcher import LaneKey, MicroBatcher, PendingItem
from service.gateway.errors import QueueFull, ShuttingDown, UpstreamBadResponse, UpstreamUnavailable
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result, Route

LANE = LaneKey("local", "classifications", Route.text("m1"))
FAR = 1e12  # a deadline that never matters


class GatedSender:
    """Records every batch; each call waits for `gate` when one is set."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate: asyncio.Event | None = None
        self.error: Exception | None = None
        self.drop_one = False

    async def classify(self, route: Route, inputs: list[Any], *,
                       deadline: float) -> list[Result]:
        self.batches.append(list(inputs))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        results = [{"t": {"scores": {"x": float(len(str(i)))}, "echo": i}} for i in inputs]
        return results[:-1] if self.drop_one else results


def make(**kw: Any) -> MicroBatcher:
    args: dict[str, Any] = dict(max_batch_items=4, max_wait_s=0.005, max_concurrent_batches=1,
                                max_queue_items=100, metrics=GatewayMetrics(CollectorRegistry()))
    args.update(kw)
    return MicroBatcher(**args)


def submit(b: MicroBatcher, s: GatedSender, *payloads: str) -> list[PendingItem]:
    return b.submit(LANE, s, [(f"k:{p}", p) for p in payloads], ttl_s=60, deadline=FAR)


async def results(items: list[PendingItem]) -> list[Any]:
    return [(await asyncio.wait_for(i.future, 5))["t"]["echo"] for i in items]


async def test_idle_lane_sends_at_once_even_with_a_long_wait() -> None:
    b, s = make(max_wait_s=30.0), GatedSender()
    items = submit(b, s, "a", "b")
    assert await results(items) == ["a", "b"]  # would time out if it waited 30 s
    assert s.batches == [["a", "b"]]


async def test_requests_arriving_in_the_same_loop_turn_share_a_batch() -> None:
    b, s = make(max_wait_s=30.0, max_batch_items=8, max_concurrent_batches=4), GatedSender()
    items = [submit(b, s, p)[0] for p in "abc"]  # three requests, one event-loop turn
    assert await results(items) == ["a", "b", "c"]
    assert s.batches == [["a", "b", "c"]]


async def test_items_queued_behind_busy_slots_leave_together() -> None:
    b, s = make(max_batch_items=8), GatedSender()
    s.gate = asyncio.Event()
    first = submit(b, s, "a")
    await asyncio.sleep(0)
    queued = [submit(b, s, p)[0] for p in "bcdef"]
    await asyncio.sleep(0.02)
    assert s.batches == [["a"]]  # the only slot is busy: nothing else went
    assert b.queued_items == 5
    s.gate.set()
    assert await results(first + queued) == list("abcdef")
    assert s.batches == [["a"], list("bcdef")]


async def test_batches_never_exceed_max_batch_items() -> None:
    b, s = make(max_batch_items=4, max_concurrent_batches=1), GatedSender()
    s.gate = asyncio.Event()
    submit(b, s, "first")
    await asyncio.sleep(0)
    rest = [submit(b, s, str(i))[0] for i in range(10)]
    s.gate.set()
    await results(rest)
    assert [len(x) for x in s.batches] == [1, 4, 4, 2]


async def test_one_request_larger_than_a_batch_is_split_across_slots() -> None:
    b, s = make(max_batch_items=4, max_concurrent_batches=3), GatedSender()
    items = submit(b, s, *[str(i) for i in range(10)])
    assert await results(items) == [str(i) for i in range(10)]
    assert [len(x) for x in s.batches] == [4, 4, 2]


async def test_single_flight_shares_one_upstream_item() -> None:
    b, s = make(), GatedSender()
    s.gate = asyncio.Event()
    one = submit(b, s, "same")
    two = submit(b, s, "same")
    assert one[0] is two[0] and one[0].waiters == 2
    s.gate.set()
    assert await results(one) == await results(two) == ["same"]
    assert s.batches == [["same"]]
    # Once answered, the key is no longer in flight: a later submit goes upstream again.
    assert await results(submit(b, s, "same")) == ["same"]
    assert len(s.batches) == 2


async def test_released_items_are_dropped_before_sending() -> None:
    b, s = make(), GatedSender()
    s.gate = asyncio.Event()
    submit(b, s, "busy")
    await asyncio.sleep(0)
    gone = submit(b, s, "gone")
    kept = submit(b, s, "kept")
    b.release(gone)
    assert gone[0].future.cancelled()
    s.gate.set()
    assert await results(kept) == ["kept"]
    assert ["gone"] not in s.batches and all("gone" not in batch for batch in s.batches)


async def test_shared_item_survives_one_of_two_callers_leaving() -> None:
    b, s = make(), GatedSender()
    s.gate = asyncio.Event()
    submit(b, s, "busy")
    await asyncio.sleep(0)
    first, second = submit(b, s, "x"), submit(b, s, "x")
    b.release(first)
    s.gate.set()
    assert await results(second) == ["x"]


async def test_upstream_error_reaches_every_waiter_of_the_batch() -> None:
    b, s = make(max_batch_items=8), GatedSender()
    s.error = UpstreamUnavailable("down", retry_after_s=2)
    items = submit(b, s, "a", "b", "c")
    for item in items:
        with pytest.raises(UpstreamUnavailable):
            await item.future


async def test_wrong_result_count_fails_the_batch_clearly() -> None:
    b, s = make(max_batch_items=8), GatedSender()
    s.drop_one = True
    items = submit(b, s, "a", "b", "c")
    for item in items:
        with pytest.raises(UpstreamBadResponse, match="returned 2 results for 3 inputs"):
            await item.future


async def test_full_queue_rejects_the_whole_request_with_retry_after() -> None:
    b, s = make(max_queue_items=3), GatedSender()
    s.gate = asyncio.Event()
    submit(b, s, "busy")
    await asyncio.sleep(0)
    submit(b, s, "a", "b")
    with pytest.raises(QueueFull) as info:
        submit(b, s, "c", "d")
    assert info.value.status_code == 429 and info.value.headers()["Retry-After"] == "1"
    assert b.queued_items == 2  # all or nothing: neither c nor d was queued
    s.gate.set()


async def test_drain_sends_what_is_queued_and_waits_for_it() -> None:
    b, s = make(max_wait_s=60.0, max_batch_items=100), GatedSender()
    s.gate = asyncio.Event()
    submit(b, s, "busy")
    await asyncio.sleep(0)
    queued = submit(b, s, "q1") + submit(b, s, "q2")
    s.gate.set()
    await b.drain(5.0)
    assert all(item.future.done() for item in queued)
    assert await results(queued) == ["q1", "q2"]


async def test_released_items_leave_the_queue_at_once() -> None:
    b, s = make(max_queue_items=2), GatedSender()
    s.gate = asyncio.Event()
    submit(b, s, "busy")
    await asyncio.sleep(0)
    gone = submit(b, s, "a", "b")
    b.release(gone)
    assert b.queued_items == 0
    kept = submit(b, s, "c", "d")  # would be 429 if dead items still counted
    s.gate.set()
    assert await results(kept) == ["c", "d"]
    assert all("a" not in batch and "b" not in batch for batch in s.batches)


async def test_drain_that_times_out_fails_every_waiter_with_shutting_down() -> None:
    b, s = make(), GatedSender()
    s.gate = asyncio.Event()  # never set: the upstream never answers
    sent = submit(b, s, "in flight")
    await asyncio.sleep(0)
    queued = submit(b, s, "queued")
    await b.drain(0.05)
    for item in sent + queued:
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(item.future, 1)
