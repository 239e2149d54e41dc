"""How the gateway stops leaning on a peer that is failing, and how it finds out the peer is back.

Three pieces, each used by the upstream client (upstream.py), the first by the Redis cache too:

`ProbeGate`: "back off, then one probe". Closed, every call passes. Opened for `s` seconds, no call
passes; after that one call at a time passes as the probe; its success closes the gate, its failure
opens it again. The cache's backoff after a Redis error and the breaker's open/half-open states are
the same mechanism, so they are the same code.

`CircuitBreaker`: judges a failure *rate*, not a streak. Each logical upstream call (after its
retries) is recorded once, in a sliding window of the last `window_calls` calls no older than
`window_s`; when the window holds at least `min_calls` calls and `failure_rate` of them or more
failed, the gate opens for `reset_s`. A window counted in calls, not only in time: after a busy
healthy spell a time window holds hundreds of successes, and an upstream that then dies outright
took 5.6 s to reach 50% in the bench; the last 10 calls reach it after 5 failures, whatever came
before. The age limit keeps a quiet gateway from judging on calls made long ago. The old breaker counted every failed attempt and opened after 5 in a row: with 30% of
attempts failing at random that is near certain within seconds, and then everything failed for
5 s (65% of requests failed under that load). Counted once after retries, 30% random failures are
0.3^attempts of calls (0.24% with 5 attempts), nowhere near a 50% threshold (3 failures of 5 at
that rate: about 1 in 10^7); a dead upstream is 100% and opens the circuit as soon as `min_calls`
calls have been seen. 5, because a batcher keeps only 4 calls per model in flight and a dead
upstream's call takes its retries (~0.1-0.4 s): 10 calls took over 1 s to see, 5 take half that.

`RetryBudget`: retries at most `ratio` of calls, as Finagle's RetryBudget and gRPC's retry
throttling do, so that a failing upstream gets at most (1 + ratio) times its load, not
`retry_attempts` times, before the breaker acts; `min_per_s` retries per second are always allowed
so that a quiet gateway can still retry. Over a sliding window of `ttl_s` (Finagle's 10 s).

Not thread-safe: each lives on one event loop, like the client that owns it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Clock = Callable[[], float]
GateState = Literal["closed", "open", "half_open"]


class ProbeGate:
    """Closed -> `open(s)` -> (after s) half-open, one probe at a time -> closed on `close()`, or
    open again on `open(s)`."""

    def __init__(self, *, clock: Clock = time.monotonic,
                 on_change: Callable[[GateState], None] | None = None) -> None:
        self._clock = clock
        self._on_change = on_change
        self._open = False
        self._retry_at = 0.0
        self._probing = False

    @property
    def state(self) -> GateState:
        if not self._open:
            return "closed"
        return "open" if self._clock() < self._retry_at else "half_open"

    @property
    def is_closed(self) -> bool:
        """Cheap: one attribute read (the hot path asks on every call)."""
        return not self._open

    def backing_off(self) -> bool:
        """True while no call may pass, probe included."""
        return self._open and self._clock() < self._retry_at

    def retry_after(self) -> float:
        """Seconds until a probe may pass (0 when closed or half-open)."""
        return max(0.0, self._retry_at - self._clock()) if self._open else 0.0

    def admit(self) -> bool | None:
        """May a call pass now? None: no (backing off, or another call is the probe); True: yes,
        as the probe (it must end in `close()`, `open()` or `release()`); False: yes, closed."""
        if not self._open:
            return False
        if self._probing or self._clock() < self._retry_at:
            return None
        self._probing = True
        return True

    def release(self) -> None:
        """The probe ended without a verdict (cancelled): let another call probe."""
        self._probing = False

    def open(self, for_s: float) -> bool:
        """Stop calls for `for_s` seconds from now; True if the gate was closed until now."""
        self._probing = False
        self._retry_at = self._clock() + for_s
        if self._open:
            if self._on_change is not None:
                self._on_change("open")
            return False
        self._open = True
        if self._on_change is not None:
            self._on_change("open")
        return True

    def close(self) -> bool:
        """Calls pass again; True if the gate was open until now."""
        self._probing = False
        if not self._open:
            return False
        self._open = False
        if self._on_change is not None:
            self._on_change("closed")
        return True


class _Window:
    """Two counts over the last `span_s` seconds, in `buckets` buckets (older buckets drop off)."""

    def __init__(self, span_s: float, buckets: int, clock: Clock) -> None:
        self._width = span_s / buckets
        self._buckets = buckets
        self._clock = clock
        self._slots: deque[list[int]] = deque()  # [bucket index, a, b]
        self.a = 0
        self.b = 0

    def add(self, a: int = 0, b: int = 0) -> None:
        index = self._expire()
        if self._slots and self._slots[-1][0] == index:
            slot = self._slots[-1]
            slot[1] += a
            slot[2] += b
        else:
            self._slots.append([index, a, b])
        self.a += a
        self.b += b

    def totals(self) -> tuple[int, int]:
        self._expire()
        return self.a, self.b

    def clear(self) -> None:
        self._slots.clear()
        self.a = self.b = 0

    def _expire(self) -> int:
        index = int(self._clock() / self._width)
        slots = self._slots
        while slots and slots[0][0] <= index - self._buckets:
            _, a, b = slots.popleft()
            self.a -= a
            self.b -= b
        return index


class _Outcomes:
    """The last `size` verdicts no older than `max_age_s`: (calls, failures)."""

    def __init__(self, size: int, max_age_s: float, clock: Clock) -> None:
        self._entries: deque[tuple[float, bool]] = deque()
        self._size = size
        self._max_age_s = max_age_s
        self._clock = clock
        self._failures = 0

    def add(self, ok: bool) -> None:
        self._entries.append((self._clock(), ok))
        self._failures += not ok
        if len(self._entries) > self._size:
            self._drop()

    def totals(self) -> tuple[int, int]:
        oldest = self._clock() - self._max_age_s
        while self._entries and self._entries[0][0] < oldest:
            self._drop()
        return len(self._entries), self._failures

    def clear(self) -> None:
        self._entries.clear()
        self._failures = 0

    def _drop(self) -> None:
        _, ok = self._entries.popleft()
        self._failures -= not ok


@dataclass(frozen=True)
class Admission:
    """What `CircuitBreaker.acquire` decided: whether the call may go, whether it is the probe
    (one attempt, no retries: its verdict decides the circuit), and how long until the next
    probe when it may not go."""

    allowed: bool
    probe: bool = False
    wait_s: float = 0.0


_PASS = Admission(True)  # shared: acquire() runs on every upstream call
_PROBE = Admission(True, probe=True)


class CircuitBreaker:
    """A failure-rate breaker over a sliding window, on a ProbeGate (see the module docstring)."""

    def __init__(self, *, failure_rate: float, min_calls: int, window_calls: int, window_s: float,
                 reset_s: float, clock: Clock = time.monotonic,
                 on_change: Callable[[GateState], None] | None = None) -> None:
        self.failure_rate = failure_rate
        self.min_calls = min_calls
        self.reset_s = reset_s
        self.gate = ProbeGate(clock=clock, on_change=on_change)
        self._window = _Outcomes(window_calls, window_s, clock)

    @property
    def state(self) -> GateState:
        return self.gate.state

    @property
    def is_open(self) -> bool:
        """True while calls fail fast or only a probe may pass; one attribute read."""
        return not self.gate.is_closed

    def acquire(self) -> Admission:
        probe = self.gate.admit()
        if probe is None:
            return Admission(False, wait_s=self.gate.retry_after() or min(self.reset_s, 1.0))
        return _PROBE if probe else _PASS

    def record(self, ok: bool, *, probe: bool = False) -> None:
        """The verdict on one logical call (after its retries)."""
        if probe:
            if ok:
                self._window.clear()  # a fresh start: the failures that opened it are history
                self.gate.close()
            else:
                self.gate.open(self.reset_s)
            return
        if self.is_open:  # a call admitted before the circuit opened: its verdict is stale
            return
        self._window.add(ok)
        calls, failures = self._window.totals()
        if not ok and calls >= self.min_calls and failures >= self.failure_rate * calls:
            self.gate.open(self.reset_s)

    def release(self, *, probe: bool) -> None:
        """The call ended without a verdict (cancelled, or backpressure only)."""
        if probe:
            self.gate.release()

    def window(self) -> tuple[int, int]:
        """(calls, failures) in the current window, for messages and tests."""
        return self._window.totals()

    def retry_after(self) -> float:
        return self.gate.retry_after()


class RetryBudget:
    """Retries may be at most `ratio` of calls over the last `ttl_s` seconds, plus `min_per_s`
    retries per second whatever the traffic (see the module docstring)."""

    def __init__(self, ratio: float, *, ttl_s: float = 10.0, min_per_s: float = 10.0,
                 clock: Clock = time.monotonic) -> None:
        self.ratio = ratio
        self._reserve = min_per_s * ttl_s
        self._window = _Window(ttl_s, 10, clock)  # a = calls, b = retries

    def record_call(self) -> None:
        self._window.add(a=1)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        calls, retries = self._window.totals()
        if retries + 1 > self.ratio * calls + self._reserve:
            return False
        self._window.add(b=1)
        return True
