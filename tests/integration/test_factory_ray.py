"""The Ray executor, against a real Ray cluster (`ray start --head`) on 127.0.0.1.

Ray binds the machine's own address even with `--node-ip-address 127.0.0.1`
(ray-project/ray#26293), and test traffic here stays on loopback: so this test runs the Ray cases
(`ray_cases.py`: Ray, moto's S3, the factory replicas and the test code, one Ray cluster for them
all) inside a network namespace with nothing but a loopback interface
(tests/support/ray_cluster.py), deleted afterwards whatever happened.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support.ray_cluster import in_loopback_namespace
from tests.support.waits import stretched

CASES = Path(__file__).with_name("ray_cases.py")


def test_the_ray_executor_in_a_loopback_only_network_namespace() -> None:
    import ray  # the `cluster` extra: installed before entering the namespace

    assert ray.__version__
    done = in_loopback_namespace(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-s",
         "--durations=0", str(CASES)], timeout_s=stretched(420))
    print(done.stdout[-6000:])
    assert done.returncode == 0, f"{done.stdout[-12000:]}\n{done.stderr[-4000:]}"
