"""UpstreamClient against the fake upstream on a real loopback uvicorn, over the real transport.

Every retry, rejection and circuit transition is checked from the upstream's side (`fake.calls`), not
only from the client's. Clock bounds are generous and only guard against hanging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client import CollectorRegistry

from service.gateway.errors import (
    UpstreamBadResponse,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Route
from service.gateway.registry import UpstreamSpec
from service.gateway.settings import Settings
from service.gateway.upstream import UpstreamClient, UpstreamPool
from tests.support.fake_upstream import (
    Drop,
    FakeUpstream,
    Slow,
    Status,
    WrongCount,
    expected_result,
    running_fake_upstream,
)
from tests.support.redis_server import free_port

KEY = "sk-test-9f8e7d6c5b4a"
KEY_ENV = "CGW_TEST_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with running_fake_upstream() as fake:
        yield fake


@pytest.fixture
def upstream(fake: FakeUpstream) -> FakeUpstream:
    fake.reset()
    fake.delay_s = 0.0
    fake.api_key = None
    return fake


def make_settings(**overrides: float) -> Settings:
    values: dict[str, float] = dict(retry_attempts=3, retry_backoff_s=0.01, retry_backoff_max_s=0.05,
                                    circuit_min_calls=5, circuit_reset_s=0.5,
                                    connect_timeout_s=1.0)
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def metrics() -> GatewayMetrics:
    return GatewayMetrics(CollectorRegistry())


@pytest.fixture
async def client(upstream: FakeUpstream, metrics: GatewayMetrics) -> AsyncIterator[UpstreamClient]:
    assert upstream.url is not None
    client = UpstreamClient(UpstreamSpec(name="fake", base_url=upstream.url), make_settings(),
                            metrics)
    yield client
    await client.aclose()


def in_s(seconds: float) -> float:
    return time.monotonic() + seconds


def attempts(metrics: GatewayMetrics, status: str, endpoint: str = "classifications") -> float:
    value = metrics.registry.get_sample_value(
        "gateway_upstream_requests_total",
        {"upstream": "fake", "endpoint": endpoint, "status": status})
    return value or 0.0


def retries(metrics: GatewayMetrics) -> float:
    return metrics.registry.get_sample_value("gateway_upstream_retries_total") or 0.0


def circuit_gauge(metrics: GatewayMetrics) -> float | None:
    return metrics.registry.get_sample_value("gateway_circuit_open", {"upstream": "fake"})


async def test_results_in_input_order(client: UpstreamClient, upstream: FakeUpstream,
                                      metrics: GatewayMetrics) -> None:
    texts = ["terrible", "fine", "great", "fine"]
    results = await client.classify(Route.text("ft:classifier:x"), texts, deadline=in_s(5))
    assert results == [expected_result(t) for t in texts]
    conv = {"messages": [{"role": "user", "content": "hello"}]}
    chat = await client.classify(Route.chat("ft:chat"), [conv], deadline=in_s(5))
    assert chat == [expected_result(conv)]
    assert [(c.endpoint, c.model, c.inputs, c.authorization) for c in upstream.calls] == [
        ("classifications", "ft:classifier:x", texts, None),
        ("chat/classifications", "ft:chat", [conv], None),
    ]
    assert attempts(metrics, "200") == 1
    assert attempts(metrics, "200", "chat/classifications") == 1
    assert retries(metrics) == 0
    duration = metrics.registry.get_sample_value(
        "gateway_upstream_duration_seconds_count", {"upstream": "fake", "endpoint": "classifications"})
    assert duration == 1


async def test_a_wrong_number_of_results_is_a_bad_response(client: UpstreamClient,
                                                            upstream: FakeUpstream) -> None:
    upstream.inject(WrongCount(-1))
    with pytest.raises(UpstreamBadResponse, match="2 results for 3 inputs"):
        await client.classify(Route.text("m"), ["a", "b", "c"], deadline=in_s(5))
    assert await client.classify(Route.text("m"), ["a", "b"], deadline=in_s(5)) == [
        expected_result("a"), expected_result("b")]


async def test_retries_5xx_then_succeeds(client: UpstreamClient, upstream: FakeUpstream,
                                         metrics: GatewayMetrics) -> None:
    upstream.inject(Status(500), Status(503))
    results = await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    assert results == [expected_result("x")]
    assert len(upstream.calls) == 3
    assert all(c.inputs == ["x"] for c in upstream.calls)
    assert (attempts(metrics, "500"), attempts(metrics, "503"), attempts(metrics, "200")) == (1, 1, 1)
    assert retries(metrics) == 2
    assert not client.circuit_open


async def test_dropped_connection_is_retried(client: UpstreamClient, upstream: FakeUpstream,
                                             metrics: GatewayMetrics) -> None:
    upstream.inject(Drop())
    results = await client.classify(Route.text("m"), ["x", "y"], deadline=in_s(5))
    assert results == [expected_result("x"), expected_result("y")]
    assert len(upstream.calls) == 2
    assert attempts(metrics, "connect_error") == 1
    assert retries(metrics) == 1


async def test_retry_after_is_honoured(client: UpstreamClient, upstream: FakeUpstream) -> None:
    upstream.inject(Status(429, retry_after=0.4))
    started = time.monotonic()
    results = await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    # The client's own backoff is at most 0.05 s here; only Retry-After explains the wait.
    assert time.monotonic() - started >= 0.4
    assert results == [expected_result("x")]
    assert len(upstream.calls) == 2


async def test_429_after_retries_is_unavailable_with_retry_after(
        client: UpstreamClient, upstream: FakeUpstream, metrics: GatewayMetrics) -> None:
    upstream.inject(*[Status(429, retry_after=0.05)] * 3)
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    assert len(upstream.calls) == 3
    assert caught.value.status_code == 503
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 0.05
    assert caught.value.headers() == {"Retry-After": "1"}
    assert "429" in caught.value.message and "after 3 attempts" in caught.value.message
    assert attempts(metrics, "429") == 3


async def test_retry_after_past_the_deadline_fails_at_once(client: UpstreamClient,
                                                           upstream: FakeUpstream) -> None:
    upstream.inject(Status(503, retry_after=30))
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    assert time.monotonic() - started < 4  # did not sleep towards the deadline
    assert len(upstream.calls) == 1
    assert caught.value.retry_after_s == 30
    assert "deadline" in caught.value.message


@pytest.mark.parametrize(("fault", "status", "message"), [
    (Status(400, body={"object": "error", "message": "Invalid model: ft:nope",
                       "type": "invalid_request_error"}), 400, "Invalid model: ft:nope"),
    (Status(404, body={"detail": "Not Found"}), 404, "Not Found"),
    (Status(403, body={"message": "Forbidden"}), 403, "Forbidden"),
])
async def test_4xx_is_rejected_without_retry(client: UpstreamClient, upstream: FakeUpstream,
                                             metrics: GatewayMetrics, fault: Status, status: int,
                                             message: str) -> None:
    upstream.inject(fault)
    with pytest.raises(UpstreamRejected) as caught:
        await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    assert caught.value.upstream_status == status
    assert caught.value.status_code == 502
    assert message in caught.value.message and str(status) in caught.value.message
    assert len(upstream.calls) == 1
    assert retries(metrics) == 0


async def test_upstream_422_detail_is_summarised(client: UpstreamClient, upstream: FakeUpstream) -> None:
    with pytest.raises(UpstreamRejected) as caught:
        await client.classify(Route.text("m"), [123], deadline=in_s(5))
    assert caught.value.upstream_status == 422
    assert "input" in caught.value.message
    assert len(upstream.calls) == 1


@pytest.mark.parametrize("body", [{"id": "x", "model": "m"}, {"results": [{"t": {"scores": "hi"}}]},
                                  {"results": ["not an object"]}])
async def test_malformed_2xx_is_bad_response(client: UpstreamClient, upstream: FakeUpstream,
                                             body: dict[str, object]) -> None:
    upstream.inject(Status(200, body=body))
    with pytest.raises(UpstreamBadResponse) as caught:
        await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    assert caught.value.status_code == 502
    assert len(upstream.calls) == 1


async def test_timeout_names_the_deadline(client: UpstreamClient, upstream: FakeUpstream,
                                          metrics: GatewayMetrics) -> None:
    upstream.inject(Slow(10))
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await client.classify(Route.text("m"), ["x"], deadline=in_s(0.3))
    assert time.monotonic() - started < 5
    assert caught.value.status_code == 504
    assert "0.30 s left of the request's deadline" in caught.value.message
    assert len(upstream.calls) == 1
    assert attempts(metrics, "timeout") == 1
    # The connection was given up, not left to answer later: the next call is served normally.
    assert await client.classify(Route.text("m"), ["y"], deadline=in_s(5)) == [
        expected_result("y")]


async def test_timeout_after_retries(client: UpstreamClient, upstream: FakeUpstream) -> None:
    upstream.inject(Status(500), Slow(10))
    with pytest.raises(UpstreamTimeout) as caught:
        await client.classify(Route.text("m"), ["x"], deadline=in_s(0.5))
    assert "attempt 2 of 3" in caught.value.message
    assert len(upstream.calls) == 2


async def test_unreachable_upstream_is_unavailable(metrics: GatewayMetrics) -> None:
    spec = UpstreamSpec(name="fake", base_url=f"http://127.0.0.1:{free_port()}")
    client = UpstreamClient(spec, make_settings(), metrics)
    try:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    finally:
        await client.aclose()
    assert "connection failed" in caught.value.message
    assert attempts(metrics, "connect_error") == 3
    assert retries(metrics) == 2


async def test_circuit_opens_fails_fast_and_recovers_through_a_probe(
        upstream: FakeUpstream, metrics: GatewayMetrics) -> None:
    assert upstream.url is not None
    settings = make_settings(circuit_min_calls=3, circuit_reset_s=0.5, retry_attempts=1)
    client = UpstreamClient(UpstreamSpec(name="fake", base_url=upstream.url), settings, metrics)
    try:
        assert circuit_gauge(metrics) == 0
        upstream.inject(*[Status(500)] * 3)
        for i in range(3):  # 3 failed calls of 3 (min_calls): 100% >= 50%
            assert not client.circuit_open, i
            with pytest.raises(UpstreamUnavailable, match="after 1 attempt"):
                await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        assert client.circuit_open
        assert circuit_gauge(metrics) == 1
        assert len(upstream.calls) == 3

        # Open: callers fail fast with Retry-After and the upstream sees nothing.
        for _ in range(5):
            with pytest.raises(UpstreamUnavailable) as fast:
                await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
            assert fast.value.retry_after_s is not None and 0 < fast.value.retry_after_s <= 0.5
        assert len(upstream.calls) == 3
        assert attempts(metrics, "circuit_open") == 5

        # After circuit_reset_s one probe goes through; its success closes the circuit.
        await asyncio.sleep(0.55)
        assert await client.classify(Route.text("m"), ["x"], deadline=in_s(5)) == [
            expected_result("x")]
        assert not client.circuit_open
        assert circuit_gauge(metrics) == 0
        assert len(upstream.calls) == 4
        assert await client.classify(Route.text("m"), ["z"], deadline=in_s(5)) == [
            expected_result("z")]
    finally:
        await client.aclose()


async def test_failed_probe_reopens_the_circuit(upstream: FakeUpstream,
                                                metrics: GatewayMetrics) -> None:
    assert upstream.url is not None
    settings = make_settings(circuit_min_calls=2, circuit_reset_s=0.3, retry_attempts=1)
    client = UpstreamClient(UpstreamSpec(name="fake", base_url=upstream.url), settings, metrics)
    try:
        upstream.inject(Status(502), Status(502), Status(502))
        for _ in range(2):
            with pytest.raises(UpstreamUnavailable):
                await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        assert client.circuit_open
        await asyncio.sleep(0.35)
        with pytest.raises(UpstreamUnavailable):  # the probe fails
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        assert len(upstream.calls) == 3  # one probe, no retry behind it
        assert client.circuit_open
        with pytest.raises(UpstreamUnavailable):  # open again: fails fast
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        assert len(upstream.calls) == 3
    finally:
        await client.aclose()


async def test_key_is_sent_as_bearer_and_never_shown(upstream: FakeUpstream, metrics: GatewayMetrics,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert upstream.url is not None
    monkeypatch.setenv(KEY_ENV, KEY)
    upstream.api_key = KEY
    spec = UpstreamSpec(name="fake", base_url=upstream.url, api_key_env=KEY_ENV)
    client = UpstreamClient(spec, make_settings(retry_attempts=2), metrics)
    try:
        assert await client.classify(Route.text("m"), ["x"], deadline=in_s(5)) == [
            expected_result("x")]
        upstream.inject(Status(401, body={"message": f"Invalid API key {KEY}"}))
        with pytest.raises(UpstreamRejected) as rejected:
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        upstream.inject(Status(500, body={"detail": f"crashed handling Bearer {KEY}"}),
                        Status(503, body={"error": {"message": KEY}}))
        with pytest.raises(UpstreamUnavailable) as unavailable:
            await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    finally:
        await client.aclose()
    assert [c.authorization for c in upstream.calls] == [f"Bearer {KEY}"] * 4
    assert rejected.value.upstream_status == 401
    for error in (rejected.value, unavailable.value):
        assert KEY not in error.message and KEY not in str(error)
        assert "***" in error.message
    exported = metrics.registry.collect()
    assert all(KEY not in str(sample) for family in exported for sample in family.samples)


async def test_key_is_read_at_call_time(upstream: FakeUpstream, metrics: GatewayMetrics,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert upstream.url is not None
    spec = UpstreamSpec(name="fake", base_url=upstream.url, api_key_env=KEY_ENV)
    client = UpstreamClient(spec, make_settings(), metrics)
    try:
        monkeypatch.delenv(KEY_ENV, raising=False)
        await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
        monkeypatch.setenv(KEY_ENV, "rotated")
        await client.classify(Route.text("m"), ["x"], deadline=in_s(5))
    finally:
        await client.aclose()
    assert [c.authorization for c in upstream.calls] == [None, "Bearer rotated"]


async def test_pool_reuses_clients_and_replaces_changed_specs(upstream: FakeUpstream,
                                                              metrics: GatewayMetrics) -> None:
    assert upstream.url is not None
    pool = UpstreamPool(make_settings(), metrics)
    spec = UpstreamSpec(name="fake", base_url=upstream.url)
    first = pool.get(spec)
    assert pool.get(UpstreamSpec(name="fake", base_url=upstream.url)) is first
    await first.classify(Route.text("m"), ["x"], deadline=in_s(5))
    changed = UpstreamSpec(name="fake", base_url=upstream.url + "/v1")  # same server, new spec
    second = pool.get(changed)
    assert second is not first
    assert await second.classify(Route.text("m"), ["y"], deadline=in_s(5)) == [
        expected_result("y")]
    await pool.aclose()
    with pytest.raises(UpstreamUnavailable):
        await second.classify(Route.text("m"), ["x"], deadline=in_s(5))
    with pytest.raises(UpstreamUnavailable):
        await first.classify(Route.text("m"), ["x"], deadline=in_s(5))
    assert [c.inputs for c in upstream.calls] == [["x"], ["y"]]


async def test_replaced_client_finishes_its_inflight_calls(upstream: FakeUpstream,
                                                           metrics: GatewayMetrics) -> None:
    assert upstream.url is not None
    pool = UpstreamPool(make_settings(), metrics)
    try:
        old = pool.get(UpstreamSpec(name="fake", base_url=upstream.url))
        upstream.inject(Slow(0.3))
        inflight = asyncio.create_task(
            old.classify(Route.text("m"), ["slow"], deadline=in_s(5)))
        for _ in range(500):
            if upstream.calls:
                break
            await asyncio.sleep(0.01)
        pool.get(UpstreamSpec(name="fake", base_url=upstream.url, api_key_env="CGW_OTHER"))
        assert await inflight == [expected_result("slow")]
        for _ in range(100):  # the old client closes itself once idle
            if old.closed:
                break
            await asyncio.sleep(0.01)
        assert old.closed
    finally:
        await pool.aclose()


async def test_concurrent_calls_share_the_pool(client: UpstreamClient, upstream: FakeUpstream) -> None:
    upstream.delay_s = 0.05
    texts = [f"text {i}" for i in range(64)]
    results = await asyncio.gather(*(
        client.classify(Route.text("m"), [text], deadline=in_s(10)) for text in texts))
    assert results == [[expected_result(text)] for text in texts]
    assert sorted(c.inputs[0] for c in upstream.calls) == sorted(texts)
