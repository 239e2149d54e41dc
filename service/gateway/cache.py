"""ResultCache: classification results in Redis, keyed by what determines them. Fails open.

The cache is an optimisation, never a dependency: every Redis call is bounded by a short deadline, a
failure is counted and swallowed, and after one the cache stays away from Redis for `backoff_s`
seconds (state "degraded") so that a slow or dead Redis costs requests nothing while it is down. After
the backoff one call probes Redis again; the first success brings the state back to "ok".

Supported URLs (see `from_url`, parsed by redis_url.py for every scheme and client): `redis://`,
`rediss://`, `unix://` (standalone), `redis+sentinel://` / `rediss+sentinel://` (Sentinel) and
`redis+cluster://` / `rediss+cluster://` (Redis Cluster). An empty URL gives a disabled cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Literal, Protocol, TypeVar, cast

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MaxConnectionsError, OutOfMemoryError, ReadOnlyError

from service.gateway import redis_clients
from service.gateway.metrics import GatewayMetrics
from service.gateway.redis_clients import ClientChoice, RedisPy
from service.gateway.redis_link import RedisLink
from service.gateway.redis_url import parse_redis_url
from service.gateway.resilience import ProbeGate

logger = logging.getLogger(__name__)
T = TypeVar("T")

CacheState = Literal["disabled", "ok", "degraded"]
CacheKind = Literal["disabled", "standalone", "sentinel", "cluster"]
RedisClient = ClientChoice  # GATEWAY_REDIS_CLIENT: what talks to a standalone Redis

_MAX_RIDE_ALONG = 64  # held writes that may share a lookup's pipeline
_REFUSED_WRITE_CODES = ("OOM", "MISCONF", "READONLY")


def cache_key(prefix: str, upstream: str, endpoint: str, model: str, item: Any) -> str:
    """`<prefix>:<sha256 hex>` of upstream, endpoint, model and the canonical JSON of the item.

    The four fields are hashed as one JSON array, so field boundaries cannot be confused ("a", "bc"
    and "ab", "c" give different keys), and with sorted dict keys, so two equal chat items hit the
    same entry whatever order their fields arrived in. The model id is part of the key: re-pointing a
    task to a new model never serves the old model's results. `item` must be plain JSON data (str,
    dict, list, numbers): pass `model.model_dump(mode="json")` for a pydantic object.
    """
    payload = orjson.dumps((upstream, endpoint, model, item), option=orjson.OPT_SORT_KEYS)
    return f"{prefix}:{hashlib.sha256(payload).hexdigest()}"


Entry = tuple[str, bytes, int]  # key, value, ttl_s


class _Backend(Protocol):
    """How the cache talks to one Redis deployment. Writes report how many failed (an error reply
    such as OOM) rather than raising: Redis answered, so reads stay in use."""

    kind: CacheKind
    description: str  # for logs: scheme and hosts, never a password
    bounded: bool  # True when every call is already bounded by the socket timeout

    async def mget(self, keys: list[str]) -> list[Any]: ...
    async def set_and_mget(self, entries: Sequence[Entry], keys: list[str]) -> tuple[list[Any], int]: ...
    async def set_many(self, entries: Sequence[Entry]) -> int: ...
    async def ping(self) -> None: ...
    async def aclose(self) -> None: ...


class _LinkBackend:
    """A standalone Redis over RedisLink: one pipelined connection, bounded by the link itself.

    redis-py's machinery (pool, Retry, Pipeline) was most of a lookup's cost on the gateway's hot
    path: `bench/redis_link.py` measured 45 us of CPU per MGET against 103, and 46 against 153 for
    a held write riding along with a lookup."""

    kind: CacheKind = "standalone"
    bounded = True

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self.link = link
        self.description = link.description

    async def mget(self, keys: list[str]) -> list[Any]:
        (values,) = await self._link.execute(("MGET", *keys))
        return cast(list[Any], _values(values))

    async def set_and_mget(self, entries: Sequence[Entry], keys: list[str]) -> tuple[list[Any], int]:
        replies = await self._link.execute(
            *[("SET", key, value, "EX", ttl) for key, value, ttl in entries], ("MGET", *keys))
        return _values(replies[-1]), _errors(replies[:-1])

    async def set_many(self, entries: Sequence[Entry]) -> int:
        return _errors(await self._link.execute(
            *[("SET", key, value, "EX", ttl) for key, value, ttl in entries]))

    async def ping(self) -> None:
        (reply,) = await self._link.execute(("PING",))
        _values(reply)

    async def aclose(self) -> None:
        await self._link.aclose()


def _values(reply: Any) -> Any:
    """An error reply to a read is a failed read (e.g. NOAUTH when the URL lacks the password)."""
    if isinstance(reply, Exception):  # hiredis.ReplyError, or redis-py's ResponseError
        raise reply
    return reply


def _errors(replies: Sequence[Any]) -> int:
    """How many writes Redis refused for want of room or of write access (OOM under
    `noeviction`, MISCONF after a failed save, READONLY on a replica): Redis is up and reads work,
    so these are counted, not a failure. Any other error reply (NOAUTH, NOPERM, ...) is raised:
    the cache cannot use this Redis as configured."""
    refused = 0
    for reply in replies:
        if isinstance(reply, Exception):
            if not (isinstance(reply, OutOfMemoryError | ReadOnlyError)  # redis-py strips the code
                    or str(reply).startswith(_REFUSED_WRITE_CODES)):
                raise reply
            refused += 1
    return refused


class _RedisPyBackend:
    """Sentinel and Cluster through redis-py (failover and slot routing are its job), and a
    standalone Redis when GATEWAY_REDIS_CLIENT=redis-py. redis_clients.py builds the client."""

    bounded = False

    def __init__(self, redis: RedisPy) -> None:
        self._redis = redis
        self.client = redis.client
        self.kind: CacheKind = redis.kind
        self.description = redis.description

    async def mget(self, keys: list[str]) -> list[Any]:
        if isinstance(self.client, RedisCluster):
            # Keys hash to many slots; this splits them per slot and node, runs the per-node MGETs
            # concurrently and restores the caller's order.
            return await self.client.mget_nonatomic(keys)
        return cast(list[Any], await self.client.mget(keys))

    async def set_and_mget(self, entries: Sequence[Entry], keys: list[str]) -> tuple[list[Any], int]:
        """Held writes and a lookup in one round trip (not for a cluster, where one pipeline's
        keys would have to share a node)."""
        pipe = self.client.pipeline(transaction=False)
        for key, value, ttl in entries:
            pipe.set(key, value, ex=ttl)
        pipe.mget(keys)
        replies = await pipe.execute(raise_on_error=False)
        return cast(list[Any], _values(replies[-1])), _errors(replies[:-1])

    async def set_many(self, entries: Sequence[Entry]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key, value, ttl in entries:
            pipe.set(key, value, ex=ttl)
        return _errors(await pipe.execute(raise_on_error=False))

    async def ping(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


class ResultCache:
    """Fail-open result cache. Build it with `from_url` in the app's lifespan; close with `aclose`."""

    def __init__(
        self,
        connection: _Backend | None,
        *,
        prefix: str,
        socket_timeout_s: float,
        backoff_s: float,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        max_pending_writes: int = 1024,
        write_delay_s: float = 0.001,
    ) -> None:
        self._conn = connection
        self._write_delay_s = write_delay_s
        self._buffer: list[tuple[str, bytes, int]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self.prefix = prefix
        self._timeout_s = socket_timeout_s
        self._backoff_s = backoff_s
        self._metrics = metrics
        self._clock = clock
        self._max_pending_writes = max_pending_writes
        # Backing off after an error, then one probe: the mechanism the upstream breaker uses too.
        self._gate = ProbeGate(clock=clock)
        # Strong references: the event loop keeps only weak ones to tasks, and a write task that is
        # garbage-collected mid-flight would vanish silently.
        self._pending: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str,
        socket_timeout_s: float,
        backoff_s: float,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        max_pending_writes: int = 1024,
        client: RedisClient = "link",
    ) -> ResultCache:
        """A cache for `url` (empty = disabled). Connects lazily: building it never touches Redis.

        `socket_timeout_s` bounds each operation as a whole (connect, send, read), not only each
        socket call. `clock` is injectable so tests can end a backoff without sleeping.
        `max_pending_writes` bounds the background write tasks; beyond it writes are dropped and
        counted as `cache_errors{operation="set"}` (Redis cannot keep up). `client` picks what
        talks to a standalone Redis: RedisLink, or redis-py (the fallback, which also takes
        redis-py's URL options).
        """
        connection = _connect(url, socket_timeout_s, client) if url.strip() else None
        return cls(connection, prefix=prefix, socket_timeout_s=socket_timeout_s,
                   backoff_s=backoff_s, metrics=metrics, clock=clock,
                   max_pending_writes=max_pending_writes)

    def key(self, upstream: str, endpoint: str, model: str, item: Any) -> str:
        return cache_key(self.prefix, upstream, endpoint, model, item)

    @property
    def state(self) -> CacheState:
        if self._conn is None:
            return "disabled"
        return "ok" if self._gate.is_closed else "degraded"

    @property
    def kind(self) -> CacheKind:
        """How Redis is deployed ("standalone", "sentinel", "cluster"), for /readyz and logs."""
        return "disabled" if self._conn is None else self._conn.kind

    @property
    def description(self) -> str:
        """Where the cache lives (scheme and hosts, never a password), for /readyz and logs."""
        return "disabled" if self._conn is None else self._conn.description

    @property
    def link(self) -> RedisLink | None:
        """The RedisLink the cache reads over (standalone Redis, GATEWAY_REDIS_CLIENT=link),
        for a caller whose commands should share the lookup's write (quotas.py)."""
        return self._conn.link if isinstance(self._conn, _LinkBackend) else None

    @property
    def pending_writes(self) -> int:
        """Write pipelines in flight, plus one for entries still held in the write buffer."""
        return len(self._pending) + (1 if self._buffer else 0)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """One MGET. None (not an exception) when Redis is down, slow, backed off, or disabled.

        Writes still held in the buffer ride along in the same pipeline (standalone and Sentinel),
        so that at low load a miss costs one Redis round trip, not two."""
        conn = self._conn
        if conn is None:
            return None
        if not keys:
            return []
        probe = self._admit()
        if probe is None:
            return None
        writes: list[tuple[str, bytes, int]] = []
        if self._buffer and conn.kind != "cluster" and len(self._buffer) <= _MAX_RIDE_ALONG:
            writes = self._take_buffer()  # a large buffer goes by itself: it must not slow a lookup
        failed_writes = 0
        try:
            if writes:
                values, failed_writes = await self._bounded(conn.set_and_mget(writes, list(keys)))
            else:
                values = await self._bounded(conn.mget(list(keys)))
        except Exception as exc:  # fail open: whatever Redis does, the request goes on without it
            if writes:
                self._metrics.cache_errors.labels(operation="set").inc()
            self._failed("get", exc)
            return None
        finally:
            if probe:
                self._gate.release()
        self._succeeded()
        if failed_writes:
            self._write_rejected(failed_writes)
        return values

    def schedule_set_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """(key, value, ttl_s) written by one pipeline in a background task, off the response path.

        Writes are held for `write_delay_s` (1 ms) first: the batch that produced them is still
        answering its callers, and a write sent now would put a Redis round trip in front of their
        responses; under load, the writes of every batch in that window share one pipeline.
        Entries with ttl_s <= 0 are skipped (caching disabled for that task). Must be called from
        the event loop. Call `drain()` (or `aclose()`) at shutdown so pending writes land.
        """
        if self._conn is None or self._gate.backing_off():
            return  # backing off: skip now rather than hold entries that will be dropped
        self._buffer.extend((key, value, ttl) for key, value, ttl in entries if ttl > 0)
        if self._buffer and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(self._write_delay_s,
                                                                       self._flush)

    def _take_buffer(self) -> list[tuple[str, bytes, int]]:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        taken, self._buffer = self._buffer, []
        return taken

    def _flush(self) -> None:
        live = self._take_buffer()
        if not live or self._conn is None:
            return
        if len(self._pending) >= self._max_pending_writes:
            self._metrics.cache_errors.labels(operation="set").inc()
            return
        probe = self._admit()
        if probe is None:
            return
        task = asyncio.get_running_loop().create_task(self._set_many(self._conn, live))
        self._pending.add(task)
        task.add_done_callback(partial(self._write_done, probe))

    async def ping(self) -> bool:
        """True when Redis answers PING within the deadline. Respects the backoff (no call then)."""
        if self._conn is None:
            return False
        probe = self._admit()
        if probe is None:
            return False
        try:
            await self._bounded(self._conn.ping())
        except Exception as exc:  # fail open
            self._failed("ping", exc)
            return False
        finally:
            if probe:
                self._gate.release()
        self._succeeded()
        return True

    async def drain(self, timeout_s: float | None = None) -> int:
        """Wait for pending background writes; returns how many are still pending after timeout_s."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout_s)
        return len(self._pending)

    async def aclose(self, drain_timeout_s: float | None = None) -> None:
        """Let pending writes finish (each is bounded by the socket timeout), then close clients."""
        if self._conn is None:
            return
        left = await self.drain(self._timeout_s * 2 if drain_timeout_s is None else drain_timeout_s)
        if left:
            stuck = set(self._pending)
            for task in stuck:
                task.cancel()
            await asyncio.wait(stuck)
        conn, self._conn = self._conn, None
        try:
            await conn.aclose()
        except Exception:  # closing a dead connection must not fail shutdown
            logger.debug("closing the Redis client of %s failed", conn.description, exc_info=True)

    # -- internals -------------------------------------------------------------------------------

    async def _bounded(self, call: Awaitable[T]) -> T:
        """`call`, within the socket timeout (which a RedisLink backend enforces by itself)."""
        assert self._conn is not None
        if self._conn.bounded:
            return await call
        async with asyncio.timeout(self._timeout_s):
            return await call

    async def _set_many(self, conn: _Backend, entries: list[tuple[str, bytes, int]]) -> None:
        try:
            failed = await self._bounded(conn.set_many(entries))
        except Exception as exc:  # fail open: a lost write only costs a future miss
            self._failed("set", exc)
            return
        self._succeeded()
        if failed:
            self._write_rejected(failed)

    def _write_rejected(self, count: int) -> None:
        """Redis answered but refused writes (e.g. OOM under `maxmemory-policy noeviction`): counted
        and logged, but reads stay in use, since Redis itself is up."""
        self._metrics.cache_errors.labels(operation="set").inc()
        logger.debug("Redis on %s refused %d cache write(s)", self.description, count)

    def _write_done(self, probe: bool, task: asyncio.Task[None]) -> None:
        # In a done callback, not in the coroutine: a task cancelled before it started never runs
        # its own `finally`, and a stuck probe flag would keep the cache degraded for ever.
        self._pending.discard(task)
        if probe:
            self._gate.release()

    def _admit(self) -> bool | None:
        """May this call use Redis? None = no (backing off, or another call is probing);
        True = yes, as the one probe after a backoff; False = yes, Redis is believed healthy."""
        return self._gate.admit()

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._metrics.cache_errors.labels(operation=operation).inc()
        if isinstance(exc, MaxConnectionsError):
            # Our own pool is full (cluster clients raise instead of waiting): Redis is fine, so
            # this call goes without the cache but the others keep using it.
            logger.debug("Redis cache %s skipped: the connection pool is full", operation)
            return
        if self._gate.open(self._backoff_s):
            reason = (f"timed out after {self._timeout_s}s" if isinstance(exc, TimeoutError)
                      else f"{type(exc).__name__}: {exc}")
            logger.warning("Redis cache %s on %s failed (%s); serving without the cache, next "
                           "attempt in %.1fs", operation, self.description, reason,
                           self._backoff_s)

    def _succeeded(self) -> None:
        if self._gate.close():
            logger.info("Redis cache on %s answers again; cache back in use", self.description)


# -- connecting -------------------------------------------------------------------------------------


def _connect(url: str, socket_timeout_s: float, client: RedisClient = "link") -> _Backend:
    """The backend for `url`, parsed once by redis_url.py whatever its scheme and client; the
    clients themselves come from redis_clients.py."""
    parsed = parse_redis_url(url)
    if parsed.kind == "standalone" and client == "link":
        return _LinkBackend(redis_clients.link(parsed, socket_timeout_s))
    return _RedisPyBackend(redis_clients.redis_py(parsed, socket_timeout_s))
