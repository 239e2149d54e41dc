"""Drift signals: what labels a task's model predicts, counted, windowed and compared.

Why it looks like this:
- `gateway_predicted_labels_total{task,target,label}` must stay bounded whatever the upstream
  answers: a target's labels are the task's `labels` when the tasks file names them, else the
  labels of the first answer the model gave (a classifier scores every label it knows, so one
  answer carries its whole label set), at most `MAX_LABELS`; anything else counts as `other`.
- The distribution over the last hour and day, and how many items each stage of a cascade
  answered, are counted in one-minute buckets, where every replica reads them: in Redis when the
  gateway has one (`GATEWAY_FEEDBACK_REDIS_URL`, else `GATEWAY_REDIS_URL`), so that replicas behind
  a load balancer answer `GET /tasks/{name}/stats` alike; else in this replica's memory (said as
  `scope` in the answer). The counts behind one seam, `MinuteCounts`: `MemoryCounts`,
  `RedisCounts`.
- In Redis, one hash per task and minute, `<prefix>:drift:{<task>}:<minute>`, field
  `l<model>\\x1f<target>\\x1f<label>` (or `c\\x1f<stages' digest>\\x1f<stage>` for a
  cascade's stages) -> count, expiring after 25 hours (a day's window and an hour to spare). The
  response path never waits for Redis: `add` puts a request's counts in a dict, and one task
  flushes the dict every second in one pipeline of HINCRBYs, like the usage recorder
  (tenants.py); a replica that dies loses at most its last second. A day's 1,440 buckets are
  summed inside Redis by a Lua script (`_SUM`), an hour's 60 buckets per call, the calls one after
  the other. Measured on the development machine (5 labels a minute): 1,440 HGETALL replies parsed
  by redis-py took 134-300 ms of the gateway's event loop (its hot path waits meanwhile), and one
  script over the whole day 27 ms of Redis's (the cache waits meanwhile); an hour per call held
  Redis 0.3-0.6 ms each, and a day's read took 26-128 ms, awaited. A read first flushes this replica's own counts, so a replica
  always reports what it answered itself.
- The Prometheus rule (deploy/prometheus) computes the same index cluster-wide from the counter.
- The population stability index compares the last hour with the 23 hours before it:
  `PSI = sum((p - q) * ln(p / q))` over labels, shares floored at `EPSILON` so that a label
  that appears or vanishes counts heavily but finitely. Above `PSI_THRESHOLD` (0.2, the usual
  "significant shift") the mix of answers has moved.
- When the model is the factory's, the hour and the day are also compared with the label mix of
  its training data, read once per model from the factory's job (`GET /v1/models/{id}`, then
  `GET /v1/fine_tuning/jobs/{job}`: its `validation` report counts each label); a model whose
  upstream does not say (Mistral's API, other servers) has only the window reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import httpx
from redis.exceptions import RedisError

from service.gateway.metrics import GatewayMetrics
from service.gateway.protocols import Result
from service.gateway.redis_clients import RedisPy
from service.gateway.registry import TaskSpec, UpstreamSpec

log = logging.getLogger("service.gateway.drift")

MAX_LABELS = 64
OTHER = "other"
EPSILON = 1e-4
PSI_THRESHOLD = 0.2
HOUR_S = 3600
DAY_S = 86400
_BUCKET_S = 60


def psi(current: dict[str, float], reference: dict[str, float]) -> float:
    """Population stability index of two label distributions (shares summing to 1)."""
    total = 0.0
    for label in current.keys() | reference.keys():
        p = max(current.get(label, 0.0), EPSILON)
        q = max(reference.get(label, 0.0), EPSILON)
        total += (p - q) * math.log(p / q)
    return total


def training_shares(job: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per target, each label's share of the training data, from a factory job's `validation`
    report (`{"training:FILE": {"targets": {name: {"labels": {label: count}}}}}`); {} when the job
    does not say."""
    counts: dict[str, Counter[str]] = {}
    validation = job.get("validation")
    if not isinstance(validation, dict):
        return {}
    for role, report in validation.items():
        if not str(role).startswith("training:") or not isinstance(report, dict):
            continue
        for name, target in (report.get("targets") or {}).items():
            labels = target.get("labels") if isinstance(target, dict) else None
            if isinstance(labels, dict):
                counts.setdefault(str(name), Counter()).update(
                    {str(k): int(v) for k, v in labels.items()})
    return {name: shares(c) for name, c in counts.items()}


async def fetch_training_shares(upstream: UpstreamSpec, model: str,
                                timeout_s: float = 2.0) -> dict[str, dict[str, float]]:
    """The training label mix of `model` from its upstream, when that is the factory (see the
    module docstring); {} when the upstream cannot say or does not answer."""
    if upstream.protocol != "mistral":
        return {}
    headers = {"accept": "application/json"}
    key = upstream.api_key()
    if key:
        headers["authorization"] = f"Bearer {key}"
    root = upstream.wire.root(upstream.base_url)
    try:
        async with httpx.AsyncClient(base_url=root, headers=headers, timeout=timeout_s,
                                     follow_redirects=False) as client:
            card = (await client.get(f"/v1/models/{model}")).raise_for_status().json()
            job_id = card.get("job") if isinstance(card, dict) else None
            if not isinstance(job_id, str) or not job_id:
                return {}
            job = (await client.get(f"/v1/fine_tuning/jobs/{job_id}")).raise_for_status().json()
    except (httpx.HTTPError, ValueError) as exc:
        # No URL nor key in the message: the type is enough to act on.
        log.info("drift: no training distribution for %s (%s)", model, type(exc).__name__)
        return {}
    return training_shares(job) if isinstance(job, dict) else {}


def shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {label: n / total for label, n in sorted(counts.items())} if total else {}


#: A day of one-minute buckets, and how long Redis keeps one (a day and an hour to spare).
DAY_MINUTES = DAY_S // _BUCKET_S
HOUR_MINUTES = HOUR_S // _BUCKET_S
REDIS_TTL_S = DAY_S + HOUR_S
_SEP = "\x1f"


class MinuteCounts(Protocol):
    """Per task, counts of fields (a model's label on a target, a cascade stage's items) in
    one-minute buckets: the seam between this replica's memory and Redis (module docstring)."""

    #: Whether every replica reads the same counts (Redis).
    shared: bool

    def add(self, task: str, minute: int, counts: Mapping[str, int]) -> None:
        """On the response path: must not wait for anything."""
        ...

    async def windows(self, task: str, now: int) -> tuple[Counter[str], Counter[str]]:
        """The counts of the hour up to minute `now` (included), and of the 23 hours before."""
        ...

    async def aclose(self) -> None: ...


class MemoryCounts:
    """This replica's counts, a day of buckets per task (for a gateway without Redis)."""

    shared = False

    def __init__(self) -> None:
        self._tasks: dict[str, deque[tuple[int, Counter[str]]]] = {}

    def add(self, task: str, minute: int, counts: Mapping[str, int]) -> None:
        buckets = self._tasks.get(task)
        if buckets is None:
            buckets = self._tasks[task] = deque()
        if not buckets or buckets[-1][0] != minute:
            buckets.append((minute, Counter()))
            while buckets and buckets[0][0] <= minute - DAY_MINUTES:
                buckets.popleft()
        bucket = buckets[-1][1]
        for field_name, n in counts.items():  # not Counter.update: its Python path is slower
            bucket[field_name] += n

    async def windows(self, task: str, now: int) -> tuple[Counter[str], Counter[str]]:
        hour: Counter[str] = Counter()
        before: Counter[str] = Counter()
        for minute, counts in self._tasks.get(task, ()):
            if now - HOUR_MINUTES < minute <= now:
                hour.update(counts)
            elif now - DAY_MINUTES < minute <= now - HOUR_MINUTES:
                before.update(counts)
        return hour, before

    async def aclose(self) -> None:
        pass


#: KEYS: minute buckets (an hour's). Answers field, count pairs: the buckets' sums.
_SUM = """
local sums = {}
for _, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  for j = 1, #flat, 2 do
    sums[flat[j]] = (sums[flat[j]] or 0) + tonumber(flat[j + 1])
  end
end
local reply = {}
for field, n in pairs(sums) do
  reply[#reply + 1] = field
  reply[#reply + 1] = n
end
return reply
"""


class RedisCounts:
    """Counts in Redis, shared by the replicas, written in batches (module docstring)."""

    shared = True
    #: Buckets kept for the next flush while Redis does not take them; beyond, counts are lost
    #: (drift counts are a signal, not a record): 10,000 is a week of one task's minutes.
    MAX_PENDING = 10_000

    def __init__(self, backend: RedisPy, prefix: str, *, flush_s: float = 1.0,
                 timeout_s: float = 5.0) -> None:
        self._client = backend.client
        self._prefix = prefix
        self.flush_s = flush_s
        self._timeout_s = timeout_s
        self._pending: dict[tuple[str, int], Counter[str]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # One hash tag per task: a day's keys share a Redis Cluster slot, as one script needs.
        self._sum = backend.client.register_script(_SUM)

    def key(self, task: str, minute: int) -> str:
        return f"{self._prefix}:drift:{{{task}}}:{minute}"

    def add(self, task: str, minute: int, counts: Mapping[str, int]) -> None:
        bucket = self._pending.get((task, minute))
        if bucket is None:
            bucket = self._pending[(task, minute)] = Counter()
        for field_name, n in counts.items():
            bucket[field_name] += n
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            # Logged by flush, counts kept for the next one: the loop must outlive any error.
            with contextlib.suppress(Exception):
                await self.flush()

    async def flush(self) -> None:
        """This replica's counts so far, to Redis in one pipeline; kept for the next flush when
        Redis does not take them (then raises)."""
        async with self._lock:
            pending, self._pending = self._pending, {}
            if not pending:
                return
            pipe = self._client.pipeline(transaction=False)
            for (task, minute), counts in pending.items():
                key = self.key(task, minute)
                for field_name, n in counts.items():
                    pipe.hincrby(key, field_name, n)
                pipe.expire(key, REDIS_TTL_S)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await pipe.execute()
            except Exception as exc:  # Redis down, a cluster moving slots: keep, and say so
                log.warning("drift counts: %d buckets not saved yet (%s)", len(pending),
                            type(exc).__name__)
                for where, counts in pending.items():
                    if where in self._pending or len(self._pending) < self.MAX_PENDING:
                        self._pending.setdefault(where, Counter()).update(counts)
                raise

    async def windows(self, task: str, now: int) -> tuple[Counter[str], Counter[str]]:
        await self.flush()  # what this replica answered is in what it reports
        hour: Counter[str] = Counter()
        before: Counter[str] = Counter()
        async with asyncio.timeout(self._timeout_s):
            for end in range(now, now - DAY_MINUTES, -HOUR_MINUTES):  # the last hour first
                reply = await self._sum(keys=[self.key(task, minute) for minute in
                                              range(end - HOUR_MINUTES + 1, end + 1)])
                into = hour if end == now else before
                for i in range(0, len(reply), 2):
                    into[_text(reply[i])] += int(reply[i + 1])
        return hour, before

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.flush()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def minute_counts(backend: RedisPy | None, prefix: str) -> MinuteCounts:
    return MemoryCounts() if backend is None else RedisCounts(backend, prefix)


class _Target:
    """One (task, model, target): its allowed labels, and each one's field in the counts."""

    def __init__(self, model: str, target: str, labels: Sequence[str]) -> None:
        self.labels = frozenset(labels[:MAX_LABELS])
        self.fields = {label: _SEP.join(("l", model, target, label))
                       for label in (*self.labels, OTHER)}


def _stages_field(task: TaskSpec, stage: int) -> str:
    """A cascade stage's field: a digest of every stage's model, so that counts start afresh
    when the stages change."""
    digest = hashlib.sha256("\n".join(s.model for s in task.cascade).encode()).hexdigest()[:12]
    return _SEP.join(("c", digest, str(stage)))


def cascade_shares(task: TaskSpec, counts: Counter[str]) -> dict[str, Any]:
    """Items each stage of the task's cascade answered, and the share the first handed on."""
    answered = [counts.get(_stages_field(task, stage), 0) for stage in range(len(task.cascade))]
    total = sum(answered)
    return {"items": total, "answered": answered,
            "escalated_share": round(1 - answered[0] / total, 6) if total else None}


class LabelDrift:
    """Counts each answered item's top label per target, and a cascade's items per stage (see
    the module docstring)."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.time,
                 counts: MinuteCounts | None = None) -> None:
        self._metrics = metrics
        self._clock = clock
        self.counts: MinuteCounts = counts if counts is not None else MemoryCounts()
        self._targets: dict[tuple[str, str, str], _Target] = {}
        #: model -> its training label shares per target ({}: the upstream does not say).
        self.training: dict[str, dict[str, dict[str, float]]] = {}

    def observe(self, task: TaskSpec, results: Sequence[Result], models: Sequence[str]) -> None:
        counter = self._metrics.predicted_labels
        seen: dict[str, int] = {}  # a request's counts, added to the minute's at once
        for result, model in zip(results, models, strict=True):
            for target, body in result.items():
                scores = body.get("scores") if isinstance(body, dict) else None
                if not isinstance(scores, dict) or not scores:
                    continue
                top = max(scores, key=scores.__getitem__)
                state = self._targets.get((task.name, model, target))
                if state is None:
                    known = task.route().labels or tuple(scores)
                    state = self._targets[(task.name, model, target)] = _Target(
                        model, target, list(known))
                label = top if top in state.labels else OTHER
                field_name = state.fields[label]
                seen[field_name] = seen.get(field_name, 0) + 1
                self._metrics.child(counter, task.name, target, label).inc()
        if seen:
            self.counts.add(task.name, int(self._clock()) // _BUCKET_S, seen)

    def cascaded(self, task: TaskSpec, answered: Sequence[int]) -> None:
        """How many items each stage of the task's cascade answered in one request."""
        counts = {_stages_field(task, stage): n for stage, n in enumerate(answered) if n}
        if counts:
            self.counts.add(task.name, int(self._clock()) // _BUCKET_S, counts)

    async def _windows(self, task: TaskSpec) -> dict[str, Counter[str]]:
        """The counts of the last hour, the 23 hours before it, and the day."""
        hour, before = await self.counts.windows(task.name, int(self._clock()) // _BUCKET_S)
        return {"hour": hour, "before": before, "day": hour + before}

    async def cascade_report(self, task: TaskSpec) -> dict[str, Any]:
        """`cascade_shares` over the last day (`GET /tasks/{name}`)."""
        return cascade_shares(task, (await self._windows(task))["day"])

    async def stats(self, task: TaskSpec) -> dict[str, Any]:
        """The task model's label distribution per target over the last hour and day, the index
        of the hour against the 23 hours before it, and for a cascade its stages' items over the
        hour and the day. Raises what the counts' Redis raises."""
        windows = await self._windows(task)
        split: dict[str, dict[str, Counter[str]]] = {}
        mine = _SEP.join(("l", task.model, ""))
        for window, counts in windows.items():
            for field_name, n in counts.items():
                if field_name.startswith(mine):
                    target, _, label = field_name[len(mine):].partition(_SEP)
                    split.setdefault(target, {}).setdefault(window, Counter())[label] += n
        targets: dict[str, Any] = {}
        for target, found in sorted(split.items()):
            hour, day, before = (found.get(w, Counter()) for w in ("hour", "day", "before"))
            current, reference = shares(hour), shares(before)
            index = psi(current, reference) if current and reference else None
            moved = sorted(current.keys() | reference.keys(),
                           key=lambda label: -abs(current.get(label, 0.0)
                                                  - reference.get(label, 0.0)))
            training = self.training.get(task.model, {}).get(target)
            day_shares = shares(day)
            targets[target] = {
                "training": None if not training else {
                    "distribution": training,
                    "psi_hour": psi(current, training) if current else None,
                    "psi_day": psi(day_shares, training) if day_shares else None},
                "hour": {"items": sum(hour.values()), "distribution": current},
                "day": {"items": sum(day.values()), "distribution": day_shares},
                "reference": {"window": "the 23 hours before the last hour",
                              "items": sum(before.values()), "distribution": reference},
                "psi": index,
                "drifted": index is not None and index > PSI_THRESHOLD,
                "moved": [{"label": label, "hour": current.get(label, 0.0),
                           "reference": reference.get(label, 0.0)} for label in moved[:5]],
            }
        body: dict[str, Any] = {
            "task": task.name, "model": task.model, "threshold": PSI_THRESHOLD,
            "scope": "all replicas" if self.counts.shared else "this replica",
            "targets": targets}
        if task.cascade:
            body["cascade"] = {"hour": cascade_shares(task, windows["hour"]),
                               "day": cascade_shares(task, windows["day"])}
        return body
