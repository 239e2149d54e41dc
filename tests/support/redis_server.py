"""A real, private `redis-server` per test session (or per test), on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.waits import Deadline


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = Deadline(timeout_s)
    while not deadline.expired():
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {deadline.describe()}")


def terminate(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace_s`: every helper stops its
    processes this way, so that a hung one never outlives its test."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        terminate(self.process)

    def kill(self) -> None:
        """SIGKILL: what a crashed or partitioned Redis looks like to the gateway."""
        self.process.kill()
        self.process.wait(5)

    def restart(self) -> None:
        self.stop()
        self.process = _spawn(self.port, self.directory, self.extra_args)
        wait_for_port(self.port)


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: `apt-get install redis-server` "
                           "(the CI script .ci/run installs it)")
    return binary


def _spawn(port: int, directory: Path, extra_args: tuple[str, ...]) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def start_redis(directory: Path, *extra_args: str, port: int | None = None) -> RedisServer:
    port = port or free_port()
    process = _spawn(port, directory, extra_args)
    wait_for_port(port)
    return RedisServer(port=port, process=process, directory=directory, extra_args=extra_args)
