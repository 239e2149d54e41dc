"""RedisLink against real redis-server processes: replies, sharing, handshake, TLS, unix sockets, and
what happens when Redis is killed, frozen, or a caller gives up."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hiredis
import pytest
import redis
import uvloop

from service.gateway.redis_link import RedisLink, RedisLinkError
from tests.support.redis_server import RedisServer, free_port, start_redis
from tests.support.redis_tls import TlsRedis, start_tls_redis

TIMEOUT_S = 0.5
SLACK_S = 1.0  # generous: the time checks only catch hangs and timeouts that never fire
PASSWORD = "s3cret:/@%?#pw"  # every character that needs percent-encoding in a URL


def unique(name: str = "k") -> str:
    return f"link-test:{name}:{uuid.uuid4().hex}"


def connections_received(admin: redis.Redis) -> int:
    return int(admin.info("stats")["total_connections_received"])


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    result = RedisLink.from_url(redis_server.url, timeout_s=TIMEOUT_S)
    yield result
    await result.aclose()


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server with a password for the default user and an ACL user `us@er`."""
    server = start_redis(tmp_path / "redis", "--requirepass", PASSWORD)
    client = redis.Redis(port=server.port, password=PASSWORD)
    client.acl_setuser("us@er", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                       commands=["+@all"])
    client.close()
    yield server
    server.stop()


# -- replies -----------------------------------------------------------------------------------------


async def test_set_ex_and_mget_round_trip(link: RedisLink, admin: redis.Redis) -> None:
    hit, miss = unique("hit"), unique("miss")
    assert await link.execute(("SET", hit, b"\x00value\xff", "EX", 60)) == [b"OK"]
    assert await link.execute(("MGET", hit, miss)) == [[b"\x00value\xff", None]]
    assert 0 < admin.ttl(hit) <= 60
    assert await link.execute() == []


async def test_pipelined_commands_get_their_replies_in_order(link: RedisLink) -> None:
    a, b, counter = unique("a"), unique("b"), unique("counter")
    replies = await link.execute(("SET", a, "1", "EX", 60), ("SET", b, 2.5, "EX", 60),
                                 ("INCRBY", counter, 41), ("INCR", counter), ("MGET", a, b, counter))
    assert replies == [b"OK", b"OK", 41, 42, [b"1", b"2.5", b"42"]]


async def test_an_error_reply_is_returned_in_place_not_raised(link: RedisLink) -> None:
    key, text = unique("list"), unique("text")
    replies = await link.execute(("SET", text, "v", "EX", 60), ("LPUSH", text, "x"),
                                 ("SET", key, "v", "EX", "-1"), ("MGET", text, key))
    assert replies[0] == b"OK"
    assert isinstance(replies[1], hiredis.ReplyError) and str(replies[1]).startswith("WRONGTYPE")
    assert isinstance(replies[2], hiredis.ReplyError)
    assert replies[3] == [b"v", None]
    assert await link.execute(("GET", text)) == [b"v"]  # and the connection is still in step


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
        redis_server: RedisServer, admin: redis.Redis) -> None:
    keys = [unique(str(i)) for i in range(200)]
    admin.mset({key: f"value {i}" for i, key in enumerate(keys)})
    baseline = connections_received(admin)
    link = RedisLink.from_url(redis_server.url, timeout_s=TIMEOUT_S)
    try:
        # All 200 start before the connection exists: they must wait for one connect, not race.
        replies = await asyncio.gather(
            *(link.execute(("CLIENT", "ID"), ("GET", key)) for key in keys))
        assert [value for _, value in replies] == [f"value {i}".encode() for i in range(200)]
        assert len({client_id for client_id, _ in replies}) == 1
        more = await asyncio.gather(*(link.execute(("CLIENT", "ID")) for _ in range(50)))
        assert {reply[0] for reply in more} == {replies[0][0]}
        assert connections_received(admin) == baseline + 1
    finally:
        await link.aclose()


async def test_submitted_commands_share_one_write_with_the_calls_after_them(
        link: RedisLink, admin: redis.Redis) -> None:
    """A quota check and the cache lookup after it: one write, so Redis reads both at once."""
    key = unique("shared")
    assert await link.execute(("PING",)) == [b"PONG"]  # connected and handshaken
    before = int(admin.info("stats")["total_reads_processed"])
    first = link.submit(("SET", key, "1", "EX", 60), ("INCR", key))
    assert not first.done()
    assert await link.execute(("GET", key)) == [b"2"]  # sent after, in order
    assert await first == [b"OK", 2]
    # The link's one read, and the read of this INFO command itself.
    assert int(admin.info("stats")["total_reads_processed"]) - before == 2
    with pytest.raises(ValueError, match="at least one command"):
        link.submit()


async def test_a_calls_own_shorter_deadline_is_kept_behind_a_longer_one(
        own_redis: RedisServer) -> None:
    """A quota check (its own 5 s deadline here) ahead of a lookup (the link's): a frozen Redis
    fails both at the lookup's deadline, not the check's."""
    link = RedisLink.from_url(own_redis.url, timeout_s=TIMEOUT_S)
    try:
        assert await link.execute(("PING",)) == [b"PONG"]
        own_redis.process.send_signal(signal.SIGSTOP)
        try:
            slow = link.submit(("PING",), timeout_s=TIMEOUT_S * 10)
            async with asyncio.timeout(TIMEOUT_S + SLACK_S):  # a hang fails the test
                with pytest.raises(TimeoutError):
                    await link.execute(("PING",))
                with pytest.raises(TimeoutError):
                    await slow
        finally:
            own_redis.process.send_signal(signal.SIGCONT)
        assert await link.execute(("PING",)) == [b"PONG"]
    finally:
        await link.aclose()


# -- handshake ---------------------------------------------------------------------------------------


async def test_password_in_the_url_authenticates_every_call_of_the_first_connect(
        auth_redis: RedisServer) -> None:
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{auth_redis.port}/0"
    link = RedisLink.from_url(url, timeout_s=TIMEOUT_S)
    try:
        # Sent while the connection is still being made: none may run before AUTH (NOAUTH).
        replies = await asyncio.gather(*(link.execute(("PING",)) for _ in range(20)))
        assert replies == [[b"PONG"]] * 20
        assert await link.execute(("ACL", "WHOAMI")) == [b"default"]
    finally:
        await link.aclose()


async def test_acl_user_and_password_are_percent_decoded(auth_redis: RedisServer) -> None:
    url = f"redis://{quote('us@er', safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{auth_redis.port}"
    link = RedisLink.from_url(url, timeout_s=TIMEOUT_S)
    try:
        assert await link.execute(("ACL", "WHOAMI")) == [b"us@er"]
    finally:
        await link.aclose()


@pytest.mark.parametrize("userinfo", [":wrong-pass", "us%40er:wrong-pass", "nobody:wrong-pass"])
async def test_a_rejected_password_says_what_to_fix_and_never_shows_it(
        auth_redis: RedisServer, userinfo: str) -> None:
    link = RedisLink.from_url(f"redis://{userinfo}@127.0.0.1:{auth_redis.port}/0",
                              timeout_s=TIMEOUT_S)
    try:
        results = await asyncio.gather(*(link.execute(("PING",)) for _ in range(3)),
                                       return_exceptions=True)
        for result in results:
            assert isinstance(result, RedisLinkError)
            message = str(result)
            assert "rejected" in message and "GATEWAY_REDIS_URL" in message
            assert "password" in message
            assert "wrong-pass" not in message
        with pytest.raises(RedisLinkError):  # the next call tries again, and fails again
            await link.execute(("PING",))
    finally:
        await link.aclose()


async def test_a_password_for_a_server_without_one_is_a_clear_error(
        redis_server: RedisServer) -> None:
    link = RedisLink.from_url(f"redis://:hunter2@127.0.0.1:{redis_server.port}",
                              timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(RedisLinkError, match="has no password set") as caught:
            await link.execute(("PING",))
        assert "hunter2" not in str(caught.value)
    finally:
        await link.aclose()


async def test_select_db_from_the_url(redis_server: RedisServer) -> None:
    key = unique("db2")
    link = RedisLink.from_url(f"redis://127.0.0.1:{redis_server.port}/2", timeout_s=TIMEOUT_S)
    on_db2 = redis.Redis(port=redis_server.port, db=2)
    on_db0 = redis.Redis(port=redis_server.port, db=0)
    try:
        assert await link.execute(("SET", key, "in db 2", "EX", 60)) == [b"OK"]
        assert on_db2.get(key) == b"in db 2"
        assert on_db0.get(key) is None
    finally:
        on_db2.close()
        on_db0.close()
        await link.aclose()


async def test_a_db_the_server_does_not_have_is_a_clear_error(redis_server: RedisServer) -> None:
    link = RedisLink.from_url(f"redis://127.0.0.1:{redis_server.port}/99", timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(RedisLinkError, match="no db 99"):
            await link.execute(("PING",))
    finally:
        await link.aclose()


# -- TLS and unix sockets ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    started = start_tls_redis(tmp_path_factory.mktemp("tls"))
    yield started
    started.stop()


async def test_rediss_with_the_test_ca(tls_redis: TlsRedis) -> None:
    link = RedisLink.from_url(tls_redis.url, timeout_s=TIMEOUT_S)
    key = unique("tls")
    try:
        assert await link.execute(("SET", key, "over tls", "EX", 60), ("MGET", key)) == [
            b"OK", [b"over tls"]]
        assert link.description == f"rediss://127.0.0.1:{tls_redis.server.port}/0"
    finally:
        await link.aclose()


async def test_rediss_unverified_certificate_is_refused_unless_verification_is_off(
        tls_redis: TlsRedis) -> None:
    base = f"rediss://127.0.0.1:{tls_redis.server.port}/0"
    strict = RedisLink.from_url(base, timeout_s=TIMEOUT_S)  # system CAs: self-signed fails
    lax = RedisLink.from_url(f"{base}?ssl_cert_reqs=none", timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(RedisLinkError, match=r"failed verification.*ssl_ca_certs"):
            await strict.execute(("PING",))
        assert await lax.execute(("PING",)) == [b"PONG"]
    finally:
        await strict.aclose()
        await lax.aclose()


async def test_unix_socket_with_db(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    server = start_redis(tmp_path / "redis", "--unixsocket", str(socket_path),
                         "--unixsocketperm", "700")
    link = RedisLink.from_url(f"unix://{socket_path}?db=3", timeout_s=TIMEOUT_S)
    on_db3 = redis.Redis(unix_socket_path=str(socket_path), db=3)
    try:
        assert await link.execute(("SET", "via-unix", "yes", "EX", 60)) == [b"OK"]
        assert on_db3.get("via-unix") == b"yes"
        assert link.description == f"unix://{socket_path}?db=3"
    finally:
        on_db3.close()
        await link.aclose()
        server.stop()


# -- failures ----------------------------------------------------------------------------------------


async def test_connect_refused_fails_fast_with_connection_error() -> None:
    link = RedisLink.from_url(f"redis://127.0.0.1:{free_port()}", timeout_s=5.0)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="cannot connect") as caught:
            await link.execute(("PING",))
        assert not isinstance(caught.value, RedisLinkError)  # may work later: not a config error
        assert time.monotonic() - started < 1.0
    finally:
        await link.aclose()


async def test_redis_killed_fails_pending_calls_then_a_restarted_redis_is_used(
        own_redis: RedisServer) -> None:
    link = RedisLink.from_url(own_redis.url, timeout_s=5.0)
    try:
        assert await link.execute(("SET", "k", "before", "EX", 60)) == [b"OK"]
        blocked = asyncio.create_task(link.execute(("BLPOP", "never", 4)))
        queued = asyncio.create_task(link.execute(("GET", "k")))
        await asyncio.sleep(0.1)  # both are written and waiting
        own_redis.kill()
        started = time.monotonic()
        for task in (blocked, queued):
            with pytest.raises(ConnectionError, match="lost the connection"):
                await task
        assert time.monotonic() - started < SLACK_S
        with pytest.raises(ConnectionError):  # refused while it is down, quickly
            await link.execute(("GET", "k"))
        assert time.monotonic() - started < SLACK_S

        own_redis.restart()
        assert await link.execute(("GET", "k"), ("SET", "k", "after")) == [None, b"OK"]
        assert await link.execute(("GET", "k")) == [b"after"]
    finally:
        await link.aclose()


async def test_a_connection_closed_by_redis_while_idle_is_replaced(
        redis_server: RedisServer, admin: redis.Redis) -> None:
    """What Redis's `timeout` setting does to an idle client."""
    link = RedisLink.from_url(redis_server.url, timeout_s=TIMEOUT_S)
    try:
        [client_id] = await link.execute(("CLIENT", "ID"))
        assert admin.client_kill_filter(_id=client_id) == 1
        await asyncio.sleep(0.1)  # the link reads the close
        [new_id] = await link.execute(("CLIENT", "ID"))
        assert new_id != client_id
    finally:
        await link.aclose()


async def test_frozen_redis_times_out_every_pending_call_then_recovers(
        own_redis: RedisServer) -> None:
    """SIGSTOP: the connection stays up but nothing answers, the worst case for a client."""
    link = RedisLink.from_url(own_redis.url, timeout_s=TIMEOUT_S)
    admin = redis.Redis(port=own_redis.port)
    try:
        assert await link.execute(("SET", "first", "1"), ("SET", "second", "2")) == [b"OK"] * 2
        baseline = connections_received(admin)
        # The deadline timer armed for the SETs is still pending when the GETs below start: it
        # must hand over to theirs, which are later.
        await asyncio.sleep(TIMEOUT_S * 0.6)
        own_redis.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            calls = [asyncio.create_task(link.execute(("GET", "first"))) for _ in range(5)]
            await asyncio.sleep(TIMEOUT_S / 5)  # a later call, still before the SETs' deadline
            calls.append(asyncio.create_task(link.execute(("GET", "first"))))
            async with asyncio.timeout(TIMEOUT_S + SLACK_S):  # a hang fails the test, not CI
                results = await asyncio.gather(*calls, return_exceptions=True)
            elapsed = time.monotonic() - started
            assert all(isinstance(result, TimeoutError) for result in results), results
            # All fail when the oldest's deadline passes: the connection is gone for all of them.
            assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + SLACK_S
        finally:
            own_redis.process.send_signal(signal.SIGCONT)
        # Redis now answers the abandoned GETs on the old socket; a reused connection would hand
        # b"1" to the next caller.
        assert await link.execute(("GET", "second")) == [b"2"]
        assert await link.execute(("GET", "first"), ("GET", "second")) == [b"1", b"2"]
        assert connections_received(admin) == baseline + 1
    finally:
        admin.close()
        await link.aclose()


async def test_a_frozen_redis_during_the_handshake_times_out(own_redis: RedisServer) -> None:
    link = RedisLink.from_url(f"redis://127.0.0.1:{own_redis.port}/1", timeout_s=TIMEOUT_S)
    own_redis.process.send_signal(signal.SIGSTOP)  # the kernel still accepts the connection
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await link.execute(("PING",))
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    try:
        assert await link.execute(("PING",)) == [b"PONG"]
    finally:
        await link.aclose()


@pytest.mark.parametrize("give_up", ["cancel", "outer_timeout"])
async def test_a_caller_that_gives_up_does_not_shift_the_replies_of_others(
        redis_server: RedisServer, admin: redis.Redis, give_up: str) -> None:
    link = RedisLink.from_url(redis_server.url, timeout_s=3.0)
    queue, mine = unique("queue"), unique("mine")
    admin.set(mine, "mine", ex=60)
    try:
        await link.execute(("PING",))

        async def blpop() -> list[Any]:
            if give_up == "outer_timeout":
                async with asyncio.timeout(0.05):
                    return await link.execute(("BLPOP", queue, 2))
            return await link.execute(("BLPOP", queue, 2))

        gives_up = asyncio.create_task(blpop())
        await asyncio.sleep(0.1 if give_up == "cancel" else 0.0)
        if give_up == "cancel":
            gives_up.cancel()
        with pytest.raises(asyncio.CancelledError if give_up == "cancel" else TimeoutError):
            await gives_up
        follower = asyncio.create_task(link.execute(("GET", mine)))
        await asyncio.sleep(0.05)
        admin.rpush(queue, "for the caller who left")  # BLPOP's reply arrives now
        assert await follower == [b"mine"]
        assert await link.execute(("LLEN", queue)) == [0]  # the BLPOP did run
    finally:
        await link.aclose()


@pytest.mark.parametrize("scenario", ["share", "frozen", "killed", "cancel", "outer_timeout"])
def test_the_same_under_uvloop(own_redis: RedisServer, scenario: str) -> None:
    """The gateway runs on uvloop, whose timers and transports are not asyncio's."""
    admin = redis.Redis(port=own_redis.port)
    scenarios = {
        "share": lambda: test_concurrent_calls_share_one_connection_and_get_their_own_replies(
            own_redis, admin),
        "frozen": lambda: test_frozen_redis_times_out_every_pending_call_then_recovers(own_redis),
        "killed": lambda: test_redis_killed_fails_pending_calls_then_a_restarted_redis_is_used(
            own_redis),
        "cancel": lambda: test_a_caller_that_gives_up_does_not_shift_the_replies_of_others(
            own_redis, admin, "cancel"),
        "outer_timeout": lambda: test_a_caller_that_gives_up_does_not_shift_the_replies_of_others(
            own_redis, admin, "outer_timeout"),
    }
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert isinstance(runner.get_loop(), uvloop.Loop)
            runner.run(scenarios[scenario]())
    finally:
        admin.close()


# -- description and close ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "description"), [
    ("redis://:hunter2@cache.internal:6380/3", "redis://cache.internal:6380/3"),
    ("redis://app:hunter2@cache.internal", "redis://cache.internal:6379/0"),
    ("rediss://app:hunter2@[::1]:7000/0?ssl_cert_reqs=none", "rediss://[::1]:7000/0"),
    ("redis://cache.internal/1?password=hunter2&db=4", "redis://cache.internal:6379/4"),
    ("unix:///run/redis.sock?db=2&password=hunter2", "unix:///run/redis.sock?db=2"),
    ("unix://:hunter2@/run/redis.sock", "unix:///run/redis.sock"),
    ("redis://", "redis://localhost:6379/0"),
])
def test_description_names_the_place_never_the_password(url: str, description: str) -> None:
    link = RedisLink.from_url(url, timeout_s=TIMEOUT_S)
    assert link.description == description
    assert "hunter2" not in link.description
    assert repr(link) == f"RedisLink({description!r})"
    assert "hunter2" not in repr(vars(link)["_url"])  # a logged URL does not leak it


@pytest.mark.parametrize(("url", "message"), [
    ("redis+sentinel://:hunter2@h:26379/mymaster", "unsupported Redis URL scheme"),
    ("redis+cluster://h:7000", "unsupported Redis URL scheme"),
    ("http://h", "unsupported Redis URL scheme"),
    ("redis://:hunter2@h/0?socket_timeout=1", "unsupported parameter.*socket_timeout"),
    ("redis://:hunter2@h/zero", "db .* must be a number"),
    ("redis://:hunter2@h/0?db=-1", "db .* must be a number"),
    ("redis://:hunter2@h:port/0", "port .* must be a number"),
    ("redis://:hunter2@h:70000/0", "port .* must be a number"),
    ("redis://h/0?ssl_cert_reqs=none", "only apply to rediss://"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "none, optional or required"),
    ("rediss://h/0?ssl_keyfile=/k.pem", "needs ssl_certfile"),
    ("redis://app@h/0", "no password"),
    ("unix://?db=1", "no socket path"),
    # Unencoded '/' or '?' in the password split the URL early: nothing of it may be quoted.
    ("redis://:hun/hunter2@h:6379/0", "percent-encode"),
    ("redis://:hun?hunter2=1@h", "percent-encode"),
])
def test_bad_urls_are_refused_up_front_without_echoing_secrets(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        RedisLink.from_url(url, timeout_s=TIMEOUT_S)
    assert "hunter2" not in str(caught.value)
    assert "GATEWAY_REDIS_URL" in str(caught.value)


def test_from_url_does_not_connect() -> None:
    """Nothing listens there; building the link must still succeed, outside any event loop."""
    RedisLink.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout_s=TIMEOUT_S)


async def test_aclose_fails_pending_calls_and_later_ones(redis_server: RedisServer) -> None:
    link = RedisLink.from_url(redis_server.url, timeout_s=5.0)
    await link.aclose()  # never connected: nothing to do
    link = RedisLink.from_url(redis_server.url, timeout_s=5.0)
    assert await link.execute(("PING",)) == [b"PONG"]
    pending = asyncio.create_task(link.execute(("BLPOP", unique("never"), 3)))
    await asyncio.sleep(0.05)
    await link.aclose()
    with pytest.raises(RedisLinkError, match="closed"):
        await pending
    with pytest.raises(RedisLinkError, match="closed"):
        await link.execute(("PING",))
    await link.aclose()  # idempotent


async def test_aclose_during_the_connect(redis_server: RedisServer) -> None:
    link = RedisLink.from_url(redis_server.url, timeout_s=5.0)
    first = asyncio.create_task(link.execute(("PING",)))
    await asyncio.sleep(0)  # the connect has started, not finished
    await link.aclose()
    with pytest.raises(RedisLinkError, match="closed"):
        await first


async def test_a_redis_at_its_client_limit_is_a_passing_refusal_not_a_bad_password(
        tmp_path: Path) -> None:
    """At `maxclients`, Redis answers a new connection with an error and closes it; that reply
    meets the handshake (never a caller's command), and does not blame the password."""
    server = start_redis(tmp_path / "redis", "--requirepass", PASSWORD, "--maxclients", "1")
    holder = redis.Redis(port=server.port, password=PASSWORD)
    holder.ping()  # takes the only client slot
    link = RedisLink.from_url(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0",
                              timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(ConnectionError) as caught:
            await link.execute(("MGET", "k"))
        assert not isinstance(caught.value, RedisLinkError)
        assert "max number of clients" in str(caught.value)
        assert "password" not in str(caught.value)
        holder.close()
        await asyncio.sleep(0.1)
        assert await link.execute(("MGET", "k")) == [[None]]
    finally:
        await link.aclose()
        server.stop()


async def test_a_missing_password_is_named_at_the_handshake(auth_redis: RedisServer) -> None:
    link = RedisLink.from_url(f"redis://127.0.0.1:{auth_redis.port}/0", timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(RedisLinkError, match="requires a password"):
            await link.execute(("MGET", "k"))
    finally:
        await link.aclose()
