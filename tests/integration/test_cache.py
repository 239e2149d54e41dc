"""ResultCache against real redis-server processes: standalone, killed, frozen, Cluster, Sentinel."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from service.gateway.cache import RedisClient, ResultCache
from service.gateway.metrics import GatewayMetrics
from tests.support.redis_cluster import RedisCluster, SentinelSetup, start_cluster, start_sentinel
from tests.support.redis_server import RedisServer, free_port, start_redis
from tests.support.redis_tls import TlsRedis, start_tls_redis

TIMEOUT_S = 0.5
BACKOFF_S = 30.0  # never elapses on its own in these tests: they move the clock


class FakeClock:
    """Lets a test end the backoff without sleeping (and without timing assumptions)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_client: RedisClient = "link"  # for a standalone URL; set per test by the redis_client fixture


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every standalone test runs against both clients a standalone Redis can have: the
    gateway's RedisLink (the default) and redis-py (GATEWAY_REDIS_CLIENT=redis-py)."""
    name = metafunc.function.__name__
    if "cluster" not in name and "sentinel" not in name:
        metafunc.parametrize("redis_client", ["link", "redis-py"], indirect=True)


@pytest.fixture(autouse=True)
def redis_client(request: pytest.FixtureRequest) -> Iterator[RedisClient]:
    global _client
    _client = getattr(request, "param", "link")
    yield _client
    _client = "link"


def make_cache(url: str, clock: FakeClock | None = None,
               backoff_s: float = BACKOFF_S) -> tuple[ResultCache, GatewayMetrics]:
    metrics = GatewayMetrics(CollectorRegistry())
    cache = ResultCache.from_url(url, prefix=f"test:{uuid.uuid4().hex}", socket_timeout_s=TIMEOUT_S,
                                 backoff_s=backoff_s, metrics=metrics,
                                 clock=clock or time.monotonic, client=_client)
    return cache, metrics


def state(cache: ResultCache) -> str:
    """Read through a function so that mypy does not narrow the property across awaits."""
    return cache.state


def errors(metrics: GatewayMetrics, operation: str) -> float:
    value = metrics.registry.get_sample_value("gateway_cache_errors_total",
                                              {"operation": operation})
    return value or 0.0


def connections_received(admin: redis.Redis) -> int:
    """Connections the server has accepted since it started (the admin's own included)."""
    return int(admin.info("stats")["total_connections_received"])


def items(n: int) -> list[object]:
    return [{"messages": [{"role": "user", "content": f"text {i}"}]} for i in range(n)]


@pytest.fixture
async def cache(redis_server: RedisServer) -> AsyncIterator[ResultCache]:
    result, _ = make_cache(redis_server.url)
    yield result
    await result.aclose()


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


async def test_round_trip_keeps_order_and_mixes_hits_and_misses(cache: ResultCache) -> None:
    keys = [cache.key("local", "/v1/classifications", "ft:m", f"text {i}") for i in range(10)]
    assert await cache.get_many(keys) == [None] * 10

    cache.schedule_set_many([(k, f"value {i}".encode(), 60) for i, k in enumerate(keys) if i % 2])
    assert await cache.drain() == 0

    expected = [f"value {i}".encode() if i % 2 else None for i in range(10)]
    assert await cache.get_many(keys) == expected
    assert await cache.get_many(list(reversed(keys))) == list(reversed(expected))
    assert await cache.get_many([]) == []
    assert state(cache) == "ok"


async def test_key_order_of_an_item_does_not_matter(cache: ResultCache) -> None:
    written = {"messages": [{"role": "user", "content": "hi"}], "meta": {"a": 1, "b": 2}}
    read = {"meta": {"b": 2, "a": 1}, "messages": [{"content": "hi", "role": "user"}]}
    cache.schedule_set_many([(cache.key("u", "/v1/chat/classifications", "m", written), b"r", 60)])
    await cache.drain()
    assert await cache.get_many([cache.key("u", "/v1/chat/classifications", "m", read)]) == [b"r"]
    assert await cache.get_many([cache.key("u", "/v1/chat/classifications", "m2", read)]) == [None]


async def test_ttl_is_applied_and_non_positive_ttls_are_skipped(
        cache: ResultCache, admin: redis.Redis) -> None:
    short, long, zero, negative = (cache.key("u", "e", "m", name)
                                   for name in ("short", "long", "zero", "negative"))
    cache.schedule_set_many([(short, b"1", 100), (long, b"2", 7200), (zero, b"3", 0),
                             (negative, b"4", -1)])
    await cache.drain()
    assert state(cache) == "ok"  # Redis would reject EX 0 or EX -1: they were never sent
    assert 0 < admin.ttl(short) <= 100
    assert 100 < admin.ttl(long) <= 7200
    assert admin.exists(zero, negative) == 0

    cache.schedule_set_many([(zero, b"3", 0)])
    assert cache.pending_writes == 0  # nothing to write, no task


async def test_writes_run_in_the_background_and_aclose_lets_them_land(
        redis_server: RedisServer, admin: redis.Redis) -> None:
    cache, _ = make_cache(redis_server.url)
    entries = [(cache.key("u", "e", "m", item), b"x", 60) for item in items(64)]
    cache.schedule_set_many(entries)
    assert cache.pending_writes == 1  # scheduled, not awaited by the caller
    await cache.aclose()
    assert admin.exists(*(key for key, _, _ in entries)) == 64


async def test_redis_killed_fails_open_backs_off_then_recovers(own_redis: RedisServer) -> None:
    clock = FakeClock()
    cache, metrics = make_cache(own_redis.url, clock)
    keys = [cache.key("u", "e", "m", item) for item in items(3)]
    cache.schedule_set_many([(k, b"v", 60) for k in keys])
    await cache.drain()
    assert await cache.get_many(keys) == [b"v"] * 3

    own_redis.kill()
    started = time.monotonic()
    assert await cache.get_many(keys) is None
    assert time.monotonic() - started < TIMEOUT_S + 2.0  # generous: only catches a hang
    assert state(cache) == "degraded"
    assert errors(metrics, "get") == 1

    # Redis is back, but the cache keeps away from it until the backoff ends.
    own_redis.restart()
    admin = redis.Redis(port=own_redis.port)
    try:
        baseline = connections_received(admin)
        clock.now += BACKOFF_S - 1
        assert await cache.get_many(keys) is None
        assert await cache.ping() is False
        cache.schedule_set_many([(keys[0], b"w", 60)])
        assert cache.pending_writes == 0
        assert connections_received(admin) == baseline
        assert errors(metrics, "get") == 1  # skipping is not an error
        assert state(cache) == "degraded"

        clock.now += 2
        assert await cache.get_many(keys) == [None] * 3  # reached Redis (restarted empty)
        assert state(cache) == "ok"
        assert connections_received(admin) > baseline
        cache.schedule_set_many([(keys[0], b"w", 60)])
        await cache.drain()
        assert await cache.get_many(keys[:1]) == [b"w"]
    finally:
        admin.close()
        await cache.aclose()


async def test_frozen_redis_times_out_and_only_one_probe_runs(own_redis: RedisServer) -> None:
    """SIGSTOP: Redis accepts connections but never answers, the worst case for a client."""
    clock = FakeClock()
    cache, metrics = make_cache(own_redis.url, clock)
    first, second = cache.key("u", "e", "m", "first"), cache.key("u", "e", "m", "second")
    cache.schedule_set_many([(first, b"1", 60), (second, b"2", 60)])
    await cache.drain()
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert await cache.get_many([first]) is None
        assert time.monotonic() - started < TIMEOUT_S + 2.0  # bounded by the deadline, not hung
        assert (state(cache), errors(metrics, "get")) == ("degraded", 1)

        clock.now += BACKOFF_S + 1
        probe = asyncio.create_task(cache.get_many([first]))
        await asyncio.sleep(0)  # the probe has started and is waiting on frozen Redis
        assert await cache.get_many([first]) is None  # others skip Redis while the probe runs
        assert await probe is None
        assert errors(metrics, "get") == 2  # the probe failed; the skipped call was no error
        assert state(cache) == "degraded"
    finally:
        own_redis.process.send_signal(signal.SIGCONT)

    # Redis now answers the abandoned MGETs; a reused connection would hand their replies
    # (b"1") to the next caller. The cache must read its own answer.
    clock.now += BACKOFF_S + 1
    assert await cache.get_many([second]) == [b"2"]
    assert await cache.get_many([first, second]) == [b"1", b"2"]
    assert state(cache) == "ok"
    await cache.aclose()


async def test_failed_writes_are_counted_and_swallowed(own_redis: RedisServer) -> None:
    cache, metrics = make_cache(own_redis.url, backoff_s=0.0)
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        cache.schedule_set_many([(cache.key("u", "e", "m", "x"), b"v", 60)])
        assert await cache.drain() == 0
        assert errors(metrics, "set") == 1
        assert state(cache) == "degraded"
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    assert await cache.ping() is True  # backoff 0: the next call tries again
    assert state(cache) == "ok"
    own_redis.kill()
    assert await cache.ping() is False
    assert errors(metrics, "ping") == 1
    await cache.aclose()


async def test_failure_is_logged_once_without_the_password(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    cache, metrics = make_cache(f"redis://:s3cret@127.0.0.1:{port}/0", backoff_s=0.0)
    try:
        for _ in range(3):
            assert await cache.get_many(["k"]) is None
    finally:
        await cache.aclose()
    assert errors(metrics, "get") == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # on the way into "degraded", not once per failed call
    assert f"127.0.0.1:{port}" in warnings[0]
    assert "s3cret" not in caplog.text


async def test_unix_socket_url(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = start_redis(tmp_path / "redis", "--unixsocket", str(socket_path),
                         "--unixsocketperm", "700")
    cache, _ = make_cache(f"unix://{socket_path}?db=3")
    key = cache.key("u", "e", "m", "over a unix socket")
    try:
        cache.schedule_set_many([(key, b"v", 60)])
        await cache.drain()
        assert await cache.get_many([key]) == [b"v"]
        direct = redis.Redis(unix_socket_path=str(socket_path), db=3)
        try:
            assert direct.get(key) == b"v"  # in the db the URL named
        finally:
            direct.close()
    finally:
        await cache.aclose()
        server.stop()


# -- Redis Cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    started = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


async def test_cluster_reads_and_writes_across_slots(cluster: RedisCluster) -> None:
    cache, metrics = make_cache(cluster.url)
    assert cache.kind == "cluster"
    keys = [cache.key("u", "e", "m", item) for item in items(60)]
    try:
        assert await cache.get_many(keys) == [None] * 60
        cache.schedule_set_many([(k, k.encode(), 120) for k in keys[::2]])
        await cache.drain()
        assert await cache.get_many(keys) == [k.encode() if i % 2 == 0 else None
                                              for i, k in enumerate(keys)]
        repeated = [keys[1], keys[0], keys[1], keys[0]]  # an item twice in one request
        assert await cache.get_many(repeated) == [None, keys[0].encode(), None, keys[0].encode()]
        assert state(cache) == "ok"
        assert errors(metrics, "get") == errors(metrics, "set") == 0
    finally:
        await cache.aclose()

    # The keys really are spread over every master, each with its TTL.
    found: list[str] = []
    for node in cluster.nodes:
        client = redis.Redis(port=node.port, decode_responses=True)
        try:
            local = [str(k) for k in client.keys(f"{cache.prefix}:*")]
            assert local, f"no key landed on the master at port {node.port}"
            assert all(0 < client.ttl(k) <= 120 for k in local)
            found += local
        finally:
            client.close()
    assert sorted(found) == sorted(keys[::2])


async def test_cluster_node_down_fails_open_then_recovers(tmp_path: Path) -> None:
    own = start_cluster(tmp_path / "cluster")
    clock = FakeClock()
    cache, metrics = make_cache(own.url, clock)
    keys = [cache.key("u", "e", "m", item) for item in items(30)]
    try:
        cache.schedule_set_many([(k, b"v", 60) for k in keys])
        await cache.drain()
        assert await cache.get_many(keys) == [b"v"] * 30

        own.nodes[0].kill()
        assert await cache.get_many(keys) is None
        assert (state(cache), errors(metrics, "get")) == ("degraded", 1)

        own.nodes[0].restart()  # same nodes.conf: it takes its slots back (empty, no persistence)
        own.wait_ok()
        clock.now += BACKOFF_S + 1
        values = await cache.get_many(keys)
        assert values is not None and b"v" in values and None in values
        assert state(cache) == "ok"
        cache.schedule_set_many([(k, b"w", 60) for k in keys])
        await cache.drain()
        assert await cache.get_many(keys) == [b"w"] * 30
    finally:
        await cache.aclose()
        own.stop()


async def test_cluster_pool_exhaustion_skips_the_cache_without_backing_off(
        cluster: RedisCluster, caplog: pytest.LogCaptureFixture) -> None:
    cache, metrics = make_cache(cluster.url + "?max_connections=1")
    keys = [cache.key("u", "e", "m", item) for item in items(10)]
    try:
        results = await asyncio.gather(*(cache.get_many(keys) for _ in range(4)))
        assert [None] * 10 in results  # at least one call had the node's only connection
        assert None in results  # and at least one found the pool full
        assert errors(metrics, "get") == results.count(None)
        assert state(cache) == "ok"  # a full pool is not a sick Redis: no backoff, no warning
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert await cache.get_many(keys) == [None] * 10
    finally:
        await cache.aclose()


# -- Sentinel --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    started = start_sentinel(tmp_path_factory.mktemp("sentinel"))
    yield started
    started.stop()


async def test_sentinel_url_finds_the_master(sentinel: SentinelSetup) -> None:
    cache, _ = make_cache(sentinel.url)
    assert cache.kind == "sentinel"
    key = cache.key("u", "e", "m", "via sentinel")
    try:
        assert await cache.ping() is True
        cache.schedule_set_many([(key, b"v", 60)])
        await cache.drain()
        assert await cache.get_many([key]) == [b"v"]
    finally:
        await cache.aclose()
    master = redis.Redis(port=sentinel.master.port)
    try:
        assert master.get(key) == b"v"  # it went to the master Sentinel named
    finally:
        master.close()


async def test_sentinel_failover_moves_the_cache_to_the_new_master(tmp_path: Path) -> None:
    setup = start_sentinel(tmp_path / "sentinel", replicas=1, down_after_ms=300)
    clock = FakeClock()
    cache, metrics = make_cache(setup.url, clock)
    before, after = cache.key("u", "e", "m", "before"), cache.key("u", "e", "m", "after")
    try:
        cache.schedule_set_many([(before, b"1", 60)])
        await cache.drain()
        assert state(cache) == "ok"

        promoted = setup.kill_master()
        # The pooled connection to the dead master fails once; after the backoff the pool asks
        # Sentinel again and finds the promoted replica (which has the data written before).
        for _ in range(2):
            cache.schedule_set_many([(after, b"2", 60)])
            await cache.drain()
            if state(cache) == "ok":
                break
            clock.now += BACKOFF_S + 1
        assert state(cache) == "ok"
        assert errors(metrics, "set") <= 1
        assert await cache.get_many([before, after]) == [b"1", b"2"]
        new_master = redis.Redis(port=promoted.port)
        try:
            assert new_master.get(after) == b"2"
        finally:
            new_master.close()
    finally:
        await cache.aclose()
        setup.stop()


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    started = start_tls_redis(tmp_path_factory.mktemp("tls"))
    yield started
    started.stop()


async def test_rediss_round_trip_with_a_verified_certificate(tls_redis: TlsRedis) -> None:
    cache, _ = make_cache(tls_redis.url)
    key = cache.key("u", "e", "m", "over tls")
    try:
        cache.schedule_set_many([(key, b"v", 60)])
        await cache.drain()
        assert await cache.get_many([key]) == [b"v"]
        assert state(cache) == "ok"
    finally:
        await cache.aclose()


@pytest.mark.parametrize("which", ["plaintext", "unknown CA"])
async def test_tls_mismatch_fails_open(tls_redis: TlsRedis, which: str) -> None:
    port = tls_redis.server.port
    url = f"redis://127.0.0.1:{port}/0" if which == "plaintext" else f"rediss://127.0.0.1:{port}/0"
    cache, metrics = make_cache(url)
    try:
        assert await cache.get_many([cache.key("u", "e", "m", "x")]) is None
        assert (state(cache), errors(metrics, "get")) == ("degraded", 1)
    finally:
        await cache.aclose()



async def test_held_writes_ride_along_with_the_next_lookup(cache: ResultCache,
                                                           admin: redis.Redis) -> None:
    written, looked_up = cache.key("u", "e", "m", "written"), cache.key("u", "e", "m", "looked up")
    cache.schedule_set_many([(written, b"w", 60)])
    assert cache.pending_writes == 1  # held for the write delay
    assert await cache.get_many([looked_up, written]) == [None, b"w"]
    assert cache.pending_writes == 0  # sent with the lookup, not by the timer
    assert admin.get(written) == b"w" and 0 < admin.ttl(written) <= 60


async def test_refused_writes_are_counted_but_reads_stay_in_use(own_redis: RedisServer) -> None:
    """A full Redis under `noeviction` refuses SETs with an OOM error reply: Redis is up, so the
    cache counts the refusal and keeps serving reads instead of backing off."""
    cache, metrics = make_cache(own_redis.url)
    admin = redis.Redis(port=own_redis.port)
    try:
        cached = cache.key("u", "e", "m", "cached")
        admin.set(cached, b"old")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # below what the server already uses: every SET is refused
        cache.schedule_set_many([(cache.key("u", "e", "m", "a"), b"v", 60)])
        assert await cache.drain() == 0  # a write pipeline of its own
        cache.schedule_set_many([(cache.key("u", "e", "m", "b"), b"v", 60)])
        # ...and a write riding along with a lookup
        assert await cache.get_many([cached]) == [b"old"]
        assert errors(metrics, "set") == 2
        assert errors(metrics, "get") == 0
        assert state(cache) == "ok"
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        await cache.aclose()


async def test_missing_password_fails_open_and_a_write_does_not_end_the_backoff(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_redis(tmp_path / "redis", "--requirepass", "s3cret")
    clock = FakeClock()
    cache, metrics = make_cache(f"redis://127.0.0.1:{server.port}/0", clock=clock)
    try:
        assert await cache.get_many(["k"]) is None
        assert errors(metrics, "get") == 1
        assert state(cache) == "degraded"
        assert "requires a password" in caplog.text or "AuthenticationError" in caplog.text
        clock.now += BACKOFF_S + 1  # the next call probes; a background write is that call
        cache.schedule_set_many([(cache.key("u", "e", "m", "x"), b"v", 60)])
        assert await cache.drain() == 0
        assert errors(metrics, "set") == 1
        assert state(cache) == "degraded"  # Redis answered, but not as the cache needs
    finally:
        await cache.aclose()
        server.stop()


async def test_a_write_refused_for_permissions_is_a_failure(own_redis: RedisServer) -> None:
    """NOPERM is not Redis being full: the cache cannot work as configured, so it backs off."""
    admin = redis.Redis(port=own_redis.port)
    admin.acl_setuser("reader", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@read", "+ping", "+auth"])
    admin.close()
    cache, metrics = make_cache(f"redis://reader:pw@127.0.0.1:{own_redis.port}/0")
    try:
        assert await cache.get_many(["k"]) == [None]
        cache.schedule_set_many([(cache.key("u", "e", "m", "x"), b"v", 60)])
        assert await cache.drain() == 0
        assert errors(metrics, "set") == 1
        assert state(cache) == "degraded"
    finally:
        await cache.aclose()
