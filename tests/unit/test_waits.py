"""The tests' own deadlines (tests/support/waits.py) stretch with the load and restart on
progress, within bounds."""

from __future__ import annotations

import os
import time

import pytest

from tests.support import waits
from tests.support.waits import MAX_STRETCH, Deadline, load_stretch


@pytest.mark.parametrize(("load", "expected"), [(0.3, 1.0), (2.0, 1.0), (5.0, 2.5), (80.0, MAX_STRETCH)])
def test_the_budget_stretches_with_the_load_per_core_within_bounds(
        monkeypatch: pytest.MonkeyPatch, load: float, expected: float) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    assert load_stretch() == expected
    assert Deadline(10).budget_s == pytest.approx(10 * expected)


def test_a_deadline_expires_after_its_budget_and_renew_restarts_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waits, "load_stretch", lambda: 1.0)
    deadline = Deadline(0.05)
    assert not deadline.expired()
    time.sleep(0.08)
    assert deadline.expired()
    deadline.renew()
    assert not deadline.expired() and deadline.remaining_s() > 0
    assert "budget 0.05s" in deadline.describe()
