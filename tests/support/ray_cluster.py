"""A real Ray cluster for the tests and the bench, inside a network namespace of its own.

Ray binds the machine's own address even with `--node-ip-address 127.0.0.1`
(ray-project/ray#26293); traffic of tests and benches stays on loopback. So whoever needs Ray
re-runs itself inside a fresh namespace with only a loopback interface (`in_loopback_namespace`),
and there starts `ray start --head --block` in a process group of its own (`running_ray`), which
it stops by that group (never `ray stop`, which would stop every Ray of the machine).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.support.redis_server import wait_for_port
from tests.support.waits import Deadline

#: Set inside the namespace: its name.
NETNS_ENV = "CGW_RAY_NETNS"
NAMESPACE = "classifier-factory"
GCS_PORT = 6379  # the network namespace is ours alone: Ray's default ports are free in it
#: Ray Client's server (`ray://`), started by the head. Fixed rather than picked free: the
#: namespace is this process's alone (one per pytest worker, named by its pid: two workers never
#: share it), and 10001 lies outside every range Ray's own processes bind in it (its workers
#: 10002-19999, Ray Client's per-client servers 23000-23999, and Linux's ephemeral ports
#: 32768-60999 that its other processes get from the kernel), so nothing else takes it; a port
#: picked free before `ray start` is an ephemeral one, which one of those could take before the
#: client server binds it. `running_ray` still checks that it is free, with a clear error.
RAY_CLIENT_PORT = 10001
REPO = Path(__file__).resolve().parents[2]
#: For the head's Ray Client server, which forks (then execs) one server per client while its own
#: gRPC threads run: with gRPC's fork support on, the child ran gRPC's after-fork handlers, started
#: gRPC threads and died of SIGSEGV before its exec (strace; empty ray_client_server_23000.err),
#: and the client got 'Starting Ray client server failed' (1 of the first 3 connections here, 7
#: Dec; ray-project/ray#63202 reports ~7%). Fork support is for a fork without exec; off, the
#: child only execs, and gRPC says "skipping fork() handlers" no more. The k8s RayCluster's head
#: sets the same (deploy/k8s/components/factory-cluster/raycluster.yaml).
RAY_CLIENT_FORK_FIX = {"GRPC_ENABLE_FORK_SUPPORT": "false"}


def in_loopback_namespace(argv: Sequence[str], env: Mapping[str, str] | None = None,
                          timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside a new network namespace that has only `lo` (up), then stop whatever
    still runs in it and delete it. Needs root; install everything before (nothing outside is
    reachable from inside)."""
    assert os.geteuid() == 0, "network namespaces need root (ip netns add)"
    assert shutil.which("ip"), "iproute2's `ip` is needed (apt-get install iproute2)"
    name = f"cgw-ray-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        done = subprocess.run(
            ["ip", "netns", "exec", name, *argv],
            env={**os.environ, "PYTHONPATH": str(REPO), NETNS_ENV: name, **(env or {})},
            cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
        log = ray_dir(name) / "ray-start.log"
        if done.returncode != 0 and log.exists():  # what Ray said, for the failure message
            done.stdout += "\n--- ray start ---\n" + log.read_text(errors="replace")[-4000:]
        if done.returncode != 0:
            done.stdout += client_server_logs(name)
        return done
    finally:
        _stop_everything_in(name)
        subprocess.run(["ip", "netns", "delete", name], check=False)
        shutil.rmtree(ray_dir(name), ignore_errors=True)


def ray_dir(netns: str) -> Path:
    """Ray's temporary directory for the namespace (short: Ray's unix sockets live under it)."""
    return Path("/tmp") / netns


def client_server_logs(netns: str, tail: int = 1500) -> str:
    """The end of each Ray Client server log of the namespace's Ray (`ray_client_server.*`: the
    proxy on RAY_CLIENT_PORT; `ray_client_server_<port>.*`: the server it starts per client),
    for a failure message: Ray's own error only names these files, which go with the namespace."""
    logs = sorted((ray_dir(netns) / "session_latest" / "logs").glob("ray_client_server*"))
    return "".join(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-tail:]}"
                   for log in logs if log.stat().st_size)


def _stop_everything_in(name: str) -> None:
    """Whatever still runs in the namespace (a Ray process that outlived its group, after a
    failure): all of it was started by us. SIGTERM, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
        if pids and sig == signal.SIGTERM:
            time.sleep(2)


@contextlib.contextmanager
def running_ray(env: Mapping[str, str], num_cpus: int = 2) -> Iterator[str]:
    """`ray start --head` on 127.0.0.1 (inside the namespace), connected as this process's
    driver; yields its address. Its workers get `env` (the store's credentials) and import
    `service` from the repository."""
    import ray

    assert os.environ.get(NETNS_ENV), "start Ray only inside in_loopback_namespace"
    temp = ray_dir(os.environ[NETNS_ENV])
    temp.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:  # Ray would fail later, and less clearly
        try:
            probe.bind(("127.0.0.1", RAY_CLIENT_PORT))
        except OSError as exc:
            raise AssertionError(f"RAY_CLIENT_PORT {RAY_CLIENT_PORT} is taken in the namespace "
                                 f"{os.environ[NETNS_ENV]} ({exc}): only this Ray may run in "
                                 "it; see `ss -ltnp` there") from None
    log = (temp / "ray-start.log").open("wb")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(GCS_PORT),
         "--ray-client-server-port", str(RAY_CLIENT_PORT), "--num-cpus",
         str(num_cpus), "--num-gpus", "0", "--include-dashboard=false",
         "--disable-usage-stats", "--temp-dir", str(temp)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO), **RAY_CLIENT_FORK_FIX}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{GCS_PORT}"
    try:
        wait_for_port(GCS_PORT, timeout_s=60)
        deadline = Deadline(60)
        while True:  # the GCS answers a moment before the head node has registered
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
                break
            except ConnectionError:
                if deadline.expired():
                    raise
                time.sleep(0.5)
        yield address
    finally:
        ray.shutdown()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # workers left in the group
            os.killpg(process.pid, signal.SIGKILL)
        log.close()  # the directory goes with the namespace (in_loopback_namespace)


def ray_client_address(seconds: float = 60) -> str:
    """The `ray://` address of `running_ray`'s head, once its Ray Client server listens. The head
    starts that server after the GCS, and the server first waits for the head node to register
    (Ray allows it 30 s), so it may listen well after `running_ray`'s driver connected: a client
    that does not wait for it races it. `seconds` stretch with the load, like every wait here."""
    try:
        importlib.import_module("grpc")
    except ImportError:
        raise AssertionError("Ray Client (ray://) needs grpcio, and without it `ray start "
                             "--head` serves no Ray Client: install the lock's dev extra "
                             "(requirements/dev.txt has grpcio)") from None
    try:
        wait_for_port(RAY_CLIENT_PORT, timeout_s=seconds)
    except TimeoutError as exc:
        raise AssertionError(f"Ray Client's server is not up: {exc}"
                             f"{client_server_logs(os.environ[NETNS_ENV])}") from None
    return f"ray://127.0.0.1:{RAY_CLIENT_PORT}"
