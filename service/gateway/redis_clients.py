"""Every Redis client of the gateway comes from here, built from a parsed `RedisURL`.

Why one module: the result cache, the shadow store, feedback and the review queue (and, next,
quotas and keys) each need a client for a URL the operator wrote once. Built in one place, a URL
means the same deployment (standalone, Sentinel, Cluster), with the same timeouts, TLS and pool
size, whoever uses it; and the URL is parsed once (redis_url.py), not again by each client.

Two kinds of client:
- `link(url, ...)`: RedisLink, one pipelined connection to a standalone Redis, for the cache's hot
  path (redis_link.py says why it exists).
- `redis_py(url, ...)`: redis-py's `Redis` (standalone, or the master a Sentinel names) or
  `RedisCluster`, for everything else: failover and slot routing are redis-py's job.

Neither retries: the callers bound each call by a deadline and decide themselves what a failure
costs (the cache backs off, a feedback write answers 503).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from service.gateway.redis_link import RedisLink
from service.gateway.redis_url import Kind, RedisURL, parse_redis_url

__all__ = ["ClientChoice", "RedisPy", "link", "open_redis", "ping", "redis_py"]

logger = logging.getLogger("service.gateway.redis_clients")

#: What talks to a standalone Redis (GATEWAY_REDIS_CLIENT): RedisLink, or redis-py as the fallback.
ClientChoice = Literal["link", "redis-py"]


@dataclass
class RedisPy:
    """A redis-py client for one URL: `client` to use, `aclose()` to close it and whatever else the
    URL opened (a Sentinel's own connections to its sentinels)."""

    kind: Kind
    client: Redis | RedisCluster
    description: str  # scheme and hosts, for logs: never a password
    extra_closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def aclose(self) -> None:
        await self.client.aclose()
        for close in self.extra_closers:
            await close()


def link(url: RedisURL, socket_timeout_s: float, *,
         setting: str = "GATEWAY_REDIS_URL") -> RedisLink:
    """RedisLink to the standalone Redis of `url` (ValueError for Sentinel and Cluster URLs).
    Does not connect: the first call does."""
    if url.max_connections is not None:
        # Earlier releases sized redis-py's pool with it: a URL that worked then must not stop
        # the gateway now. One pipelined connection needs no pool size.
        logger.warning("max_connections in %s is ignored: a standalone Redis is reached over one "
                       "pipelined connection", setting)
    return RedisLink(url, timeout_s=socket_timeout_s, setting=setting)


def redis_py(url: RedisURL, socket_timeout_s: float) -> RedisPy:
    """redis-py's client for `url`, whatever its kind. Does not connect: the first call does.

    `socket_timeout_s` bounds connecting and each socket read or write, not a whole call: a caller
    that needs a deadline wraps the call in `asyncio.timeout`."""
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry": _no_retry(),
    }
    pool: dict[str, Any] = ({"max_connections": url.max_connections}
                            if url.max_connections is not None else {})
    if url.kind == "standalone":
        where: dict[str, Any] = ({"unix_socket_path": url.unix_path}
                                 if url.unix_path is not None else
                                 {"host": url.hosts[0][0], "port": url.hosts[0][1]})
        return RedisPy("standalone", Redis(
            **where, db=url.db, username=url.username, password=url.password,
            **timeouts, **url.tls_kwargs(), **pool), url.description)
    if url.kind == "sentinel":
        return _sentinel(url, timeouts, pool)
    return _cluster(url, timeouts, pool)


def open_redis(url: str, socket_timeout_s: float, *,
               setting: str = "GATEWAY_REDIS_URL") -> RedisPy | None:
    """redis-py's client for `url` (any scheme the cache takes), or None when it is empty: for
    the gateway's data that outlives a request (shadow counts, feedback, the review queue).
    `setting` names where the URL came from, for errors that say what to fix."""
    if not url:
        return None
    return redis_py(parse_redis_url(url, setting), socket_timeout_s)


async def ping(url: RedisURL, timeout_s: float) -> None:
    """Connect, PING once and close, with the client the gateway's cache would use: raises
    ConnectionError or TimeoutError (RedisLink), or redis.RedisError (redis-py) when Redis does not
    answer. For a one-off check (the demo's "is there a Redis?"), not for a hot path."""
    if url.kind == "standalone":
        client = link(url, timeout_s)
        try:
            (reply,) = await client.execute(("PING",))
            if isinstance(reply, Exception):  # NOAUTH and the like come back as replies
                raise ConnectionError(f"Redis at {url.description} refused PING: {reply}")
        finally:
            await client.aclose()
        return
    backend = redis_py(url, timeout_s)
    try:
        await backend.client.ping()
    finally:
        await backend.aclose()


def _no_retry() -> Retry:
    """Retries would multiply the deadline; each caller's own backoff is the retry policy."""
    return Retry(NoBackoff(), 0)


def _sentinel(url: RedisURL, timeouts: dict[str, Any], pool: dict[str, Any]) -> RedisPy:
    tls = url.tls_kwargs()
    sentinel_kwargs: dict[str, Any] = {
        **timeouts, **tls,
        "username": url.sentinel_username, "password": url.sentinel_password,
    }
    # Called through a Callable so that mypy --strict accepts it under both redis-py 5-7 (Sentinel's
    # __init__ untyped: a direct call is no-untyped-call) and 8.2+ (typed: an ignore is unused).
    make_sentinel: Callable[..., Sentinel] = Sentinel
    sentinel = make_sentinel(
        list(url.hosts), sentinel_kwargs=sentinel_kwargs, **timeouts, **tls,
        username=url.username, password=url.password, db=url.db,
    )
    assert url.service is not None  # the parser requires it for Sentinel
    master = sentinel.master_for(url.service, **pool)

    async def close_sentinels() -> None:
        for client in sentinel.sentinels:
            await client.aclose()

    return RedisPy("sentinel", master, url.description, [close_sentinels])


def _cluster(url: RedisURL, timeouts: dict[str, Any], pool: dict[str, Any]) -> RedisPy:
    # max_connections is per node; when all are busy redis-py raises rather than waits, which
    # the cache counts as an error (and backs off): raise it for very high concurrency.
    client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in url.hosts],
                          username=url.username, password=url.password, **timeouts,
                          **url.tls_kwargs(), **pool)
    return RedisPy("cluster", client, url.description)
