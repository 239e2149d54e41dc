"""SIGTERM under load loses no request that reached the gateway's socket (issue 10, item 3).

uvicorn's own shutdown closed the listening socket with connections queued in its backlog (reset)
and closed at once every connection that had not sent its request yet; about one SIGTERM in four
lost 1-9 requests (this test, on that server: 31 lost over 3 SIGTERMs). bench/faults.py runs 20
SIGTERMs; this test runs 2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.processes import spawn, stop
from tests.support.redis_server import free_port
from tests.support.shutdown_load import Tally, load_until_exit

SIGTERMS = 2


@pytest.fixture
def upstream_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = spawn(["-m", "tests.support.fake_upstream", "--port", str(port)],
                    port=port, log=tmp_path / "upstream.log", ready_path=None)
    yield port
    stop(process)


def test_no_request_is_lost_over_sigterms_under_load(tmp_path: Path, upstream_port: int) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({
        "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{upstream_port}"}},
        "tasks": {"sentiment": {"upstream": "fake", "model": "ft:one"}}}))
    total = Tally()
    for round_ in range(SIGTERMS):
        port = free_port()
        log = tmp_path / f"gateway-{round_}.log"
        process = spawn(["-m", "service.cli", "serve", "--port", str(port), "--tasks", str(tasks)],
                        env={"GATEWAY_SHUTDOWN_DELAY_S": "0.2", "GATEWAY_REDIS_URL": ""},
                        port=port, log=log)
        try:
            tally = asyncio.run(load_until_exit(port, process, tag=f"r{round_}"))
        finally:
            stop(process)
        assert process.returncode == 0, log.read_text()
        total.add(tally)
    assert total.lost == 0, (total, [p.read_text()[-2000:] for p in tmp_path.glob("gateway-*")])
    assert total.answered > 50 * SIGTERMS
