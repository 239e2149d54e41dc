"""Quotas every replica enforces together: GCRA buckets in Redis, charged by one Lua script.

Why one script over all of a request's buckets: the key's and the tenant's buckets must be charged
together or not at all, and checked and charged in the same step, so that three replicas can never
each see room and each let a request through (LiteLLM's and Kong's failure: per-replica counts, or
read-then-write). A request is charged its number of items up front, since its cost is known before
it runs; one that does not fit in every bucket is charged nothing.

GCRA is the token bucket written as one timestamp per bucket (the "theoretical arrival time"): the
capacity is the quota's amount, refilled evenly over its period. The script reads Redis's clock
(`TIME`), so replicas with skewed clocks still share one timeline.

When Redis cannot answer, GATEWAY_QUOTA_ON_REDIS_ERROR decides (allow, the default, or deny); it is
counted (`gateway_quota_redis_errors`) and logged once per episode. There is never a per-replica
count to fall back on: it would multiply the quota by the number of replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from redis.exceptions import RedisError

from service.gateway.metrics import GatewayMetrics
from service.gateway.redis_clients import RedisPy
from service.gateway.redis_link import RedisLink
from service.gateway.tenants import Identity, Quotas

log = logging.getLogger("service.gateway.quotas")

OnRedisError = Literal["allow", "deny"]

#: quota name -> (period in ms, whether it counts items (else requests))
PERIODS: dict[str, tuple[int, bool]] = {
    "requests_per_second": (1_000, False),
    "items_per_minute": (60_000, True),
    "items_per_day": (86_400_000, True),
}

# replicate_commands: Redis before 5 replicates a script by re-running it, so it may not write
# after TIME (a no-op from Redis 5, where effects are replicated anyway).
# KEYS: one per bucket. ARGV: per bucket, cost, emission interval (ms per unit), capacity (ms).
# Returns {1, 0, 0, remaining_1, reset_ms_1, ...} when every bucket has room (all charged), or
# {0, i, wait_ms} naming the first bucket that has not (none charged; wait -1: never fits).
_GCRA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local new = {}
for i = 1, #KEYS do
  local cost = tonumber(ARGV[3 * i - 2])
  local interval = tonumber(ARGV[3 * i - 1])
  local tau = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local nt = tat + cost * interval
  if nt - now > tau then
    if cost * interval > tau then return {0, i, -1} end
    return {0, i, math.ceil(nt - now - tau)}
  end
  new[i] = nt
end
local out = {1, 0, 0}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 1])
  local tau = tonumber(ARGV[3 * i])
  local ahead = new[i] - now
  redis.call('SET', KEYS[i], string.format('%.3f', new[i]), 'PX', math.ceil(ahead) + 1000)
  out[#out + 1] = math.floor((tau - ahead) / interval)
  out[#out + 1] = math.ceil(ahead)
end
return out
"""


# GATEWAY_QUOTA_CHARGE_CACHE_HITS=false: give back what cache hits were charged. KEYS: the items
# buckets; ARGV: per bucket, amount given back, emission interval (ms per unit). Never below now.
_REFUND = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  local nt = tat - tonumber(ARGV[2 * i - 1]) * tonumber(ARGV[2 * i])
  if nt > now then
    redis.call('SET', KEYS[i], string.format('%.3f', nt), 'PX', math.ceil(nt - now) + 1000)
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
"""


@dataclass(frozen=True)
class Bucket:
    policy: str  # "key.items_per_minute": which quota, for headers, messages and metrics
    redis_key: str
    amount: int
    period_ms: int
    cost: int


@dataclass
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""
    quota: str = ""  # the quota that ran out (or "redis_error")


class QuotaChecker:
    def __init__(self, backend: RedisPy, prefix: str, metrics: GatewayMetrics, *,
                 on_redis_error: OnRedisError, timeout_s: float,
                 link: RedisLink | None = None) -> None:
        """`link`: the pipelined connection for a standalone Redis (GATEWAY_REDIS_CLIENT=link):
        the check runs on every request, and redis-py's machinery costs about as much as the
        round trip itself."""
        self.backend = backend
        self.link = link
        self._sha = hashlib.sha1(_GCRA.encode()).hexdigest()
        self.prefix = f"{prefix}:quota"
        self.metrics = metrics
        self.on_redis_error = on_redis_error
        self.timeout_s = timeout_s
        self._script = backend.client.register_script(_GCRA)
        self._refund = backend.client.register_script(_REFUND)
        self._in_episode = False

    def buckets(self, identity: Identity, tenant_quotas: Quotas, items: int) -> list[Bucket]:
        # One hash tag per tenant: a request's buckets share a Redis Cluster slot, as one script
        # over several keys requires.
        tag = f"{self.prefix}:{{{identity.tenant}}}"
        out = []
        for scope, owner, quotas in (("key", f"key:{identity.key_id}", identity.quotas),
                                     ("tenant", "tenant", tenant_quotas)):
            for name, (period_ms, counts_items) in PERIODS.items():
                amount = getattr(quotas, name)
                if amount is not None:
                    out.append(Bucket(f"{scope}.{name}", f"{tag}:{owner}:{name}", amount,
                                      period_ms, items if counts_items else 1))
        return out

    async def charge(self, buckets: list[Bucket], tenant: str) -> Decision:
        if not buckets:
            return Decision(True)
        args: list[float] = []
        for b in buckets:
            args += [b.cost, b.period_ms / b.amount, b.period_ms]
        keys = [b.redis_key for b in buckets]
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.link is not None:
                    reply = await self._on_link(keys, args)
                else:
                    reply = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            return self._redis_error(exc, tenant)
        if self._in_episode:
            self._in_episode = False
            log.warning("quota checks reach Redis again")
        policy = _policy_header(buckets)
        if reply[0] == 1:
            parts = [f'"{b.policy}";r={max(0, int(reply[3 + 2 * i]))};'
                     f't={math.ceil(int(reply[4 + 2 * i]) / 1000)}'
                     for i, b in enumerate(buckets)]
            return Decision(True, {"RateLimit-Policy": policy, "RateLimit": ", ".join(parts)})
        bucket = buckets[int(reply[1]) - 1]
        wait_ms = int(reply[2])
        self.metrics.child(self.metrics.quota_rejections, tenant, bucket.policy).inc()
        unit = "items" if PERIODS[bucket.policy.split(".")[1]][1] else "requests"
        if wait_ms < 0:
            message = (f"Quota {bucket.policy} ({bucket.amount}) is smaller than this request's "
                       f"{bucket.cost} {unit}: split it into smaller requests.")
            retry_s = math.ceil(bucket.period_ms / 1000)
        else:
            retry_s = max(1, math.ceil(wait_ms / 1000))
            message = (f"Quota {bucket.policy} ({bucket.amount} {unit} per "
                       f"{_period(bucket.period_ms)}) is used up; retry in {retry_s} s.")
        return Decision(False, {"Retry-After": str(retry_s), "RateLimit-Policy": policy,
                                "RateLimit": f'"{bucket.policy}";r=0;t={retry_s}'},
                        message, bucket.policy)

    async def _on_link(self, keys: list[str], args: list[float]) -> list[Any]:
        """EVALSHA, and EVAL once when Redis does not know the script yet (a restart, a new
        Redis behind the same address)."""
        (reply,) = await self.link.execute(  # type: ignore[union-attr]
            ("EVALSHA", self._sha, len(keys), *keys, *args))
        if isinstance(reply, Exception) and "NOSCRIPT" in str(reply):
            (reply,) = await self.link.execute(  # type: ignore[union-attr]
                ("EVAL", _GCRA, len(keys), *keys, *args))
        if isinstance(reply, Exception):
            raise RedisError(str(reply))
        return cast(list[Any], reply)

    async def refund(self, buckets: list[Bucket], items: int) -> None:
        """Give `items` back to the items buckets charged for them (cache hits, when they are not
        charged): the request was admitted on its full size, since hits are known only after the
        check. Best effort: a refund Redis does not take is a charge that stays."""
        give_back = [b for b in buckets if PERIODS[b.policy.split(".")[1]][1]]
        if not give_back or items <= 0:
            return
        args: list[float] = []
        for b in give_back:
            args += [items, b.period_ms / b.amount]
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._refund(keys=[b.redis_key for b in give_back], args=args)
        except (RedisError, OSError, TimeoutError):
            pass

    def _redis_error(self, exc: BaseException, tenant: str) -> Decision:
        decision = self.on_redis_error
        self.metrics.child(self.metrics.quota_redis_errors, decision).inc()
        if not self._in_episode:
            self._in_episode = True
            log.warning("quota check failed (%s: Redis unreachable); GATEWAY_QUOTA_ON_REDIS_ERROR="
                        "%s: requests are %s until Redis answers", type(exc).__name__, decision,
                        "allowed" if decision == "allow" else "refused")
        if decision == "allow":
            return Decision(True)
        self.metrics.child(self.metrics.quota_rejections, tenant, "redis_error").inc()
        return Decision(False, {"Retry-After": "1"},
                        "Quotas cannot be checked right now (Redis unreachable) and "
                        "GATEWAY_QUOTA_ON_REDIS_ERROR=deny; retry in 1 s.", "redis_error")


def _policy_header(buckets: list[Bucket]) -> str:
    return ", ".join(f'"{b.policy}";q={b.amount};w={b.period_ms // 1000}' for b in buckets)


def _period(period_ms: int) -> str:
    return {1_000: "second", 60_000: "minute", 86_400_000: "day"}[period_ms]
