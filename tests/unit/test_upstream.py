"""UpstreamClient logic without sockets: the breaker's state machine, backoff, Retry-After parsing,
response checks, and the concurrency rules of the half-open probe (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from service.gateway.errors import UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Route, ServerInfo
from service.gateway.protocols.mistral import check_results
from service.gateway.registry import UpstreamSpec
from service.gateway.resilience import RetryBudget
from service.gateway.server_info import INFO_RETRY_S, INFO_TTL_S, ServerInfoCache
from service.gateway.settings import Settings
from service.gateway.upstream import UpstreamClient, parse_retry_after
from service.gateway.upstream_status import verdict

OK_RESULT = {"t": {"scores": {"a": 0.25, "b": 0.75}}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ok(request: httpx.Request) -> httpx.Response:
    inputs = orjson.loads(request.content)["input"]
    return httpx.Response(200, json={"id": "0" * 32, "model": "m", "results": [OK_RESULT] * len(inputs)})


def make_client(handler: Callable[[httpx.Request], Any], **settings: float) -> UpstreamClient:
    values: dict[str, float] = dict(retry_attempts=3, retry_backoff_s=0.001, retry_backoff_max_s=0.002,
                                    circuit_min_calls=3, circuit_reset_s=0.2)
    values.update(settings)
    return UpstreamClient(UpstreamSpec(name="u", base_url="http://upstream.test"),
                          Settings(**values),  # type: ignore[arg-type]
                          GatewayMetrics(CollectorRegistry()), transport=httpx.MockTransport(handler),
                          rng=random.Random(7))


def in_s(seconds: float) -> float:
    return time.monotonic() + seconds


# ---------------------------------------------------------------------------------- parsing, checking
def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    http_date = email.utils.formatdate(time.time() + 60, usegmt=True)
    parsed = parse_retry_after(http_date)
    assert parsed is not None and 55 <= parsed <= 61


def test_check_results_accepts_mistral_shape() -> None:
    payload = {"id": "x", "model": "m",
               "results": [{"a": {"scores": {"x": 1, "y": 0.0}}, "b": {"scores": {}}}]}
    assert check_results(payload) == payload["results"]
    assert check_results({"results": []}) == []


@pytest.mark.parametrize(("payload", "complaint"), [
    ([], "not a JSON object"),
    ({"results": {}}, "no 'results' list"),
    ({"results": [{}]}, "results[0] is not an object"),
    ({"results": [OK_RESULT, {"t": {"score": {}}}]}, "results[1].t has no 'scores'"),
    ({"results": [{"t": {"scores": {"a": "0.5"}}}]}, "results[0].t.scores.a is not a number"),
    ({"results": [{"t": {"scores": {"a": True}}}]}, "is not a number"),
    ({"results": [{"t": {"scores": {"a": None}}}]}, "is not a number"),
])
def test_check_results_names_the_problem(payload: Any, complaint: str) -> None:
    problem = check_results(payload)
    assert isinstance(problem, str) and complaint in problem


def test_backoff_is_full_jitter_capped_and_respects_retry_after() -> None:
    client = make_client(ok, retry_backoff_s=0.1, retry_backoff_max_s=0.5)
    delays = [[client._backoff(attempt, None) for _ in range(200)] for attempt in (1, 2, 3, 6)]
    for ceiling, sample in zip((0.1, 0.2, 0.4, 0.5), delays, strict=True):
        assert all(0 <= d <= ceiling for d in sample)
        assert max(sample) > ceiling * 0.8 and min(sample) < ceiling * 0.2  # spread, not fixed
    assert all(client._backoff(1, 2.0) == 2.0 for _ in range(20))


# ------------------------------------------------------------------------------------ client behaviour
async def test_endpoint_and_body_on_the_wire() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(request)

    client = make_client(handler)
    try:
        conv = {"messages": [{"role": "user", "content": "é"}]}
        assert await client.classify(Route.chat("ft:m"), [conv], deadline=in_s(5)) == [
            OK_RESULT]
    finally:
        await client.aclose()
    assert str(seen[0].url) == "http://upstream.test/v1/chat/classifications"
    assert orjson.loads(seen[0].content) == {"model": "ft:m", "input": [conv]}
    assert seen[0].headers["content-type"] == "application/json"
    assert "authorization" not in seen[0].headers




async def test_non_json_error_body_is_quoted_briefly() -> None:
    client = make_client(lambda request: httpx.Response(400, text="<html>" + "x" * 5000))
    try:
        with pytest.raises(UpstreamRejected) as caught:
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    finally:
        await client.aclose()
    assert caught.value.message.startswith("upstream 'u' rejected the request with 400: <html>")
    assert len(caught.value.message) < 400


async def test_half_open_probe_is_alone_and_closes_the_circuit() -> None:
    release = asyncio.Event()
    probe_arrived = asyncio.Event()
    calls = 0
    failing = True

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if failing:
            return httpx.Response(503)
        probe_arrived.set()
        await release.wait()
        return ok(request)

    client = make_client(handler, retry_attempts=1, circuit_min_calls=2,
                         circuit_reset_s=0.05)
    try:
        for _ in range(2):
            with pytest.raises(UpstreamUnavailable):
                await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        assert client.circuit_open and calls == 2
        await asyncio.sleep(0.06)
        failing = False
        probe = asyncio.create_task(client.classify(Route.text("m"), ["x"], deadline=in_s(5)))
        await asyncio.wait_for(probe_arrived.wait(), 5)
        with pytest.raises(UpstreamUnavailable, match="circuit breaker"):
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        assert calls == 3  # the second caller did not reach the upstream
        release.set()
        assert await probe == [OK_RESULT]
        assert not client.circuit_open
        assert await client.classify(Route.text("m"), ["y"], deadline=in_s(5)) == [OK_RESULT]
    finally:
        await client.aclose()


async def test_cancelled_probe_does_not_wedge_the_circuit() -> None:
    hang = asyncio.Event()
    mode = "fail"

    async def handler(request: httpx.Request) -> httpx.Response:
        if mode == "fail":
            return httpx.Response(500)
        if mode == "hang":
            await hang.wait()
        return ok(request)

    client = make_client(handler, retry_attempts=1, circuit_min_calls=1,
                         circuit_reset_s=0.05)
    try:
        with pytest.raises(UpstreamUnavailable):
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        await asyncio.sleep(0.06)
        mode = "hang"
        probe = asyncio.create_task(client.classify(Route.text("m"), ["x"], deadline=in_s(5)))
        await asyncio.sleep(0.01)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        mode = "ok"
        assert await client.classify(Route.text("m"), ["x"], deadline=in_s(5)) == [OK_RESULT]
        assert not client.circuit_open
    finally:
        await client.aclose()


async def test_rejections_do_not_open_the_circuit() -> None:
    client = make_client(lambda request: httpx.Response(400, json={"message": "bad"}),
                         circuit_min_calls=2)
    try:
        for _ in range(4):
            with pytest.raises(UpstreamRejected):
                await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        assert not client.circuit_open
    finally:
        await client.aclose()


async def test_past_deadline_never_calls_out() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return ok(request)

    client = make_client(handler)
    try:
        with pytest.raises(UpstreamTimeout):
            await client.classify(Route.text("m"), ["x"], deadline=time.monotonic() - 1)
    finally:
        await client.aclose()
    assert calls == []



@pytest.mark.parametrize("error", [httpx.ConnectError("refused"), httpx.ReadError("reset"),
                                   ConnectionResetError("reset by peer"), RuntimeError("odd")])
async def test_transport_errors_are_retried(error: Exception) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return ok(request)

    client = make_client(handler)
    try:
        assert await client.classify(Route.text("m"), ["x"], deadline=in_s(5)) == [OK_RESULT]
    finally:
        await client.aclose()
    assert calls == 2


async def test_past_deadline_does_not_count_against_the_upstream() -> None:
    client = make_client(ok, circuit_min_calls=1)
    try:
        for _ in range(3):
            with pytest.raises(UpstreamTimeout):
                await client.classify(Route.text("m"), ["x"], deadline=time.monotonic())
        assert not client.circuit_open
    finally:
        await client.aclose()


@pytest.mark.parametrize(("first", "retried"), [
    (httpx.Response(429, headers={"Retry-After": "0.01"}), True),  # waited out, free
    (httpx.Response(429), False),  # no Retry-After: paced by our backoff, charged
    (httpx.Response(500), False),
])
async def test_an_empty_retry_budget_stops_all_but_announced_backpressure(
        first: httpx.Response, retried: bool) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return first if calls == 1 else ok(request)

    client = make_client(handler)
    client.budget = RetryBudget(0.0, min_per_s=0.0)  # nothing to spend
    try:
        if retried:
            assert await client.classify(Route.text("m"), ["x"], deadline=in_s(5)) == [OK_RESULT]
        else:
            with pytest.raises(UpstreamUnavailable, match="retry budget is spent"):
                await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    finally:
        await client.aclose()
    assert calls == (2 if retried else 1)


@pytest.mark.parametrize(("status", "expected"), [
    (200, "answer"), (204, "answer"), (429, "retry"), (500, "retry"), (503, "retry"),
    (424, "retry"), (400, "rejected"), (404, "rejected"), (422, "rejected"), (302, "unexpected"),
    (101, "unexpected"),
])
def test_status_verdicts(status: int, expected: str) -> None:
    assert verdict(status, frozenset({424})) == expected


async def test_server_info_is_asked_once_kept_and_a_failure_remembered_briefly() -> None:
    clock = Clock()
    cache = ServerInfoCache(clock)
    asked: list[str] = []
    release = asyncio.Event()

    async def fetch() -> ServerInfo | str:
        asked.append("m")
        await release.wait()
        return ServerInfo(("neg", "pos"), 8)

    first = asyncio.create_task(cache.get("m", fetch))
    second = asyncio.create_task(cache.get("m", fetch))
    await asyncio.sleep(0)
    release.set()
    assert await first == await second == ServerInfo(("neg", "pos"), 8)
    assert asked == ["m"]  # concurrent callers share one request
    clock.now += INFO_TTL_S - 1
    assert await cache.get("m", fetch) == ServerInfo(("neg", "pos"), 8)
    assert asked == ["m"]  # kept

    async def failing() -> ServerInfo | str:
        asked.append("x")
        return "404: not found"

    assert await cache.get("x", failing) == "404: not found"
    clock.now += INFO_RETRY_S - 1
    assert await cache.get("x", failing) == "404: not found"
    assert asked.count("x") == 1  # a failure is remembered for a while
    clock.now += 2
    await cache.get("x", failing)
    assert asked.count("x") == 2  # then asked again
