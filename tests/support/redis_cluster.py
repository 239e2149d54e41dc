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
    terminate,
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

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        """Until every node reports cluster_state:ok (all slots served)."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            client = redis.Redis(port=node.port, socket_timeout=2)
            try:
                while client.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"Redis Cluster not ok after {timeout_s}s")
                    time.sleep(0.05)
            finally:
                client.close()

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
        cluster.wait_ok(timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class SentinelSetup:
    master: RedisServer
    sentinel_port: int
    sentinel: subprocess.Popen[bytes] | None = None
    service: str = "mymaster"
    replicas: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"

    def master_port(self) -> int | None:
        """The master as clients see it: `SENTINEL MASTER`, which redis-py reads (it switches only
        at +switch-master, after `get-master-addr-by-name` already names the promoted replica)."""
        client = redis.Redis(port=self.sentinel_port, socket_timeout=2)
        try:
            state = client.sentinel_master(self.service)
        except redis.ResponseError:  # not monitored (yet)
            return None
        finally:
            client.close()
        if not isinstance(state, dict) or not state.get("is_master") or state.get("is_sdown") \
                or state.get("is_odown"):
            return None
        return int(state["port"])

    def kill_master(self, timeout_s: float = 15.0) -> RedisServer:
        """SIGKILL the current master; returns the replica Sentinel promoted in its place."""
        old = self.master_port()
        servers = [self.master, *self.replicas]
        candidates = [r for r in servers if r.port != old]
        if not candidates:
            raise RuntimeError("a failover needs a replica: start_sentinel(..., replicas=1)")
        deadline = time.monotonic() + timeout_s
        for replica in candidates:  # a replica that never synced cannot be promoted
            client = redis.Redis(port=replica.port, socket_timeout=2, decode_responses=True)
            try:
                while client.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"replica {replica.port} not in sync")
                    time.sleep(0.02)
            finally:
                client.close()
        # Replication is asynchronous: a write the master acknowledged may not have reached the
        # replica yet, and a failover would lose it. WAIT until every replica has it, as an
        # operator would before a planned failover, so that the test sees the failover, not
        # that race.
        dying = next(r for r in servers if r.port == old)
        master = redis.Redis(port=dying.port, socket_timeout=6)
        try:
            master.wait(len(candidates), 5000)
        finally:
            master.close()
        dying.kill()
        while (new := self.master_port()) in (old, None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Sentinel did not fail over within {timeout_s}s")
            time.sleep(0.05)
        promoted = next(r for r in candidates if r.port == new)
        client = redis.Redis(port=promoted.port, socket_timeout=2, decode_responses=True)
        try:
            while client.info("replication")["role"] != "master":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{promoted.port} was not promoted within {timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()
        return promoted

    def stop(self) -> None:
        if self.sentinel is not None:
            terminate(self.sentinel)
        for replica in self.replicas:
            replica.stop()
        self.master.stop()


def start_sentinel(directory: Path, service: str = "mymaster", replicas: int = 0,
                   down_after_ms: int = 5000, timeout_s: float = 10.0) -> SentinelSetup:
    """One master (and `replicas` replicas of it) and one `redis-server --sentinel` (quorum 1).

    `down_after_ms`: how long the master must be silent before Sentinel fails over.
    """
    # No diskless-sync delay: a replica is in sync in milliseconds instead of 5 s.
    master = start_redis(directory / "master", "--repl-diskless-sync-delay", "0")
    setup = SentinelSetup(master=master, sentinel_port=free_port(), service=service)
    try:
        for index in range(replicas):
            setup.replicas.append(start_redis(
                directory / f"replica{index}", "--replicaof", "127.0.0.1", str(master.port),
                "--repl-diskless-sync-delay", "0",
            ))
        sentinel_dir = directory / "sentinel"
        sentinel_dir.mkdir(parents=True, exist_ok=True)
        config = sentinel_dir / "sentinel.conf"  # Sentinel rewrites its config: must be writable
        config.write_text(
            f"port {setup.sentinel_port}\nbind 127.0.0.1\ndir {sentinel_dir}\n"
            f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            + "".join(f"sentinel known-replica {service} 127.0.0.1 {r.port}\n"
                      for r in setup.replicas)
        )
        setup.sentinel = subprocess.Popen([redis_server_binary(), str(config), "--sentinel"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(setup.sentinel_port, timeout_s)
        deadline = time.monotonic() + timeout_s
        while setup.master_port() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Sentinel does not know {service} after {timeout_s}s")
            time.sleep(0.05)
    except BaseException:
        setup.stop()
        raise
    return setup
