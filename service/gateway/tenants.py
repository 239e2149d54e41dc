"""Client keys with identities, kept in Redis and shared by every replica (issue 21).

A key has an id, a tenant, a name, the tasks it may call, its quotas and an optional expiry. Only
the SHA-256 of the secret is stored: the secrets are long and random (32 bytes from `secrets`), so
a fast hash is enough, and a lookup is one GET of `keyhash:<sha>`. The secret is returned once, at
creation (and at rotation); nothing else ever shows, logs or counts it.

Why a short local cache with an invalidation: a revoke or change must reach every replica within
1 s, and a lookup in Redis per request would cost the hot path a round trip. Each replica caches
a lookup for GATEWAY_KEY_CACHE_TTL_S (0.5 s by default) and subscribes to a Redis pub/sub channel
(`<prefix>:tenants:changes`) on which every admin write (update, revoke, rotate, a tenant's
quotas) publishes the key id or tenant it changed: each replica drops those entries as the
message arrives, milliseconds after the write. The TTL is the safety net for what pub/sub does
not guarantee (a message sent while a subscriber was reconnecting is lost): while a replica's
subscription is down (or silent past its PING), its entries live at most `CACHE_TTL_S` (0.5 s),
whatever the setting, and a new subscription starts from an empty cache, so a change is seen
within 1 s in every case. A larger GATEWAY_KEY_CACHE_TTL_S saves lookups and trusts the
subscription for the rest.

While Redis cannot be reached, the last answer each replica had for a key keeps serving (a key
that worked keeps working through an outage), and a key it never saw is refused: keys are Redis's
data, there is nothing else to ask. When Redis answers but refuses the gateway (a wrong password,
an ACL without the keys' commands, a key of the wrong type), that is a configuration error, not
an outage: serving the last answer would keep a revoked key working for as long as nobody
noticed, so the request gets a 503 that says to fix the setting, and the log says why (once per
`REPORT_EVERY_S`). Both are counted in `gateway_key_store_errors_total{kind}`.

Keys from GATEWAY_API_KEYS keep working as before: tenant `default`, no quota, all tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from service.gateway.redis_clients import RedisPy

log = logging.getLogger("service.gateway.tenants")


class KeyStoreRefused(Exception):
    """Redis answered a key lookup with an auth, ACL or type error: the request gets 503."""


def refused(exc: BaseException) -> bool:
    """Whether Redis answered and refused (a configuration error) rather than being away:
    a wrong password or missing AUTH (AuthenticationError, AuthorizationError: ConnectionError's
    subclasses in redis-py), an ACL without the command or key (NOPERM), a key of the wrong
    type. A cluster that is down or resharding (CLUSTERDOWN, TRYAGAIN) is an outage."""
    return isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError) or (
        isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"))

DEFAULT_TENANT = "default"
#: A secret is `cgw_` + 43 url-safe characters; anything much longer is not one of ours.
MAX_AUTHORIZATION_BYTES = 256
#: How long a key lookup is trusted without a working subscription (see the module docstring).
CACHE_TTL_S = 0.5
#: The subscriber PINGs its connection after this much silence and gives it up (falling back to
#: CACHE_TTL_S, then subscribing again) when nothing came back within 3 times as long.
PING_S = 1.0
RESUBSCRIBE_S = 0.5
SECRET_PREFIX = "cgw_"
#: A key store that keeps failing is logged at most this often per kind (every request fails
#: the same way, thousands a second).
REPORT_EVERY_S = 10.0
#: Visible ASCII: what GATEWAY_API_KEYS may hold, and more than a `cgw_` secret uses. A compiled
#: pattern rather than a loop over the bytes: 0.3 against 2-3 us per request.
_TOKEN = re.compile(rb"[\x21-\x7e]+")
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Quotas(BaseModel):
    """Token buckets: the capacity is the amount, refilled evenly over the period. Unset: no limit."""

    model_config = ConfigDict(extra="forbid")

    requests_per_second: int | None = Field(default=None, ge=1, le=1_000_000)
    items_per_minute: int | None = Field(default=None, ge=1, le=100_000_000)
    items_per_day: int | None = Field(default=None, ge=1, le=10_000_000_000)

    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_second, self.items_per_minute,
                                            self.items_per_day))


class KeyRecord(BaseModel):
    """What Redis holds for a key. `secret_sha256` and `old_sha256` never leave the gateway."""

    id: str
    tenant: str
    name: str
    tasks: list[str] | None = None
    quotas: Quotas = Field(default_factory=Quotas)
    expires_at: datetime | None = None
    created: datetime
    revoked: bool = False
    secret_sha256: str
    old_sha256: str | None = None  # a rotated-out secret, valid until old_valid_until
    old_valid_until: datetime | None = None

    def public(self, last_used: datetime | None) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "name": self.name, "tasks": self.tasks,
                "quotas": self.quotas.model_dump(), "expires_at": self.expires_at,
                "created": self.created, "last_used": last_used, "revoked": self.revoked}


class Identity(BaseModel):
    """Who a request is: what the hot path needs, without the hashes."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    tenant: str
    tasks: frozenset[str] | None = None
    quotas: Quotas = Field(default_factory=Quotas)
    expires_at: datetime | None = None

    def may_call(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


#: A GATEWAY_API_KEYS key, or anyone when no key is configured at all.
STATIC_IDENTITY = Identity(key_id="static", tenant=DEFAULT_TENANT)


def now() -> datetime:
    return datetime.now(UTC)


def digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of `Authorization: Bearer <token>`, or None for anything malformed or oversized
    (the caller answers the same 401 either way, echoing nothing)."""
    if header is None or len(header) > MAX_AUTHORIZATION_BYTES or header[:7].lower() != b"bearer ":
        return None
    token = header[7:].strip()
    if _TOKEN.fullmatch(token) is None:
        return None
    return token


class TenantStore:
    """Keys and tenant quotas in Redis under `<prefix>:tenants:`; lookups cached briefly."""

    def __init__(self, backend: RedisPy, prefix: str, *, timeout_s: float,
                 cache_ttl_s: float = CACHE_TTL_S, setting: str = "GATEWAY_REDIS_URL",
                 on_error: Callable[[str], None] | None = None) -> None:
        """`setting`: where this Redis is configured (named in errors); `on_error(kind)`: a
        lookup Redis did not answer, `outage` or `refused` (the metrics' counter)."""
        self.backend = backend
        self.setting = setting
        self._on_error = on_error
        self._reported: dict[str, float] = {}
        self.prefix = f"{prefix}:tenants"
        self.timeout_s = timeout_s
        self.cache_ttl_s = cache_ttl_s
        # sha256 -> (cached at, identity or None for "no such key"); stale entries serve outages
        self._cache: dict[str, tuple[float, Identity | None]] = {}
        self._shas: dict[str, set[str]] = {}  # key id -> its cached shas, for invalidations
        self._tenant_cache: dict[str, tuple[float, Quotas]] = {}
        self._last_used_written: dict[str, float] = {}
        self._writes: set[asyncio.Task[Any]] = set()
        #: True while this replica's subscription to the changes channel is known to work.
        self.subscribed = False
        self._listener: asyncio.Task[None] | None = None

    @property
    def channel(self) -> str:
        """Where admin writes say what they changed: `key:<id>` or `tenant:<name>`."""
        return self.rkey("changes")

    def _ttl(self) -> float:
        return self.cache_ttl_s if self.subscribed else min(self.cache_ttl_s, CACHE_TTL_S)

    # Redis keys ------------------------------------------------------------------------------
    def rkey(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def _call(self, method: str, *args: Any) -> Any:
        async with asyncio.timeout(self.timeout_s):
            return await getattr(self.backend.client, method)(*args)

    # Hot path --------------------------------------------------------------------------------
    async def authenticate(self, token: bytes) -> Identity | None:
        """The identity of a secret, or None (unknown, revoked, expired: the caller can't tell)."""
        sha = digest(token)
        clock = time.monotonic()
        cached = self._cache.get(sha)
        if cached is not None and clock - cached[0] < self._ttl():
            return _valid(cached[1])
        try:
            identity = await self._load_identity(sha)
        except (RedisError, OSError, TimeoutError) as exc:
            if refused(exc):
                self._report("refused", exc)
                raise KeyStoreRefused(
                    f"The gateway cannot check client keys: their Redis ({self.setting}) "
                    f"refused it ({type(exc).__name__}). An operator must fix that setting's "
                    "password or the Redis user's ACL; retrying will not help until then."
                ) from None
            # Redis is away: the last known answer (however old) rather than locking everyone out.
            self._report("outage", exc)
            return _valid(cached[1]) if cached is not None else None
        if len(self._cache) > 100_000:
            self._cache.clear()
            self._shas.clear()
        self._cache[sha] = (clock, identity)
        if identity is not None:
            self._shas.setdefault(identity.key_id, set()).add(sha)
        if identity is not None and _valid(identity) is not None:
            self._touch(identity.key_id, clock)
        return _valid(identity)

    def _report(self, kind: str, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(kind)
        clock = time.monotonic()
        if clock - self._reported.get(kind, -1e9) < REPORT_EVERY_S:
            return
        self._reported[kind] = clock
        # The exception's text, never the lookup's arguments (a key's hash is no secret, but
        # nothing of a key goes in a log); redis-py's messages name the error, not the key.
        reason = " ".join(str(exc).split())[:200]
        if kind == "refused":
            log.error("client keys: Redis (%s) refused the lookup (%s: %s); requests with a "
                      "stored key get 503 until the password or ACL is fixed", self.setting,
                      type(exc).__name__, reason)
        else:
            log.warning("client keys: Redis (%s) did not answer (%s: %s); serving each key's "
                        "last known identity, refusing keys this replica never saw",
                        self.setting, type(exc).__name__, reason)

    async def _load_identity(self, sha: str) -> Identity | None:
        key_id = await self._call("get", self.rkey("keyhash", sha))
        if key_id is None:
            return None
        record = await self.get(key_id.decode() if isinstance(key_id, bytes) else key_id)
        if record is None or record.revoked:
            return None
        in_grace = (record.old_sha256 == sha and record.old_valid_until is not None
                    and record.old_valid_until > now())
        if record.secret_sha256 != sha and not in_grace:
            return None
        return Identity(key_id=record.id, tenant=record.tenant,
                        tasks=None if record.tasks is None else frozenset(record.tasks),
                        quotas=record.quotas, expires_at=record.expires_at)

    def _touch(self, key_id: str, clock: float) -> None:
        """`last_used`, written at most every 10 s per key and replica, off the request's path."""
        if clock - self._last_used_written.get(key_id, -1e9) < 10:
            return
        self._last_used_written[key_id] = clock
        task = asyncio.get_running_loop().create_task(
            self._call("set", self.rkey("last_used", key_id), now().isoformat()))
        self._writes.add(task)  # the loop keeps only a weak reference to a task

        def done(finished: asyncio.Task[Any]) -> None:
            self._writes.discard(finished)
            if not finished.cancelled():
                finished.exception()  # retrieved: a lost `last_used` is not worth a log line

        task.add_done_callback(done)

    def cached_tenant_quotas(self, tenant: str) -> Quotas | None:
        """A tenant's quotas while the local cache holds them fresh, without a coroutine: the
        hot path's common case."""
        cached = self._tenant_cache.get(tenant)
        if cached is not None and time.monotonic() - cached[0] < self._ttl():
            return cached[1]
        return None

    async def tenant_quotas(self, tenant: str) -> Quotas:
        """A tenant's own quotas (cached like keys; the last known ones during an outage)."""
        clock = time.monotonic()
        cached = self._tenant_cache.get(tenant)
        if cached is not None and clock - cached[0] < self._ttl():
            return cached[1]
        try:
            raw = await self._call("get", self.rkey("tenant", tenant))
        except (RedisError, OSError, TimeoutError):
            return cached[1] if cached is not None else Quotas()
        quotas = Quotas() if raw is None else Quotas.model_validate(orjson.loads(raw))
        self._tenant_cache[tenant] = (clock, quotas)
        return quotas

    # Invalidation ----------------------------------------------------------------------------
    def invalidate(self, change: str) -> None:
        """Drop what a change names: `key:<id>` (every secret of that key this replica looked
        up), `tenant:<name>` (its quotas)."""
        kind, _, name = change.partition(":")
        if kind == "key":
            for sha in self._shas.pop(name, ()):
                self._cache.pop(sha, None)
        elif kind == "tenant":
            self._tenant_cache.pop(name, None)

    def _forget_all(self) -> None:
        self._cache.clear()
        self._shas.clear()
        self._tenant_cache.clear()

    def listen(self) -> None:
        """Start the subscriber (the app's lifespan; `aclose` stops it)."""
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        lost_logged = False
        while True:
            pubsub = self.backend.client.pubsub()
            try:
                async with asyncio.timeout(max(self.timeout_s, 1.0)):
                    await pubsub.subscribe(self.channel)
                heard = pinged = loop.time()
                while True:
                    message = await pubsub.get_message(timeout=PING_S)
                    now_ = loop.time()
                    if message is not None:
                        heard = now_
                        if message["type"] == "subscribe":
                            # Changes made before now may have been missed: start afresh.
                            self._forget_all()
                            self.subscribed = True
                            if lost_logged:
                                log.info("key changes: subscribed again to %s", self.channel)
                                lost_logged = False
                        elif message["type"] == "message":
                            data = message["data"]
                            self.invalidate(data.decode() if isinstance(data, bytes) else data)
                    elif now_ - heard > 3 * PING_S:
                        raise TimeoutError(f"no answer to PING within {3 * PING_S:g}s")
                    if now_ - pinged >= PING_S:
                        pinged = now_
                        await pubsub.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: fall back to the TTL, then subscribe again
                self.subscribed = False
                if not lost_logged:
                    lost_logged = True
                    log.warning("key changes: subscription to %s lost (%s); key lookups are "
                                "cached for at most %gs until it is back", self.channel,
                                type(exc).__name__, min(self.cache_ttl_s, CACHE_TTL_S))
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_S)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def _publish(self, change: str) -> None:
        """Tell every replica what changed, after the write. Best effort: a replica that misses
        the message still drops the entry after its TTL (and a Redis that took the write but
        not the PUBLISH is rare enough to log)."""
        try:
            await self._call("publish", self.channel, change)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("key changes: could not publish %s (%s); replicas see it within %gs",
                        change.partition(":")[0], type(exc).__name__, CACHE_TTL_S)

    # Admin -----------------------------------------------------------------------------------
    async def create(self, tenant: str, name: str, tasks: Sequence[str] | None, quotas: Quotas,
                     expires_at: datetime | None) -> tuple[KeyRecord, str]:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(id=uuid.uuid4().hex[:16], tenant=tenant, name=name,
                           tasks=None if tasks is None else list(tasks), quotas=quotas,
                           expires_at=expires_at, created=now(),
                           secret_sha256=digest(secret.encode()))
        pipe = self.backend.client.pipeline(transaction=False)
        pipe.set(self.rkey("keyhash", record.secret_sha256), record.id)
        pipe.set(self.rkey("key", record.id), record.model_dump_json())
        pipe.sadd(self.rkey("ids"), record.id)
        async with asyncio.timeout(self.timeout_s):
            await pipe.execute()
        return record, secret

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await self._call("get", self.rkey("key", key_id))
        return None if raw is None else KeyRecord.model_validate_json(raw)

    async def last_used(self, key_id: str) -> datetime | None:
        raw = await self._call("get", self.rkey("last_used", key_id))
        return None if raw is None else datetime.fromisoformat(
            raw.decode() if isinstance(raw, bytes) else raw)

    async def list(self, tenant: str | None) -> list[KeyRecord]:
        ids = sorted(i.decode() if isinstance(i, bytes) else i
                     for i in await self._call("smembers", self.rkey("ids")))
        if not ids:
            return []
        # One GET each in a pipeline rather than MGET: in a Redis Cluster the keys are in many
        # slots, and redis-py's cluster pipeline routes each to its node.
        pipe = self.backend.client.pipeline(transaction=False)
        for key_id in ids:
            pipe.get(self.rkey("key", key_id))
        async with asyncio.timeout(max(self.timeout_s, 2.0)):
            raws = await pipe.execute()
        records = [KeyRecord.model_validate_json(raw) for raw in raws if raw is not None]
        return [r for r in records if tenant is None or r.tenant == tenant]

    async def save(self, record: KeyRecord) -> None:
        await self._call("set", self.rkey("key", record.id), record.model_dump_json())
        await self._publish(f"key:{record.id}")

    async def rotate(self, record: KeyRecord, grace_s: int) -> tuple[KeyRecord, str]:
        """A new secret under the same id; the old one keeps working for `grace_s` seconds."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        old = record.secret_sha256
        updated = record.model_copy(update={
            "secret_sha256": digest(secret.encode()),
            "old_sha256": old if grace_s > 0 else None,
            "old_valid_until": (datetime.fromtimestamp(time.time() + grace_s, UTC)
                                if grace_s > 0 else None)})
        pipe = self.backend.client.pipeline(transaction=False)
        pipe.set(self.rkey("keyhash", updated.secret_sha256), record.id)
        if grace_s > 0:
            pipe.expire(self.rkey("keyhash", old), grace_s + 60)
        else:
            pipe.delete(self.rkey("keyhash", old))
        pipe.set(self.rkey("key", record.id), updated.model_dump_json())
        async with asyncio.timeout(self.timeout_s):
            await pipe.execute()
        await self._publish(f"key:{record.id}")
        return updated, secret

    async def put_tenant(self, tenant: str, quotas: Quotas) -> None:
        await self._call("set", self.rkey("tenant", tenant), quotas.model_dump_json())
        await self._publish(f"tenant:{tenant}")

    async def get_tenant(self, tenant: str) -> Quotas:
        raw = await self._call("get", self.rkey("tenant", tenant))
        return Quotas() if raw is None else Quotas.model_validate(orjson.loads(raw))


#: What usage counts per key and day. `4xx` is every client error but 429, which has its own.
USAGE_FIELDS = ("requests", "items", "cache_hits", "4xx", "5xx", "429")
USAGE_TTL_S = 400 * 86_400


class UsageRecorder:
    """Per key and per UTC day, in Redis hashes `usage:<id>:<YYYY-MM-DD>`.

    Counted in memory and flushed every `flush_s` in one pipeline, so a request costs a dict
    update, not a Redis write; a replica that dies loses at most its last second. A flush that
    fails keeps its counts for the next one (bounded: usage is a report, not a bill)."""

    def __init__(self, store: TenantStore, flush_s: float = 1.0) -> None:
        self.store = store
        self.flush_s = flush_s
        self._pending: dict[tuple[str, str], dict[str, int]] = {}
        self._task: asyncio.Task[None] | None = None

    def record(self, key_id: str, status: int, items: int, hits: int) -> None:
        counts = self._pending.setdefault((key_id, now().date().isoformat()), {})
        counts["requests"] = counts.get("requests", 0) + 1
        if items:
            counts["items"] = counts.get("items", 0) + items
        if hits:
            counts["cache_hits"] = counts.get("cache_hits", 0) + hits
        kind = "429" if status == 429 else "4xx" if 400 <= status < 500 else (
            "5xx" if status >= 500 else None)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self.store.backend.client.pipeline(transaction=False)
        for (key_id, day), counts in pending.items():
            name = self.store.rkey("usage", key_id, day)
            for field_name, amount in counts.items():
                pipe.hincrby(name, field_name, amount)
            pipe.expire(name, USAGE_TTL_S)
            index = self.store.rkey("usage-days", key_id)
            pipe.zadd(index, {day: date.fromisoformat(day).toordinal()})
            pipe.zremrangebyscore(index, "-inf", now().date().toordinal() - USAGE_TTL_S // 86_400)
            pipe.expire(index, USAGE_TTL_S)
        try:
            async with asyncio.timeout(max(self.store.timeout_s, 1.0)):
                await pipe.execute()
        except (RedisError, OSError, TimeoutError):
            if len(self._pending) < 10_000:  # put back, to be added to the next flush
                for where, counts in pending.items():
                    mine = self._pending.setdefault(where, {})
                    for field_name, amount in counts.items():
                        mine[field_name] = mine.get(field_name, 0) + amount

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()

    async def report(self, key_ids: Sequence[str], since: date) -> dict[str, dict[str, dict[str,
                                                                                          int]]]:
        """key id -> day -> counts, for the days since `since` that have any: each key's days are
        indexed (`usage-days:<id>`, a sorted set), so a long range costs only the days used."""
        async with asyncio.timeout(max(self.store.timeout_s, 5.0)):
            pipe = self.store.backend.client.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.zrangebyscore(self.store.rkey("usage-days", key_id), since.toordinal(), "+inf")
            found = [(key_id, d.decode() if isinstance(d, bytes) else d)
                     for key_id, days in zip(key_ids, await pipe.execute(), strict=True)
                     for d in days]
            pipe = self.store.backend.client.pipeline(transaction=False)
            for key_id, day in found:
                pipe.hgetall(self.store.rkey("usage", key_id, day))
            replies = await pipe.execute() if found else []
        out: dict[str, dict[str, dict[str, int]]] = {key_id: {} for key_id in key_ids}
        for (key_id, day), raw in zip(found, replies, strict=True):
            if raw:
                out[key_id][day] = {f: int(raw.get(f.encode(), raw.get(f, 0)))
                                    for f in USAGE_FIELDS}
        return out


def _valid(identity: Identity | None) -> Identity | None:
    if identity is None or (identity.expires_at is not None and identity.expires_at <= now()):
        return None
    return identity


class Authenticator:
    """The front door's question, "who is this?", over GATEWAY_API_KEYS, GATEWAY_ADMIN_KEY and the
    key store. Authentication is on when either kind of key is configured; with neither, everyone
    is the `default` tenant, as before keys had identities."""

    def __init__(self, static_keys: Sequence[str], admin_key: str,
                 store: TenantStore | None = None) -> None:
        self._static = [key.encode() for key in static_keys]
        self._admin = admin_key.encode()
        self.store = store
        self.usage: UsageRecorder | None = None
        #: Whether any key is configured (fixed for the process's life).
        self.enabled = bool(self._static or self._admin)

    def is_admin(self, header: bytes | None) -> bool:
        token = bearer_token(header)
        return bool(self._admin) and token is not None and hmac.compare_digest(token, self._admin)

    async def identify(self, header: bytes | None) -> Identity | None:
        if not self.enabled:
            return STATIC_IDENTITY
        token = bearer_token(header)
        if token is None:
            return None
        if self._admin and hmac.compare_digest(token, self._admin):
            return None  # the admin key is never a client key
        ok = False
        for key in self._static:  # no early exit: timing must not reveal which key matched
            ok |= hmac.compare_digest(token, key)
        if ok:
            return STATIC_IDENTITY
        if self.store is None or not token.startswith(SECRET_PREFIX.encode()):
            return None
        return await self.store.authenticate(token)
