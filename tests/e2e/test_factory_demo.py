"""`classifier-gateway demo` as a user runs it (real processes), in its `--once` mode."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.factory import REPO
from tests.support.redis_server import RedisServer, free_port

#: Every demo a test started: `_no_demo_left` kills those still running when the test ends.
_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_demo_left() -> Iterator[None]:
    """A test that fails before its demo stops (a timeout, an assertion) must not leave the demo
    and its servers running for the rest of the suite (seen: a factory still serving after a failed
    Ctrl-C test). The demo is killed; its servers, which ask Linux for SIGTERM when it dies
    (`PR_SET_PDEATHSIG`, see test_servers_do_not_outlive_a_demo_killed_outright), go with it."""
    yield
    while _started:
        demo = _started.pop()
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)


def _demo(data_dir: Path, redis_url: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--once", "--port", str(free_port()),
         "--factory-port", str(free_port()), "--data-dir", str(data_dir),
         "--redis-url", redis_url],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_demo_trains_registers_answers_and_reuses(tmp_path: Path, redis_server: RedisServer) -> None:
    first = _demo(tmp_path / "data", redis_server.url)
    assert "sentiment: trained ft:classifier:local-ngram:" in first
    assert "intent: trained ft:classifier:local-ngram:" in first
    assert f"Redis: using {redis_server.url}" in first
    answer = orjson.loads(first.split("First answer: ", 1)[1].splitlines()[0])
    assert answer["task"] == "sentiment"
    assert answer["results"][0]["sentiment"]["label"] == "positive"
    curls = [line.strip() for line in first.splitlines() if line.strip().startswith("curl ")]
    assert len(curls) == 2 and "/classify-chat" in curls[1]
    tasks = (tmp_path / "data" / "demo-tasks.yaml").read_text()
    assert "upstream: local" in tasks and "kind: chat" in tasks

    dead_redis = f"redis://127.0.0.1:{free_port()}"
    second = _demo(tmp_path / "data", dead_redis)
    assert "sentiment: reusing" in second and "intent: reusing" in second
    assert f"Redis: none reachable at {dead_redis}" in second
    assert "First answer: " in second


def test_demo_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "demo", "--once", "--port", str(port),
             "--factory-port", str(free_port()), "--data-dir", str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 1
    assert f"port {port} for the gateway is in use" in done.stderr
    assert "--port" in done.stderr


def test_demo_with_keys_on_both_services_never_prints_them(tmp_path: Path) -> None:
    out = _demo(tmp_path / "data", "", env={"FACTORY_API_KEY": "factory-secret-1",
                                            "GATEWAY_API_KEYS": "gateway-secret-1,other"})
    assert "First answer: " in out and "Redis: disabled" in out
    assert "factory-secret-1" not in out and "gateway-secret-1" not in out
    assert "$GATEWAY_API_KEY" in out and "$GATEWAY_KEY" not in out  # one name: docs, "Client keys"
    tasks = (tmp_path / "data" / "demo-tasks.yaml").read_text()
    assert "api_key_env: FACTORY_API_KEY" in tasks and "factory-secret-1" not in tasks


def test_ctrl_c_stops_both_processes_cleanly(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole foreground process group; the demo alone must stop its children,
    once each, so that nothing prints a traceback and both ports are freed."""
    gateway_port, factory_port = free_port(), free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--port", str(gateway_port),
         "--factory-port", str(factory_port), "--data-dir", str(tmp_path / "data"),
         "--redis-url", ""],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _started.append(demo)
    assert demo.stdout is not None
    output = []
    for line in demo.stdout:  # wait until it is serving
        output.append(line.decode())
        if "Press Ctrl-C" in output[-1]:
            break
    os.killpg(demo.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    rest, _ = demo.communicate(timeout=30)
    text = "".join(output) + rest.decode()
    assert demo.returncode == 0, text
    assert "Stopping ..." in text and "Traceback" not in text, text
    for port in (gateway_port, factory_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still served"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the tests that stop the demo: the first run trains the two demo
    tasks, the others reuse them (the demo finds the jobs that trained them), which saves time."""
    return tmp_path_factory.mktemp("demo-data")


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _start_demo(data_dir: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    gateway_port, factory_port = free_port(), free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--port", str(gateway_port),
         "--factory-port", str(factory_port), "--data-dir", str(data_dir), "--redis-url", ""],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _started.append(demo)
    return demo, gateway_port, factory_port


def _read_until(demo: subprocess.Popen[bytes], marker: str) -> str:
    assert demo.stdout is not None
    seen = []
    for line in demo.stdout:
        seen.append(line.decode())
        if marker in seen[-1]:
            return "".join(seen)
    raise AssertionError(f"the demo ended before {marker!r}: {''.join(seen)}")


def test_a_closed_terminal_sighup_stops_both_servers(demo_data: Path) -> None:
    """The servers run in sessions of their own, so the terminal's SIGHUP reaches only the demo;
    it used to die of it and leave them holding their ports (the next `make run` failed)."""
    demo, gateway_port, factory_port = _start_demo(demo_data)
    _read_until(demo, "Press Ctrl-C")
    demo.send_signal(signal.SIGHUP)
    demo.communicate(timeout=30)
    assert demo.returncode == 0
    for port in (gateway_port, factory_port):
        assert _port_closed(port), f"port {port} still served after SIGHUP"


def test_sigterm_during_start_up_stops_the_server_already_started(demo_data: Path) -> None:
    demo, gateway_port, factory_port = _start_demo(demo_data)
    _read_until(demo, "Training the demo tasks")  # the factory is up, the gateway is not
    demo.send_signal(signal.SIGTERM)
    rest, _ = demo.communicate(timeout=30)
    assert demo.returncode == 130, rest  # stopped before it was ready: interrupted
    assert "Stopping ..." in rest.decode() and "Traceback" not in rest.decode()
    for port in (gateway_port, factory_port):
        assert _port_closed(port), f"port {port} still served after SIGTERM"


def test_servers_do_not_outlive_a_demo_killed_outright(demo_data: Path) -> None:
    """SIGKILL runs no handler of the demo: the servers ask Linux to be stopped when it dies."""
    demo, gateway_port, factory_port = _start_demo(demo_data)
    _read_until(demo, "Press Ctrl-C")
    demo.kill()
    demo.communicate(timeout=30)
    deadline = time.monotonic() + 30  # the servers' own graceful shutdown, not a measurement
    while not (_port_closed(gateway_port) and _port_closed(factory_port)):
        assert time.monotonic() < deadline, "a server outlived the demo"
        time.sleep(0.1)
