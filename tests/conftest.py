from __future__ import annotations

import os
import signal
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer, start_redis

#: The longest test files, longest first, from a serial run's durations on 2 quiet cores (7 Dec:
#: seconds per file, about). `make pytest` hands whole files to two workers in collection order
#: (pytest-xdist, --dist loadfile): these go first, so that the run does not end on one worker
#: still training a model while the other sits idle. A file missing here just runs in its place.
LONGEST_FIRST = (
    "tests/e2e/test_factory_sdk.py",  # ~180: the SDK flows, one of them fine-tunes MiniLM
    "tests/e2e/test_factory_demo.py",  # ~130
    "tests/e2e/test_cli_workflow.py",  # ~130
    "tests/integration/test_ngram_quality.py",  # ~110: seven corpora against the baseline
    "tests/integration/test_factory_ray.py",  # ~100: a Ray cluster in a network namespace
    "tests/integration/test_minilm_accuracy.py",  # ~90: three corpora
    "tests/integration/test_factory_cluster.py",
    "tests/integration/test_factory_accuracy.py",
    "tests/unit/test_minilm.py",
    "tests/integration/test_factory_models.py",
    "tests/e2e/test_export_kserve.py",
    "tests/integration/test_factory_tracking.py",
    "tests/integration/test_infinity_server.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """Give Ctrl-C back to the processes the tests start. A suite started in the background by a
    shell without job control (`(make test &)`, some CI runners) has SIGINT ignored, and an
    ignored signal is inherited through exec: the CLI under test then never sees the Ctrl-C that
    its tests send (a fresh-venv run started that way failed all five of them)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect `LONGEST_FIRST`'s files first (a stable sort: tests keep their order within a
    file, and every other file keeps its place after them)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None],
                              ) -> Generator[None, pytest.TestReport, None]:
    """Under CI (`CI=true`, as `.ci/run` is called) a skipped test fails: a missing dependency
    (Debian's postgresql, say) must turn CI red, not pass it quietly. Elsewhere a skip names what
    to install."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() in ("true", "1") \
            and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skipped under CI, where every dependency must be "
                           f"installed: {report.longrepr}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session; tests isolate themselves by key prefix or FLUSHALL."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, for tests that kill or restart it."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()
