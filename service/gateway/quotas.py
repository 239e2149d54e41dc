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
from typing import Any, Literal

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

# One Redis key per owner (the key, the tenant) holds that owner's three buckets, one theoretical
# arrival time per quota in PERIODS order ("tat,tat,tat", 0 for one never charged): a request's
# charge is then one GET and one SET per owner, not per bucket. Measured in Redis (INFO
# commandstats, Redis 7.0, the project's loaded 2-core machine): 74 us per call with a key per
# bucket over six buckets, of which each bucket's GET, SET PX and format cost about 12 us; see
# docs/performance.md for the figures after.
#
# replicate_commands: Redis before 5 replicates a script by re-running it, so it may not write
# after TIME (a no-op from Redis 5, where effects are replicated anyway).
# KEYS: the owners' keys. ARGV: per bucket, owner (index into KEYS), slot (1-3), cost, emission
# interval (ms per unit), capacity (ms).
# Returns {1, 0, 0, remaining_1, reset_ms_1, ...} when every bucket has room (all charged), or
# {0, i, wait_ms} naming the first bucket that has not (none charged; wait -1: never fits).
_GCRA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tats = {}
for k = 1, #KEYS do
  local v = redis.call('GET', KEYS[k])
  local a, b, c
  if v then a, b, c = string.match(v, '^([^,]*),([^,]*),([^,]*)$') end
  tats[k] = {tonumber(a) or 0, tonumber(b) or 0, tonumber(c) or 0}
end
local out = {1, 0, 0}
local longest = {}
for i = 1, #ARGV / 5 do
  local k = tonumber(ARGV[5 * i - 4])
  local s = tonumber(ARGV[5 * i - 3])
  local cost = tonumber(ARGV[5 * i - 2])
  local interval = tonumber(ARGV[5 * i - 1])
  local tau = tonumber(ARGV[5 * i])
  local tat = tats[k][s]
  if tat < now then tat = now end
  local nt = tat + cost * interval
  if nt - now > tau then
    if cost * interval > tau then return {0, i, -1} end
    return {0, i, math.ceil(nt - now - tau)}
  end
  tats[k][s] = nt
  local ahead = nt - now
  if ahead > (longest[k] or 0) then longest[k] = ahead end
  out[#out + 1] = math.floor((tau - ahead) / interval)
  out[#out + 1] = math.ceil(ahead)
end
for k = 1, #KEYS do
  local v = tats[k]
  redis.call('SET', KEYS[k], string.format('%.3f,%.3f,%.3f', v[1], v[2], v[3]),
             'PX', math.ceil(longest[k] or 0) + 1000)
end
return out
"""


# GATEWAY_QUOTA_CHARGE_CACHE_HITS=false: give back what cache hits were charged. KEYS: the owners'
# keys; ARGV: per items bucket, owner, slot, amount given back, emission interval (ms per unit).
# Never below now; the key keeps its expiry (set for the larger charge).
_REFUND = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tats = {}
for k = 1, #KEYS do
  local v = redis.call('GET', KEYS[k])
  if v then
    local a, b, c = string.match(v, '^([^,]*),([^,]*),([^,]*)$')
    tats[k] = {tonumber(a) or 0, tonumber(b) or 0, tonumber(c) or 0}
  end
end
for i = 1, #ARGV / 4 do
  local k = tonumber(ARGV[4 * i - 3])
  local s = tonumber(ARGV[4 * i - 2])
  if tats[k] then
    local nt = tats[k][s] - tonumber(ARGV[4 * i - 1]) * tonumber(ARGV[4 * i])
    if nt < now then nt = 0 end
    tats[k][s] = nt
  end
end
for k = 1, #KEYS do
  local v = tats[k]
  local ttl = redis.call('PTTL', KEYS[k])
  if v and ttl > 0 then
    redis.call('SET', KEYS[k], string.format('%.3f,%.3f,%.3f', v[1], v[2], v[3]), 'PX', ttl)
  end
end
return 1
"""


@dataclass(frozen=True)
class Bucket:
    policy: str  # "key.items_per_minute": which quota, for headers, messages and metrics
    redis_key: str  # its owner's key (the key's or the tenant's), shared with its other buckets
    slot: int  # its place in the owner's value, 1-3 (PERIODS order)
    amount: int
    period_ms: int
    counts_items: bool


@dataclass
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    message: str = ""
    quota: str = ""  # the quota that ran out (or "redis_error")


ALLOWED = Decision(True)


class _Plan:
    """What a key's buckets look like, worked out once per identity and tenant quotas rather
    than per request: the Redis keys, each bucket's emission interval and capacity, the
    EVALSHA command in RESP with holes for the request's cost, and the RateLimit-Policy
    header. A request adds only its cost (packing the 30-odd arguments per request cost more
    than the rest of the check's Python: 12-29 us against under 1 us for the template)."""

    __slots__ = ("buckets", "identity", "items_at", "keys", "policy", "remaining", "segments",
                 "static_args", "tenant_quotas")

    def __init__(self, identity: Identity, tenant_quotas: Quotas, buckets: list[Bucket],
                 sha: str) -> None:
        self.identity = identity  # kept to tell whether the plan is still this key's
        self.tenant_quotas = tenant_quotas
        self.buckets = buckets
        self.keys = list(dict.fromkeys(b.redis_key for b in buckets))
        # ARGV per bucket: owner, slot, cost, emission interval (ms per unit), capacity (ms); the
        # costs are filled in per request at the positions in `items_at` (items) or left at 1.
        self.static_args: list[float] = []
        self.items_at: list[int] = []
        for b in buckets:
            if b.counts_items:
                self.items_at.append(len(self.static_args) + 2)
            self.static_args += [self.keys.index(b.redis_key) + 1, b.slot, 1,
                                 b.period_ms / b.amount, b.period_ms]
        # The command as RESP segments around the items costs: "*N", then "$len" + arg each.
        head: list[Any] = ["EVALSHA", sha, len(self.keys), *self.keys]
        args: list[bytes] = [_arg(a) for a in (*head, *self.static_args)]
        self.segments: list[bytes] = []
        current = b"*%d\r\n" % len(args)
        holes = {len(head) + at for at in self.items_at}
        for index, arg in enumerate(args):
            if index in holes:
                self.segments.append(current)
                current = b""
            else:
                current += b"$%d\r\n%s\r\n" % (len(arg), arg)
        self.segments.append(current)
        self.policy = ", ".join(f'"{b.policy}";q={b.amount};w={b.period_ms // 1000}'
                                for b in buckets)
        self.remaining = [f'"{b.policy}";r=' for b in buckets]  # RateLimit's parts

    def args(self, items: int) -> list[float]:
        args = self.static_args.copy()
        for at in self.items_at:
            args[at] = items
        return args

    def packed(self, items: int) -> bytes:
        """The EVALSHA for a request of `items` items, in RESP."""
        cost = b"%d" % items
        return (b"$%d\r\n%s\r\n" % (len(cost), cost)).join(self.segments)


def _arg(value: Any) -> bytes:
    """An argument as hiredis.pack_command would send it."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode()


class Charge:
    """One request's charge, sent by `QuotaChecker.start` and judged by `decision()`.

    Split in two so that the charge can share a Redis write with the cache lookup that follows
    it (redis_link.RedisLink.submit): the request's path awaits the decision before anything
    reaches an upstream and before the answer counts anywhere, but not before its lookup goes
    out. `decision()` may be awaited any number of times, also concurrently (a canary's two
    groups): the script runs once and its reply is judged once."""

    __slots__ = ("_checker", "_decision", "_items", "_plan", "_reply", "_tenant")

    def __init__(self, checker: QuotaChecker | None, plan: _Plan | None, items: int, tenant: str,
                 reply: asyncio.Future[list[Any]] | None, decision: Decision | None = None
                 ) -> None:
        self._checker = checker
        self._plan = plan
        self._items = items
        self._tenant = tenant
        self._reply = reply
        self._decision = decision
        if reply is not None:  # a request that fails before its decision must not log "never
            reply.add_done_callback(_retrieve)  # retrieved" for a failed connection

    @property
    def tenant(self) -> str:
        return self._tenant

    @property
    def buckets(self) -> list[Bucket]:
        """The buckets this request was charged (for a refund of its cache hits)."""
        return [] if self._plan is None else self._plan.buckets

    async def decision(self) -> Decision:
        if self._decision is not None:
            return self._decision
        checker, plan = self._checker, self._plan
        assert checker is not None and plan is not None
        if self._reply is None:  # redis-py: the script runs now, once for every awaiter
            self._reply = asyncio.ensure_future(checker.run_script(plan, self._items))
        try:
            (reply,) = await self._reply
        except (RedisError, OSError, TimeoutError) as exc:
            if self._decision is None:
                self._decision = checker.redis_error(exc, self._tenant)
            return self._decision
        if self._decision is None:
            self._decision = await checker.judge(plan, self._items, self._tenant, reply)
        return self._decision


class QuotaChecker:
    def __init__(self, backend: RedisPy, prefix: str, metrics: GatewayMetrics, *,
                 on_redis_error: OnRedisError, timeout_s: float,
                 link: RedisLink | None = None) -> None:
        """`link`: the pipelined connection for a standalone Redis (GATEWAY_REDIS_CLIENT=link):
        the check runs on every request, and redis-py's machinery costs about as much as the
        round trip itself. The app hands over the cache's own link when keys live in the
        cache's Redis, so that a charge and the lookup after it share one write and one round
        trip (bench/quota.py: 0.24 ms added to a cache hit as two round trips)."""
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
        self._plans: dict[str, _Plan] = {}

    def buckets(self, identity: Identity, tenant_quotas: Quotas) -> list[Bucket]:
        """Every bucket of the key and of its tenant that has a quota set."""
        # One hash tag per tenant: a request's buckets share a Redis Cluster slot, as one script
        # over several keys requires.
        tag = f"{self.prefix}:{{{identity.tenant}}}"
        out = []
        for scope, owner, quotas in (("key", f"key:{identity.key_id}", identity.quotas),
                                     ("tenant", "tenant", tenant_quotas)):
            for slot, (name, (period_ms, counts_items)) in enumerate(PERIODS.items(), start=1):
                amount = getattr(quotas, name)
                if amount is not None:
                    out.append(Bucket(f"{scope}.{name}", f"{tag}:{owner}", slot, amount,
                                      period_ms, counts_items))
        return out

    def _plan(self, identity: Identity, tenant_quotas: Quotas) -> _Plan:
        plan = self._plans.get(identity.key_id)
        if plan is None or plan.identity is not identity or plan.tenant_quotas is not tenant_quotas:
            if len(self._plans) > 100_000:
                self._plans.clear()
            plan = self._plans[identity.key_id] = _Plan(
                identity, tenant_quotas, self.buckets(identity, tenant_quotas), self._sha)
        return plan

    def start(self, identity: Identity, tenant_quotas: Quotas, items: int) -> Charge:
        """Charge `items` items to every bucket of the key and its tenant: sent now over the
        link (in one write with what this request sends next), or run at the first
        `decision()` over redis-py."""
        plan = self._plan(identity, tenant_quotas)
        if not plan.buckets:
            return Charge(None, None, items, identity.tenant, None, ALLOWED)
        reply = None
        if self.link is not None:
            try:
                reply = self.link.submit_packed(plan.packed(items), 1, timeout_s=self.timeout_s)
            except (RedisError, OSError) as exc:  # the link is closed (shutting down)
                return Charge(None, None, items, identity.tenant, None,
                              self.redis_error(exc, identity.tenant))
        return Charge(self, plan, items, identity.tenant, reply)

    async def run_script(self, plan: _Plan, items: int) -> list[Any]:
        """The script over redis-py (Sentinel, Cluster, GATEWAY_REDIS_CLIENT=redis-py)."""
        async with asyncio.timeout(self.timeout_s):
            return [await self._script(keys=plan.keys, args=plan.args(items))]

    async def judge(self, plan: _Plan, items: int, tenant: str, reply: Any) -> Decision:
        """The decision in the script's reply (after an EVAL when Redis did not know the
        script: a restart, a new Redis behind the same address)."""
        if isinstance(reply, Exception) and "NOSCRIPT" in str(reply) and self.link is not None:
            try:
                (reply,) = await self.link.execute(("EVAL", _GCRA, len(plan.keys), *plan.keys,
                                                    *plan.args(items)))
            except (RedisError, OSError, TimeoutError) as exc:
                return self.redis_error(exc, tenant)
        if isinstance(reply, Exception):
            return self.redis_error(RedisError(str(reply)), tenant)
        if self._in_episode:
            self._in_episode = False
            log.warning("quota checks reach Redis again")
        buckets = plan.buckets
        if reply[0] == 1:
            parts = [f"{head}{max(0, reply[3 + 2 * i])};t={-(-reply[4 + 2 * i] // 1000)}"
                     for i, head in enumerate(plan.remaining)]
            return Decision(True, {"RateLimit-Policy": plan.policy, "RateLimit": ", ".join(parts)})
        bucket = buckets[int(reply[1]) - 1]
        cost = items if bucket.counts_items else 1
        wait_ms = int(reply[2])
        self.metrics.child(self.metrics.quota_rejections, tenant, bucket.policy).inc()
        unit = "items" if bucket.counts_items else "requests"
        if wait_ms < 0:
            message = (f"Quota {bucket.policy} ({bucket.amount}) is smaller than this request's "
                       f"{cost} {unit}: split it into smaller requests.")
            retry_s = math.ceil(bucket.period_ms / 1000)
        else:
            retry_s = max(1, math.ceil(wait_ms / 1000))
            message = (f"Quota {bucket.policy} ({bucket.amount} {unit} per "
                       f"{_period(bucket.period_ms)}) is used up; retry in {retry_s} s.")
        return Decision(False, {"Retry-After": str(retry_s), "RateLimit-Policy": plan.policy,
                                "RateLimit": f'"{bucket.policy}";r=0;t={retry_s}'},
                        message, bucket.policy)

    async def refund(self, buckets: list[Bucket], items: int) -> None:
        """Give `items` back to the items buckets charged for them (cache hits, when they are not
        charged): the request was admitted on its full size, since hits are known only after the
        check. Best effort: a refund Redis does not take is a charge that stays."""
        give_back = [b for b in buckets if b.counts_items]
        if not give_back or items <= 0:
            return
        keys = list(dict.fromkeys(b.redis_key for b in give_back))
        args: list[float] = []
        for b in give_back:
            args += [keys.index(b.redis_key) + 1, b.slot, items, b.period_ms / b.amount]
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._refund(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError):
            pass

    def redis_error(self, exc: BaseException, tenant: str) -> Decision:
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


def _retrieve(future: asyncio.Future[list[Any]]) -> None:
    if not future.cancelled():
        future.exception()


def _period(period_ms: int) -> str:
    return {1_000: "second", 60_000: "minute", 86_400_000: "day"}[period_ms]
