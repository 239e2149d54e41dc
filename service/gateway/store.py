"""Where the gateway keeps what outlives a request and is shared by its replicas: the shadow
comparisons' confusion counts (and, next, feedback and the review queue). Redis when one is
configured (`GATEWAY_FEEDBACK_REDIS_URL`, else the cache's `GATEWAY_REDIS_URL`), through redis-py
(the client comes from redis_clients.py), so every URL scheme the cache takes works here; else this process's memory, said as such
(`shared: false` in `GET /tasks/{name}/shadow`).

Keys: `<prefix>:shadow:{<task>}:<digest of the two models>:<target>`, a hash of
`<task model's label>\\x1f<shadow's label>` -> count, and `...:targets`, the set of targets seen.
The braces keep one task's keys in one Redis Cluster slot; the digest starts a fresh table
whenever either model changes, so figures always describe the pair in the tasks file.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Protocol

from service.gateway.redis_clients import RedisPy

log = logging.getLogger("service.gateway.store")

Pair = tuple[str, str, str]  # target, task model's top label, shadow's top label
Confusion = dict[str, Counter[tuple[str, str]]]  # target -> (ours, theirs) -> count
_SEP = "\x1f"


class ShadowStore(Protocol):
    shared: bool

    async def record(self, task: str, model: str, shadow: str, pairs: list[Pair]) -> None: ...

    async def read(self, task: str, model: str, shadow: str) -> Confusion: ...

    async def aclose(self) -> None: ...


def _base(prefix: str, task: str, model: str, shadow: str) -> str:
    digest = hashlib.sha256(f"{model}\n{shadow}".encode()).hexdigest()[:16]
    return f"{prefix}:shadow:{{{task}}}:{digest}"


class MemoryShadowStore:
    """One process's counts: for a gateway without Redis (and for tests)."""

    shared = False

    def __init__(self) -> None:
        self._tables: dict[tuple[str, str, str], Confusion] = {}

    async def record(self, task: str, model: str, shadow: str, pairs: list[Pair]) -> None:
        table = self._tables.setdefault((task, model, shadow), {})
        for target, ours, theirs in pairs:
            table.setdefault(target, Counter())[(ours, theirs)] += 1

    async def read(self, task: str, model: str, shadow: str) -> Confusion:
        return {t: Counter(c) for t, c in self._tables.get((task, model, shadow), {}).items()}

    async def aclose(self) -> None:
        pass


class RedisShadowStore:
    """Counts in Redis (see the module docstring); a write that fails is logged and lost, like
    the comparison it counted: the caller's answer never depends on it."""

    shared = True

    def __init__(self, backend: RedisPy, prefix: str) -> None:
        self._backend = backend
        self._client = backend.client
        self._prefix = prefix

    async def record(self, task: str, model: str, shadow: str, pairs: list[Pair]) -> None:
        base = _base(self._prefix, task, model, shadow)
        counts = Counter((target, f"{ours}{_SEP}{theirs}") for target, ours, theirs in pairs)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.sadd(f"{base}:targets", *{target for target, _ in counts})
            for (target, field), n in counts.items():
                pipe.hincrby(f"{base}:{target}", field, n)
            await pipe.execute()
        except Exception as exc:  # Redis down: the comparison is lost, nothing else
            log.warning("shadow counts for task %s not saved (%s: %s)", task,
                        type(exc).__name__, exc)

    async def read(self, task: str, model: str, shadow: str) -> Confusion:
        base = _base(self._prefix, task, model, shadow)
        targets = sorted(_text(t) for t in await self._client.smembers(f"{base}:targets"))
        out: Confusion = {}
        for target in targets:
            table: Counter[tuple[str, str]] = Counter()
            for field, n in (await self._client.hgetall(f"{base}:{target}")).items():
                ours, _, theirs = _text(field).partition(_SEP)
                table[(ours, theirs)] = int(n)
            out[target] = table
        return out

    async def aclose(self) -> None:
        await self._backend.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def shadow_store(backend: RedisPy | None, prefix: str) -> ShadowStore:
    return MemoryShadowStore() if backend is None else RedisShadowStore(backend, prefix)
