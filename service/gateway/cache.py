"""ResultCache: classification results in Redis, keyed by what determines them. Fails open.

INTERFACE STUB: being implemented (see the gateway issue, item 4). The contract the rest of the gateway
relies on is the signatures below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from service.gateway.metrics import GatewayMetrics

CacheState = Literal["disabled", "ok", "degraded"]


def cache_key(prefix: str, upstream: str, endpoint: str, model: str, item: Any) -> str:
    """`<prefix>:<sha256 hex>` of upstream, endpoint, model and the canonical JSON of the item."""
    raise NotImplementedError


class ResultCache:
    @classmethod
    def from_url(cls, url: str, *, prefix: str, socket_timeout_s: float, backoff_s: float,
                 metrics: GatewayMetrics) -> ResultCache:
        raise NotImplementedError

    def key(self, upstream: str, endpoint: str, model: str, item: Any) -> str:
        raise NotImplementedError

    @property
    def state(self) -> CacheState:
        raise NotImplementedError

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """One MGET. None (not an exception) when Redis is down, slow, or backed off."""
        raise NotImplementedError

    def schedule_set_many(self, entries: Sequence[tuple[str, bytes, int]]) -> None:
        """(key, value, ttl_s) written by one pipeline in a background task, off the response path."""
        raise NotImplementedError

    async def ping(self) -> bool:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError
