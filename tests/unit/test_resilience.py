"""The breaker, the retry budget and the probe gate on a fake clock (service/gateway/resilience.py)."""

from __future__ import annotations

import pytest

from service.gateway.resilience import CircuitBreaker, ProbeGate, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(b: CircuitBreaker) -> str:
    """Read through a function so that mypy does not narrow the property between calls."""
    return b.state


def breaker(clock: Clock, states: list[str] | None = None) -> CircuitBreaker:
    return CircuitBreaker(failure_rate=0.5, min_calls=10, window_calls=20, window_s=10.0,
                          reset_s=5.0, clock=clock,
                          on_change=None if states is None else states.append)


def test_gate_backs_off_then_lets_one_probe_through() -> None:
    clock = Clock()
    states: list[str] = []
    gate = ProbeGate(clock=clock, on_change=states.append)
    assert gate.admit() is False and gate.is_closed
    assert gate.open(2.0) is True
    assert gate.admit() is None and gate.backing_off() and gate.retry_after() == pytest.approx(2.0)
    clock.now += 2.0
    assert gate.state == "half_open" and not gate.backing_off()
    assert gate.admit() is True  # the probe
    assert gate.admit() is None  # a second caller while the probe is out
    gate.release()  # the probe was cancelled: no verdict
    assert gate.admit() is True
    assert gate.close() is True and gate.is_closed and gate.admit() is False
    assert states == ["open", "closed"]


def test_a_rate_under_the_threshold_never_opens_the_circuit() -> None:
    clock = Clock()
    b = breaker(clock)
    for i in range(1000):  # 40% of calls fail, evenly, over 100 s
        b.record(ok=i % 5 not in (0, 3))
        clock.now += 0.1
    assert state(b) == "closed"


def test_the_circuit_opens_at_the_rate_once_min_calls_are_seen() -> None:
    clock = Clock()
    states: list[str] = []
    b = breaker(clock, states)
    for _ in range(9):
        b.record(ok=False)
    assert state(b) == "closed"  # 9 calls < min_calls: not enough to judge
    b.record(ok=False)
    assert state(b) == "open" and states == ["open"]
    admission = b.acquire()
    assert not admission.allowed and admission.wait_s == pytest.approx(5.0)


def test_old_calls_leave_the_window() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(9):
        b.record(ok=False)
    clock.now += 11.0  # all nine are now older than the 10 s window
    for _ in range(9):
        b.record(ok=True)
    b.record(ok=False)
    assert state(b) == "closed" and b.window() == (10, 1)


def test_probe_verdicts_close_or_reopen() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.record(ok=False)
    clock.now += 5.0
    probe = b.acquire()
    assert probe.allowed and probe.probe and state(b) == "half_open"
    assert not b.acquire().allowed  # one probe at a time
    b.record(ok=False, probe=True)
    assert state(b) == "open" and b.acquire().wait_s == pytest.approx(5.0)  # a full period again
    clock.now += 5.0
    probe = b.acquire()
    b.record(ok=True, probe=True)
    assert state(b) == "closed" and b.window() == (0, 0)  # a fresh start
    assert b.acquire() == type(probe)(allowed=True, probe=False)


def test_verdicts_of_calls_admitted_before_the_circuit_opened_are_ignored() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(10):
        b.record(ok=False)
    b.record(ok=True)  # a slow call that started while the circuit was closed
    assert state(b) == "open"


def test_retry_budget_is_a_fraction_of_calls_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(0.5, ttl_s=10.0, min_per_s=1.0, clock=clock)  # floor: 10 per window
    for _ in range(100):
        budget.record_call()
    spent = 0
    while budget.try_spend():
        spent += 1
    assert spent == 60  # 0.5 x 100 calls + 10
    clock.now += 10.5  # the window has moved on: calls and retries expired
    assert budget.try_spend()


def test_a_busy_healthy_history_does_not_delay_opening() -> None:
    """The window is the last `window_calls` calls: 1,000 successes a moment ago weigh no more
    than 20 (a time window held them all, and a dead upstream took 5.6 s to open in the bench)."""
    clock = Clock()
    b = breaker(clock)
    for _ in range(1000):
        b.record(ok=True)
    for i in range(10):
        assert state(b) == "closed", i
        b.record(ok=False)
    assert state(b) == "open"
