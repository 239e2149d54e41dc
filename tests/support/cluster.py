"""Real peers for the factory's cluster set-up, on loopback ports: a Postgres made with Debian's
`initdb` in a temporary directory, and an S3 endpoint (moto's server mode)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.redis_server import free_port, terminate, wait_for_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class Postgres:
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"postgresql://factory@127.0.0.1:{self.port}/factory"


@contextlib.contextmanager
def running_postgres(directory: Path) -> Iterator[Postgres]:
    """A throwaway Postgres cluster: trust auth, loopback only, no fsync (tests), database
    `factory` owned by user `factory`. Runs as the current user, or as `postgres` when that is
    root (initdb refuses root)."""
    bindir = postgres_bin()
    assert bindir is not None, "Debian's postgresql package is needed (apt-get install postgresql)"
    if os.geteuid() == 0:
        # pytest's temporary directories are private to root: the server's own lies in /tmp.
        own = Path(tempfile.mkdtemp(prefix="factory-pg-"))
        try:
            with running_postgres_in(bindir, own) as server:
                yield server
        finally:
            shutil.rmtree(own, ignore_errors=True)
        return
    with running_postgres_in(bindir, directory) as server:
        yield server


@contextlib.contextmanager
def running_postgres_in(bindir: Path, directory: Path) -> Iterator[Postgres]:
    data = directory / "pgdata"
    sockets = directory / "sockets"
    sockets.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
        shutil.chown(sockets, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    done = subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "factory",
                           "--auth=trust", "--no-sync", "-E", "UTF8"],
                          capture_output=True, check=False)
    assert done.returncode == 0, f"initdb failed: {done.stderr.decode()}"
    port = free_port()
    process = subprocess.Popen(
        [*as_user, str(bindir / "postgres"), "-D", str(data), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockets}",
         "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        stdout=subprocess.DEVNULL, stderr=(directory / "postgres.log").open("wb"))
    try:
        wait_for_port(port, timeout_s=30)
        for _ in range(100):  # the port opens a moment before connections are accepted
            done = subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1",
                                   "-p", str(port), "-U", "factory", "factory"],
                                  capture_output=True, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"createdb failed: {done.stderr.decode()}")
        yield Postgres(port, directory)
    finally:
        # A fast shutdown: SIGTERM (what terminate sends) waits for every client to leave.
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                        "stop"], capture_output=True, timeout=30, check=False)
        terminate(process)


@dataclass
class S3:
    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}


@contextlib.contextmanager
def running_s3(bucket: str = "factory") -> Iterator[S3]:
    """moto's S3 in server mode (a real HTTP endpoint) in this process, with one bucket."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        import httpx

        httpx.put(f"{endpoint}/{bucket}", timeout=10).raise_for_status()
        yield S3(endpoint, bucket)
    finally:
        server.stop()


def empty_and_remove_bucket(s3: S3) -> None:
    """Delete the bucket and everything in it: the store that a factory writes to is gone."""
    import httpx
    import obstore
    from obstore.store import S3Store

    store = S3Store(s3.bucket, config={"endpoint": s3.endpoint, "access_key_id": "testing",
                                       "secret_access_key": "testing", "region": "us-east-1"},
                    client_options={"allow_http": True})
    keys = [m["path"] for batch in obstore.list(store) for m in batch]
    if keys:
        obstore.delete(store, keys)
    httpx.delete(f"{s3.endpoint}/{s3.bucket}", timeout=10).raise_for_status()


@contextlib.contextmanager
def aws_env(s3: S3) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
