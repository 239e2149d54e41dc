"""Deadlines that stretch with the machine's load, and restart on progress.

Why: the suite runs on two cores, often beside other work (CI's other steps, a developer's bench,
several sessions' tests). Fixed deadlines then fail tests that are not broken: a server that
starts in 2 s on an idle machine took over 30 s, and an export test's job sat `QUEUED` for 90 s
behind a training job and failed at set-up while it passed alone (issue 19, 25 min on two busy
cores). A `Deadline`'s budget is its nominal seconds times how oversubscribed the CPUs are (the
1-minute load average over the cores this process may use, at least 1, at most `MAX_STRETCH`),
re-read at every check: an idle machine keeps the nominal timeout, a loaded one waits longer, and
nothing waits forever. `renew()` restarts the clock when the thing waited on shows progress (a
job's status, phase, step or events), so a long wait that keeps moving does not fail, while a
stuck one fails after one budget.

Stdlib only: the SDK 2.5.1 flow script imports it from a child interpreter.
"""

from __future__ import annotations

import os
import time

# 4x: the worst oversubscription seen on a CI machine of two cores (load 8) that still finished.
MAX_STRETCH = 4.0


def load_stretch() -> float:
    """How much longer than on an idle machine things take now: 1-minute load per usable core,
    clamped to [1, MAX_STRETCH]."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(MAX_STRETCH, max(1.0, os.getloadavg()[0] / max(cores or 1, 1)))


def stretched(seconds: float) -> float:
    """`seconds` scaled by the load right now: for a single bounded call (a subprocess timeout)."""
    return seconds * load_stretch()


class Deadline:
    """`seconds` of nominal time from now (or from the last `renew()`), stretched by the load."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._start = time.monotonic()

    @property
    def budget_s(self) -> float:
        """The time allowed now: the nominal seconds times the current load stretch."""
        return stretched(self.seconds)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def expired(self) -> bool:
        return self.elapsed_s() > self.budget_s

    def remaining_s(self) -> float:
        return max(0.0, self.budget_s - self.elapsed_s())

    def renew(self) -> None:
        """Progress was seen: the next `seconds` (stretched) count from now."""
        self._start = time.monotonic()

    def describe(self) -> str:
        """For a failure message: what was allowed and why."""
        return (f"{self.elapsed_s():.0f}s (budget {self.seconds:g}s x load stretch "
                f"{load_stretch():.1f})")
