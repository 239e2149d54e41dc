"""ResultCache without I/O: the key, URL parsing, and the disabled cache.

Building a cache never connects (redis-py connects lazily), so URL forms are checked here; the
behaviour against real Redis deployments is in tests/integration/test_cache*.py.
"""

from __future__ import annotations

import hashlib
import re

import orjson
import pytest
from prometheus_client import CollectorRegistry

from service.gateway.cache import ResultCache, cache_key
from service.gateway.metrics import GatewayMetrics

CHAT = {"messages": [{"role": "user", "content": "hi", "extra": {"b": 1, "a": [1, {"y": 2, "x": 3}]}}]}
CHAT_REORDERED = {"messages": [{"extra": {"a": [1, {"x": 3, "y": 2}], "b": 1}, "content": "hi",
                                "role": "user"}]}


def build(url: str) -> ResultCache:
    return ResultCache.from_url(url, prefix="cgw:v1", socket_timeout_s=0.1, backoff_s=5.0,
                                metrics=GatewayMetrics(CollectorRegistry()))


def test_key_is_prefix_and_sha256_of_the_fields_as_one_json_array() -> None:
    key = cache_key("cgw:v1", "local", "/v1/classifications", "ft:m", "hello")
    payload = orjson.dumps(["local", "/v1/classifications", "ft:m", "hello"])
    assert key == "cgw:v1:" + hashlib.sha256(payload).hexdigest()
    assert re.fullmatch(r"cgw:v1:[0-9a-f]{64}", key)


def test_key_ignores_dict_key_order_at_every_depth() -> None:
    assert cache_key("p", "u", "e", "m", CHAT) == cache_key("p", "u", "e", "m", CHAT_REORDERED)


def test_key_does_not_ignore_list_order() -> None:
    swapped = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    original = {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]}
    assert cache_key("p", "u", "e", "m", swapped) != cache_key("p", "u", "e", "m", original)


@pytest.mark.parametrize("other", [
    ("u2", "e", "m", "x"),
    ("u", "e2", "m", "x"),
    ("u", "e", "m2", "x"),
    ("u", "e", "m", "x2"),
    ("u", "e", "m", ["x"]),
    ("u", "e", "m", {"x": None}),
])
def test_key_changes_with_every_field(other: tuple[str, str, str, object]) -> None:
    assert cache_key("p", "u", "e", "m", "x") != cache_key("p", *other)


def test_key_fields_cannot_bleed_into_each_other() -> None:
    assert cache_key("p", "ab", "c", "m", "x") != cache_key("p", "a", "bc", "m", "x")
    assert cache_key("p", "u", "e", "m:x", "") != cache_key("p", "u", "e", "m", ":x")


def test_key_prefix_separates_versions() -> None:
    assert cache_key("cgw:v1", "u", "e", "m", "x").removeprefix("cgw:v1:") == \
        cache_key("cgw:v2", "u", "e", "m", "x").removeprefix("cgw:v2:")
    assert cache_key("cgw:v1", "u", "e", "m", "x") != cache_key("cgw:v2", "u", "e", "m", "x")


def test_instance_key_uses_its_prefix() -> None:
    cache = build("redis://127.0.0.1:1/0")
    assert cache.key("u", "e", "m", CHAT) == cache_key("cgw:v1", "u", "e", "m", CHAT_REORDERED)


def test_key_rejects_what_is_not_json_data() -> None:
    with pytest.raises(TypeError):
        cache_key("p", "u", "e", "m", object())


@pytest.mark.parametrize(("url", "kind", "description"), [
    ("redis://127.0.0.1:7000/0", "standalone", "redis://127.0.0.1:7000/0"),
    ("redis://:s3cret@cache.internal:7000/2", "standalone", "redis://cache.internal:7000/2"),
    ("rediss://user:s3cret@cache.internal/0", "standalone", "rediss://cache.internal:6379/0"),
    ("unix:///run/redis/redis.sock?db=1", "standalone", "unix:///run/redis/redis.sock?db=1"),
    # Earlier releases sized redis-py's pool with it; one pipelined connection ignores it.
    ("redis://127.0.0.1:7000/0?max_connections=50", "standalone", "redis://127.0.0.1:7000/0"),
    ("redis+sentinel://s1:26380,s2/mymaster/3", "sentinel",
     "redis+sentinel://s1:26380,s2:26379/mymaster/3"),
    ("rediss+sentinel://:s3cret@s1/mymaster?sentinel_password=other", "sentinel",
     "rediss+sentinel://s1:26379/mymaster/0"),
    ("redis+cluster://user:s3cret@n1:7000,n2:7001,[::1]:7002", "cluster",
     "redis+cluster://n1:7000,n2:7001,::1:7002"),
    ("rediss+cluster://n1?ssl_cert_reqs=none&max_connections=500", "cluster",
     "rediss+cluster://n1:6379"),
    ("redis+sentinel://s1/mymaster?max_connections=20", "sentinel",
     "redis+sentinel://s1:26379/mymaster/0"),
])
def test_supported_urls_build_without_connecting(url: str, kind: str, description: str) -> None:
    cache = build(url)
    assert cache.kind == kind
    assert cache.state == "ok"
    assert cache.description == description
    assert "s3cret" not in cache.description


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:7000", "unsupported Redis URL scheme 'http'"),
    ("redis://127.0.0.1:7000/0?socket_timeout=1", "unsupported parameter(s) socket_timeout"),
    ("redis://127.0.0.1:7000/zero", "the db in GATEWAY_REDIS_URL must be a number"),
    ("redis+sentinel://:pa/ss@s1:26379/mymaster", "percent-encode"),
    ("redis+cluster://:pa?ss@n1:7000", "percent-encode"),
    ("redis+sentinel://s1:26379", "master's name"),
    ("redis+sentinel://s1:26379/mymaster/zero", "must be a number"),
    ("redis+sentinel://s1:26379/mymaster?timeout=1", "unsupported parameter(s) timeout"),
    ("redis+cluster://n1:7000/1", "Redis Cluster has only db 0"),
    ("redis+cluster://n1:port", "bad port 'port'"),
    ("redis+cluster://", "names no host"),
    ("redis+cluster://n1?max_connections=none", "max_connections in the redis+cluster:// cache URL "
                                                "must be a positive integer"),
    ("redis+sentinel://s1/mymaster?max_connections=0", "must be a positive integer"),
])
def test_bad_urls_say_what_to_write(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build(url)


async def test_empty_url_gives_a_disabled_cache_that_does_nothing() -> None:
    cache = build("")
    assert (cache.state, cache.kind) == ("disabled", "disabled")
    assert await cache.get_many(["k"]) is None
    assert await cache.ping() is False
    cache.schedule_set_many([("k", b"v", 60)])
    assert cache.pending_writes == 0
    assert await cache.drain() == 0
    await cache.aclose()
