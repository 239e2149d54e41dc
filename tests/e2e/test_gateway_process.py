"""The gateway as a real process: `classifier-gateway serve`, SIGHUP reload, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.processes import spawn, stop
from tests.support.redis_server import RedisServer, free_port


def tasks_yaml(upstream_port: int, **tasks: str) -> str:
    return yaml.safe_dump({
        "upstreams": {"fake": {"base_url": f"http://127.0.0.1:{upstream_port}"}},
        "tasks": {name: {"upstream": "fake", "model": model} for name, model in tasks.items()},
    })


@pytest.fixture
def upstream_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = spawn(["-m", "tests.support.fake_upstream", "--port", str(port), "--delay-s", "0.8"],
                    port=port, log=tmp_path / "upstream.log", ready_path=None)
    yield port
    stop(process)


def start_gateway(tmp_path: Path, upstream_port: int, redis: RedisServer) -> tuple[subprocess.Popen[bytes], str]:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(tasks_yaml(upstream_port, sentiment="ft:one"))
    port = free_port()
    process = spawn(
        ["-m", "service.cli", "serve", "--port", str(port), "--tasks", str(tasks),
         "--redis-url", redis.url],
        env={"GATEWAY_TASKS_POLL_INTERVAL_S": "3600", "GATEWAY_SHUTDOWN_DELAY_S": "1.5"},
        port=port, log=tmp_path / "gateway.log",
    )
    return process, f"http://127.0.0.1:{port}"


def test_sighup_reloads_the_tasks_file(tmp_path: Path, upstream_port: int,
                                       redis_server: RedisServer) -> None:
    process, url = start_gateway(tmp_path, upstream_port, redis_server)
    try:
        assert [t["name"] for t in httpx.get(f"{url}/tasks").json()["tasks"]] == ["sentiment"]
        (tmp_path / "tasks.yaml").write_text(
            tasks_yaml(upstream_port, sentiment="ft:one", spam="ft:two"))
        process.send_signal(signal.SIGHUP)
        for _ in range(100):
            names = [t["name"] for t in httpx.get(f"{url}/tasks").json()["tasks"]]
            if "spam" in names:
                break
            time.sleep(0.05)
        assert names == ["sentiment", "spam"]
    finally:
        stop(process)


def test_sigterm_turns_unready_finishes_in_flight_requests_then_exits(
        tmp_path: Path, upstream_port: int, redis_server: RedisServer) -> None:
    process, url = start_gateway(tmp_path, upstream_port, redis_server)
    result: dict[str, httpx.Response] = {}

    def slow_request() -> None:
        result["r"] = httpx.post(f"{url}/classify", json={"task": "sentiment", "input": "slow"},
                                 timeout=10)

    worker = threading.Thread(target=slow_request)
    worker.start()
    time.sleep(0.3)  # the request is now waiting on the 0.8 s upstream
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 503 and "draining" in ready.text
    worker.join(10)
    assert result["r"].status_code == 200, result["r"].text
    assert process.wait(15) == 0
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log, log
