"""Real Redis topologies for cache tests: a 3-master Redis Cluster, and a master watched by Sentinel.

Every process binds loopback on free ports (the cluster bus port is set explicitly with
`cluster-port`, since the default port + 10000 can fall outside the port range).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.support.redis_server import (
    RedisServer,
    free_port,
    redis_server_binary,
    start_redis,
    wait_for_port,
)


def redis_cli_binary() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RuntimeError("redis-cli is not installed: `apt-get install redis-tools` (it comes "
                           "with redis-server; the CI script .ci/run installs it)")
    return binary


@dataclass
class RedisCluster:
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(directory: Path, masters: int = 3, timeout_s: float = 20.0) -> RedisCluster:
    """`masters` cluster-enabled redis-servers joined by `redis-cli --cluster create`, ready to use."""
    cluster = RedisCluster()
    try:
        for index in range(masters):
            node_dir = directory / f"node{index}"
            cluster.nodes.append(start_redis(
                node_dir, "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ))
        subprocess.run(
            [redis_cli_binary(), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        for node in cluster.nodes:
            client = redis.Redis(port=node.port, socket_timeout=2)
            try:
                while client.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"Redis Cluster not ok after {timeout_s}s")
                    time.sleep(0.05)
            finally:
                client.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class SentinelSetup:
    master: RedisServer
    sentinel_port: int
    sentinel: subprocess.Popen[bytes]
    service: str = "mymaster"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"

    def stop(self) -> None:
        if self.sentinel.poll() is None:
            self.sentinel.terminate()
            try:
                self.sentinel.wait(5)
            except subprocess.TimeoutExpired:
                self.sentinel.kill()
                self.sentinel.wait(5)
        self.master.stop()


def start_sentinel(directory: Path, service: str = "mymaster",
                   timeout_s: float = 10.0) -> SentinelSetup:
    """One master and one `redis-server --sentinel` monitoring it (quorum 1)."""
    master = start_redis(directory / "master")
    port = free_port()
    sentinel_dir = directory / "sentinel"
    sentinel_dir.mkdir(parents=True, exist_ok=True)
    config = sentinel_dir / "sentinel.conf"  # Sentinel rewrites its config: must be writable
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {sentinel_dir}\n"
        f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
        f"sentinel down-after-milliseconds {service} 5000\n"
    )
    process = subprocess.Popen([redis_server_binary(), str(config), "--sentinel"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    setup = SentinelSetup(master=master, sentinel_port=port, sentinel=process, service=service)
    try:
        wait_for_port(port, timeout_s)
        client = redis.Redis(port=port, socket_timeout=2)
        try:
            deadline = time.monotonic() + timeout_s
            while client.sentinel_get_master_addr_by_name(service) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Sentinel does not know {service} after {timeout_s}s")
                time.sleep(0.05)
        finally:
            client.close()
    except BaseException:
        setup.stop()
        raise
    return setup
