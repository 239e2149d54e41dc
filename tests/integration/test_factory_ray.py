"""The Ray executor, against a real Ray cluster (`ray start --head`) on 127.0.0.1.

Ray binds the machine's own address even with `--node-ip-address 127.0.0.1`
(ray-project/ray#26293), and test traffic here stays on loopback: so this test makes a network
namespace with nothing but a loopback interface, and runs the Ray cases
(`ray_cases.py`: Ray, moto's S3, the factory replicas and the test code, one Ray cluster for
them all) inside it with `ip netns exec`. The namespace is deleted afterwards, whatever happened;
the cases stop their Ray cluster themselves (by its process group, never `ray stop`, which would
stop every Ray of the machine), and whatever still runs in the namespace is stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.factory import REPO
from tests.support.waits import stretched

CASES = Path(__file__).with_name("ray_cases.py")


def test_the_ray_executor_in_a_loopback_only_network_namespace() -> None:
    assert os.geteuid() == 0, "network namespaces need root (ip netns add)"
    assert shutil.which("ip"), "iproute2's `ip` is needed (apt-get install iproute2)"
    import ray  # the `cluster` extra: installed before entering the namespace

    assert ray.__version__
    name = f"cgw-ray-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        done = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-m", "pytest", "-q", "-x",
             "-p", "no:cacheprovider", "-s", "--durations=0", str(CASES)],
            env={**os.environ, "PYTHONPATH": str(REPO), "CGW_RAY_NETNS": name}, cwd=REPO,
            capture_output=True, text=True, timeout=stretched(420), check=False)
        print(done.stdout[-6000:])
        assert done.returncode == 0, f"{done.stdout[-12000:]}\n{done.stderr[-4000:]}"
    finally:
        stop_everything_in(name)
        subprocess.run(["ip", "netns", "delete", name], check=False)


def stop_everything_in(name: str) -> None:
    """Whatever still runs in the namespace (a Ray process that outlived its group, after a
    failure): all of it was started by this test. SIGTERM, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), sig)
        if pids and sig == signal.SIGTERM:
            time.sleep(2)
