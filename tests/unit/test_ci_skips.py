"""Under CI a skipped test fails (`tests/conftest.py`, `pytest_runtest_makereport`): a missing
dependency must turn CI red, not pass it quietly."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SKIPPING = """
import pytest

def test_needs_something():
    pytest.skip("something is not installed")

@pytest.mark.xfail(reason="a known bug")
def test_known_bug():
    raise AssertionError
"""


@pytest.mark.parametrize(("ci", "failed", "skipped"), [("true", 1, 0), ("", 0, 1)])
def test_a_skip_fails_under_ci_only(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                    ci: str, failed: int, skipped: int) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_skipping=SKIPPING)
    result = pytester.runpytest_inprocess("-p", "tests.conftest", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=failed, skipped=skipped, xfailed=1)
    if failed:
        result.stdout.fnmatch_lines(["*skipped under CI, where every dependency must be installed*"])
