"""The factory beyond one machine: metadata in SQL (SQLite or Postgres), blobs in a local directory
or S3, replicas that share both. Real peers on loopback ports: a Postgres made by `initdb`, moto's
S3 server; and a data directory written by the first (raw sqlite3) factory."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.factory.blobs import MANIFEST, BlobMissing, LocalBlobs, S3Blobs
from service.factory.migrations import runner as migrations
from service.factory.store import JobRecord, StaleStatus, Store, now
from tests.support.cluster import (
    S3,
    Postgres,
    aws_env,
    postgres_bin,
    running_postgres,
    running_s3,
)
from tests.support.factory import (
    LONG_JOB,
    REPO,
    FactoryClient,
    FactoryProcess,
    jsonl,
    running_factory,
    sentiment_rows,
)
from tests.support.waits import stretched

V1_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "factory-data-v1"
TEXTS = ["the film was wonderful", "the meal was awful"]

needs_postgres = pytest.mark.skipif(postgres_bin() is None,
                                    reason="Debian's postgresql package is not installed")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    if postgres_bin() is None:
        pytest.skip("Debian's postgresql package is not installed")
    with running_postgres(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with running_s3() as server, aws_env(server):
        yield server


def fresh_database(postgres: Postgres) -> str:
    """A database of its own for one test, on the shared server."""
    import psycopg

    name = f"t{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.url, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def queued_job(store: Store) -> str:
    stamp = now()
    job = JobRecord(id=str(uuid.uuid4()), created_at=stamp, modified_at=stamp, status="QUEUED",
                    model="local-ngram", suffix=None, fingerprint=uuid.uuid4().hex, doc={})
    store.add_job(job)
    return job.id


def race(stores: list[Store], job_ids: list[str], status: str,
         expect: tuple[str, ...]) -> dict[str, list[int]]:
    """Every store moves every job at once from the same start; who won each."""
    winners: dict[str, list[int]] = {job_id: [] for job_id in job_ids}
    barrier = threading.Barrier(len(stores))

    def work(index: int, store: Store) -> None:
        barrier.wait()
        for job_id in job_ids:
            try:
                store.update_job(job_id, status=status, expect=expect, replica=str(index))
            except StaleStatus:
                continue
            winners[job_id].append(index)

    threads = [threading.Thread(target=work, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return winners


# 1. Metadata in SQL.
def test_a_data_directory_of_the_first_factory_still_serves_its_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(V1_DATA, data)
    expected = orjson.loads((data / "expected.json").read_bytes())
    with sqlite3.connect(data / "factory.sqlite3") as db:  # the first factory's: no Alembic
        assert not db.execute("SELECT name FROM sqlite_master WHERE name = 'alembic_version'") \
            .fetchall()
    with running_factory(data) as server:
        client = FactoryClient(server.url)
        models = [m["id"] for m in client.http.get("/v1/models").json()["data"]]
        assert expected["model"] in models
        r = client.http.post("/v1/classifications",
                             json={"model": expected["model"], "input": TEXTS})
        assert r.status_code == 200, r.text
        assert r.json()["results"] == expected["classification"]
        job = client.job(expected["job"])
        assert job["status"] == "SUCCESS" and job["fine_tuned_model"] == expected["model"]
        content = client.http.get(f"/v1/files/{expected['file']}/content")
        assert content.status_code == 200 and content.content.count(b"\n") == 120
        # New work lands in the same database next to the old.
        assert client.train(jsonl(sentiment_rows(60, seed=3)))["status"] == "SUCCESS"
        client.close()
    store = Store(data)
    assert store.schema_revision() == migrations.head()
    assert len(store.list_models()) == 2
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=needs_postgres)])
def test_two_stores_on_one_database_never_both_take_or_end_a_job(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (fresh_database(request.getfixturevalue("postgres")) if backend == "postgres"
           else None)
    a = Store(tmp_path / "a", url or f"sqlite:///{tmp_path / 'shared.sqlite3'}")
    b = Store(tmp_path / "b", url or f"sqlite:///{tmp_path / 'shared.sqlite3'}")
    try:
        job_ids = [queued_job(a) for _ in range(25)]
        taken = race([a, b], job_ids, "VALIDATING", ("QUEUED",))
        assert all(len(w) == 1 for w in taken.values()), taken
        # Both replicas end every job: a finish and a cancel never both land.
        ended = race([a, b], job_ids, "FAILED", ("VALIDATING", "RUNNING"))
        assert all(len(w) == 1 for w in ended.values()), ended
        for job_id in job_ids:
            job = b.get_job(job_id)
            assert job is not None and job.status == "FAILED"
            statuses = [e["data"]["status"] for e in a.events(job_id)
                        if e["name"] == "status-updated"]
            assert statuses == ["QUEUED", "VALIDATING", "FAILED"]
            assert job.doc["replica"] == str(ended[job_id][0])  # the last writer's
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=needs_postgres)])
def test_a_lapsed_lease_is_taken_by_exactly_one_replica(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = (fresh_database(request.getfixturevalue("postgres")) if backend == "postgres"
           else f"sqlite:///{tmp_path / 'shared.sqlite3'}")
    stores = [Store(tmp_path / str(i), url) for i in range(3)]
    try:
        job_ids = [queued_job(stores[0]) for _ in range(10)]
        for job_id in job_ids:  # replica 0 works them all, with a lease that lapses at once
            stores[0].update_job(job_id, status="RUNNING", expect=("QUEUED",), owner="0",
                                 lease_s=0.0)
        # A live lease is nobody else's; its owner renews it.
        assert stores[0].take_lease(job_ids[0], "0", 60)
        assert not stores[1].take_lease(job_ids[0], "1", 60)
        assert stores[0].renew_leases(job_ids, "0", 60) == set(job_ids)
        assert stores[0].renew_leases(job_ids, "1", 60) == set()
        for job_id in job_ids[1:]:
            stores[0].update_job(job_id, owner="0", lease_s=-1.0)  # lapsed a second ago
        lapsed = {job.id: owner for job, owner in stores[1].lapsed_leases(["RUNNING"])}
        assert lapsed == {job_id: "0" for job_id in job_ids[1:]}
        winners: dict[str, list[int]] = {job_id: [] for job_id in job_ids[1:]}
        barrier = threading.Barrier(2)

        def take(index: int) -> None:
            barrier.wait()
            for job_id in job_ids[1:]:
                if stores[index].take_lease(job_id, str(index), 60, statuses=["RUNNING"]):
                    winners[job_id].append(index)

        threads = [threading.Thread(target=take, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(len(w) == 1 for w in winners.values()), winners
        # The old owner lost them: renewing says so, and it can no longer end them.
        assert stores[0].renew_leases(job_ids, "0", 60) == {job_ids[0]}
        with pytest.raises(StaleStatus):
            stores[0].update_job(job_ids[1], status="FAILED", expect=("RUNNING",), owner="0")
        winner = winners[job_ids[1]][0]
        done = stores[winner].update_job(job_ids[1], status="FAILED", expect=("RUNNING",),
                                         owner=str(winner))
        assert done.status == "FAILED"
        assert stores[0].lease(job_ids[1]) == (None, None)  # an ended job holds no lease
    finally:
        for store in stores:
            store.close()


@needs_postgres
def test_replicas_starting_together_on_an_empty_postgres_migrate_it_once(
        postgres: Postgres, tmp_path: Path) -> None:
    url = fresh_database(postgres)
    stores: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def open_store(index: int) -> None:
        barrier.wait()
        try:
            stores.append(Store(tmp_path / str(index), url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert {s.schema_revision() for s in stores} == {migrations.head()}
    assert len({s.workspace_id() for s in stores}) == 1
    for s in stores:
        s.close()


def test_a_wrong_database_url_stops_the_factory_with_one_line_naming_the_setting(
        tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "factory", "--data-dir", str(tmp_path),
         "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
             "FACTORY_DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/none"},
        capture_output=True, timeout=60, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "FACTORY_DATABASE_URL" in err and "Traceback" not in err, err
    assert "secret" not in err, err


def test_the_ray_executor_without_its_address_stops_the_factory_with_one_line(
        tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "factory", "--data-dir", str(tmp_path),
         "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "FACTORY_EXECUTOR": "ray"},
        capture_output=True, timeout=60, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "FACTORY_RAY_ADDRESS" in err and "Traceback" not in err, err


def test_an_unusable_ray_client_address_stops_the_factory_with_one_line(tmp_path: Path) -> None:
    """ray:// (Ray Client, as the k8s overlay has it) that nothing serves, and the same address
    where grpcio (Ray Client's transport, `ray[client]`) is missing: each is one line on stderr
    naming FACTORY_RAY_ADDRESS and what to do, exit 1. Before, the first also printed Ray's
    two-line UserWarning, and the second said the cluster could not be reached. Ray Client's
    retries (5 + 10 + 15 s by default) are cut to 1 s each here; both run at once."""
    hidden = tmp_path / "no-grpc" / "grpc"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ImportError('grpcio hidden by the test', name='grpc')\n")
    base = {"PATH": "/usr/bin:/bin", "FACTORY_EXECUTOR": "ray",
            "FACTORY_RAY_ADDRESS": "ray://127.0.0.1:1",  # nothing listens on port 1
            "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1",
            "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "1"}
    runs = [subprocess.Popen(
        [sys.executable, "-m", "service.cli", "factory", "--data-dir", str(tmp_path / name),
         "--port", "1"], env={**base, "PYTHONPATH": path}, stderr=subprocess.PIPE)
        for name, path in (("unreachable", str(REPO)),
                           ("no-grpc", f"{hidden.parent}:{REPO}"))]
    (unreachable, no_grpc) = (run.communicate(timeout=stretched(60))[1].decode() for run in runs)
    for run, err in zip(runs, (unreachable, no_grpc), strict=True):
        assert run.returncode == 1, err
        assert len(err.strip().splitlines()) == 1, err
        assert "FACTORY_RAY_ADDRESS='ray://127.0.0.1:1'" in err, err
    assert "cannot reach the Ray cluster" in unreachable and "reachable" in unreachable
    assert "ray[client]" in no_grpc and "cannot reach" not in no_grpc, no_grpc


# 2. Blobs in an object store.
def test_a_model_without_its_manifest_is_not_there(s3: S3, tmp_path: Path) -> None:
    blobs = S3Blobs(f"s3://{s3.bucket}/manifest-{uuid.uuid4().hex[:6]}", tmp_path / "cache")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_bytes(b"{}")
    (model / "weights.bin").write_bytes(b"x" * 1000)
    import obstore

    obstore.put(blobs.store, "models/half/model.json", model / "model.json")  # a crash, mid-way
    with pytest.raises(BlobMissing):
        blobs.local_dir("models/half")
    assert blobs.publish_dir("models/whole", model) == 1002
    other = S3Blobs(blobs.url, tmp_path / "other-cache")  # another replica
    fetched = other.local_dir("models/whole")
    assert (fetched / "weights.bin").read_bytes() == b"x" * 1000
    assert orjson.loads((fetched / MANIFEST).read_bytes())["bytes"] == 1002
    other.delete_dir("models/whole")
    with pytest.raises(BlobMissing):
        S3Blobs(blobs.url, tmp_path / "third-cache").local_dir("models/whole")


def test_the_local_store_publishes_with_a_manifest_and_reads_old_models(tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path)
    out = blobs.output_dir("models/j1")
    out.mkdir(parents=True)
    (out / "model.json").write_bytes(b"{}")
    assert blobs.publish_dir("models/j1", out) == 2
    assert (tmp_path / "models" / "j1" / MANIFEST).exists()
    (tmp_path / "models" / "old").mkdir()  # a model of the first factory: no manifest
    assert blobs.local_dir("models/old") == tmp_path / "models" / "old"


@needs_postgres
def test_a_replica_on_the_same_postgres_and_s3_serves_a_model_another_trained(
        postgres: Postgres, s3: S3, tmp_path: Path) -> None:
    database = fresh_database(postgres)
    storage = f"s3://{s3.bucket}/replicas"
    with running_factory(tmp_path / "a", database_url=database, storage_url=storage,
                         replica_id="a") as server:
        a = FactoryClient(server.url)
        replica = FactoryProcess(tmp_path / "b", env={
            **s3.env(), "FACTORY_DATABASE_URL": database, "FACTORY_STORAGE_URL": storage,
            "FACTORY_REPLICA_ID": "b"}).start()
        try:
            b = FactoryClient(replica.url)
            file = b.upload(jsonl(sentiment_rows(120)))  # upload to B, train on A
            job = a.wait(a.create_job(file["id"], suffix="cluster")["id"])
            assert job["status"] == "SUCCESS", job
            assert b.job(job["id"])["status"] == "SUCCESS"
            body = {"model": job["fine_tuned_model"], "input": TEXTS}
            on_a = a.http.post("/v1/classifications", json=body)
            on_b = b.http.post("/v1/classifications", json=body)
            assert on_a.status_code == on_b.status_code == 200, (on_a.text, on_b.text)
            assert on_b.json()["results"] == on_a.json()["results"]
            scores = on_b.json()["results"][0]["sentiment"]["scores"]
            assert scores["positive"] > scores["negative"]
            # Neither replica keeps metadata or blobs of record on its own disk.
            for data in (tmp_path / "a", tmp_path / "b"):
                assert not (data / "factory.sqlite3").exists()
                assert not list((data / "models").glob("*")) if (data / "models").exists() \
                    else True
            import obstore

            keys = {m["path"] for batch in obstore.list(
                S3Blobs(storage, tmp_path / "probe").store) for m in batch}
            assert f"models/{job['id']}/{MANIFEST}" in keys
            assert f"files/{file['id']}.jsonl" in keys
            # A delete on B is seen by A.
            assert b.http.delete(f"/v1/models/{job['fine_tuned_model']}").status_code == 200
            assert a.http.post("/v1/classifications", json=body).status_code == 404
            b.close()
        finally:
            replica.stop()
        a.close()


def test_the_model_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    """Two models that each fit but not together: the older one is evicted, then reloaded."""
    with running_factory(tmp_path / "data") as server:
        client = FactoryClient(server.url)
        first = client.train(jsonl(sentiment_rows(80, seed=1)))["fine_tuned_model"]
        second = client.train(jsonl(sentiment_rows(80, seed=2)))["fine_tuned_model"]
        app: Any = server.config.app
        catalog = app.state.factory.catalog
        for model in (first, second):
            r = client.http.post("/v1/classifications", json={"model": model, "input": TEXTS})
            assert r.status_code == 200, r.text
        both = catalog.loaded_bytes()
        assert set(catalog._loaded) == {first, second}
        catalog.capacity_bytes = both - 1
        catalog._loaded.pop(second)  # reload the second: over the bound now
        catalog._sizes.pop(second)
        r = client.http.post("/v1/classifications", json={"model": second, "input": TEXTS})
        assert r.status_code == 200
        assert list(catalog._loaded) == [second]
        assert 0 < catalog.loaded_bytes() < both
        client.close()



def test_a_cancel_on_one_replica_stops_the_training_on_the_other(tmp_path: Path) -> None:
    """Two replicas on one database and store (here a shared SQLite file and directory): B
    cancels the job A trains, A's trainer stops within seconds, and the job ends CANCELLED once."""
    shared = {"database_url": f"sqlite:///{tmp_path / 'shared.sqlite3'}",
              "storage_url": str(tmp_path / "blobs")}
    with running_factory(tmp_path / "a", replica_id="a", **shared) as server_a, \
            running_factory(tmp_path / "b", replica_id="b", **shared) as server_b:
        a, b = FactoryClient(server_a.url), FactoryClient(server_b.url)
        file = a.upload(jsonl(sentiment_rows(200)))
        created = a.create_job(file["id"], **LONG_JOB)
        a.wait(created["id"], statuses=("RUNNING",), timeout_s=30)
        r = b.http.post(f"/v1/fine_tuning/jobs/{created['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "CANCELLATION_REQUESTED", r.text
        job = b.wait(created["id"], timeout_s=15)
        assert job["status"] == "CANCELLED" and job["fine_tuned_model"] is None
        statuses = [e["data"]["status"] for e in job["events"] if e["name"] == "status-updated"]
        assert statuses[-2:] == ["CANCELLATION_REQUESTED", "CANCELLED"]
        assert statuses.count("CANCELLED") == 1
        assert not (tmp_path / "blobs" / "models" / created["id"]).exists()
        a.close()
        b.close()


def test_a_store_gone_mid_upload_is_a_503_and_what_is_loaded_still_answers(
        tmp_path: Path) -> None:
    with running_s3("gone") as gone, aws_env(gone), \
            running_factory(tmp_path / "data", storage_url="s3://gone/f") as server:
        client = FactoryClient(server.url)
        model = client.train(jsonl(sentiment_rows(80)))["fine_tuned_model"]
        body = {"model": model, "input": TEXTS}
        before = client.http.post("/v1/classifications", json=body)
        assert before.status_code == 200
        import obstore

        store = S3Blobs("s3://gone/f", tmp_path / "probe").store
        keys_before = {m["path"] for batch in obstore.list(store) for m in batch}
        # The bucket goes away (its endpoint stays up, so the failure is fast and certain).
        from tests.support.cluster import empty_and_remove_bucket

        empty_and_remove_bucket(gone)
        r = client.http.post("/v1/files", files={"file": ("late.jsonl", jsonl(
            sentiment_rows(10, seed=9)))}, data={"purpose": "fine-tune"})
        assert r.status_code == 503, r.text
        assert "could not be stored" in r.json()["message"], r.text
        files = client.http.get("/v1/files").json()["data"]
        assert [f["filename"] for f in files] == ["train.jsonl"]  # nothing half-recorded
        assert not list((tmp_path / "data" / "tmp").glob("*.part"))
        after = client.http.post("/v1/classifications", json=body)
        assert after.status_code == 200 and after.json()["results"] == before.json()["results"]
        assert keys_before  # the model had been published before the bucket went
        client.close()


# 3. Migration.
@needs_postgres
def test_migrate_moves_a_first_factory_data_directory_to_postgres_and_s3(
        postgres: Postgres, s3: S3, tmp_path: Path) -> None:
    data = tmp_path / "old"
    shutil.copytree(V1_DATA, data)
    expected = orjson.loads((data / "expected.json").read_bytes())
    database = fresh_database(postgres)
    storage = f"s3://{s3.bucket}/migrated"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "factory", "migrate", "--data-dir", str(data),
             "--to", database, "--storage", storage],
            capture_output=True, text=True, timeout=120, check=False, cwd=REPO)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "jobs: 1 row(s) copied" in first.stdout and "models: 1 row(s) copied" in first.stdout
    assert "blobs: 1 file(s) and 1 model(s)" in first.stdout, first.stdout
    again = run()  # idempotent: nothing new, nothing doubled
    assert again.returncode == 0 and "jobs: 0 row(s) copied, 1 already there" in again.stdout
    with running_factory(tmp_path / "new", database_url=database, storage_url=storage,
                         replica_id="m") as server:
        client = FactoryClient(server.url)
        r = client.http.post("/v1/classifications",
                             json={"model": expected["model"], "input": TEXTS})
        assert r.status_code == 200, r.text
        assert r.json()["results"] == expected["classification"]
        job = client.job(expected["job"])
        assert job["status"] == "SUCCESS"
        names = [e["data"]["status"] for e in job["events"] if e["name"] == "status-updated"]
        assert names[0] == "QUEUED" and names[-1] == "SUCCESS"
        content = client.http.get(f"/v1/files/{expected['file']}/content")
        assert content.content == (V1_DATA / "files" / f"{expected['file']}.jsonl").read_bytes()
        client.close()


@needs_postgres
def test_killing_the_supervising_replica_hands_its_job_to_the_other(
        postgres: Postgres, s3: S3, tmp_path: Path) -> None:
    """Two replicas on one Postgres and S3, the local executor: A trains, A is SIGKILLed (its
    trainer dies with it); B takes the lapsed lease and fails the job with a reason a user can
    act on. Never stuck RUNNING, no model half-visible."""
    database = fresh_database(postgres)
    storage = f"s3://{s3.bucket}/kill-{uuid.uuid4().hex[:6]}"
    shared = {**s3.env(), "FACTORY_DATABASE_URL": database, "FACTORY_STORAGE_URL": storage,
              "FACTORY_LEASE_S": "2"}
    a = FactoryProcess(tmp_path / "a", env={**shared, "FACTORY_REPLICA_ID": "a"}).start()
    b = FactoryProcess(tmp_path / "b", env={**shared, "FACTORY_REPLICA_ID": "b"}).start()
    try:
        on_a, on_b = FactoryClient(a.url), FactoryClient(b.url)
        file = on_b.upload(jsonl(sentiment_rows(200)))
        created = on_a.create_job(file["id"], **LONG_JOB)
        on_b.wait(created["id"], statuses=("RUNNING",), timeout_s=60)
        a.kill()
        job = on_b.wait(created["id"], timeout_s=60)
        assert job["status"] == "FAILED", job
        assert job["fine_tuned_model"] is None
        reason = job["error"]
        assert [e["data"].get("reason") for e in job["events"]
                if e["name"] == "status-updated"][-1] == reason
        assert "replica a" in reason and "create the job again" in reason, reason
        assert "FACTORY_EXECUTOR=local" in reason, reason
        assert all(m["id"] != created["id"] for m in on_b.http.get("/v1/models").json()["data"])
        import obstore

        keys = {m["path"] for batch in obstore.list(
            S3Blobs(storage, tmp_path / "probe").store) for m in batch}
        assert not [k for k in keys if k.startswith(f"models/{created['id']}/")], keys
        on_a.close()
        on_b.close()
    finally:
        a.stop()
        b.stop()
