"""The blob store's upkeep: orphaned blobs swept (on the local store and on S3, moto's server),
at start and by `classifier-gateway factory gc`; a replica's disk copies of S3 models bounded in
bytes, least recently used out."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli import main
from service.factory.blobs import MANIFEST, Blobs, LocalBlobs, S3Blobs
from service.factory.gc import sweep
from service.factory.store import FileRecord, JobRecord, ModelRecord, Store, now
from tests.support.cluster import S3, aws_env, running_s3
from tests.support.factory import running_factory
from tests.support.waits import Deadline

HOUR = 3600


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with running_s3() as server, aws_env(server):
        yield server


def _source(directory: Path, size: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.json").write_bytes(b"{}")
    (directory / "weights.bin").write_bytes(b"x" * (size - 2))
    return directory


def _file(store: Store, tmp: Path, *, record: bool) -> str:
    file_id = f"file-{uuid.uuid4().hex[:8]}"
    source = tmp / f"{file_id}.upload"
    source.write_bytes(b'{"text": "a", "labels": {"t": "x"}}\n')
    store.blobs.put_file(store.file_key(file_id), source)
    if record:
        store.add_file(FileRecord(id=file_id, filename="f.jsonl", purpose="fine-tune", bytes=1,
                                  sha256=uuid.uuid4().hex, created_at=now(), num_lines=1,
                                  sample_type="pretrain", mimetype=None, visibility=None))
    return file_id


def _job(store: Store, status: str) -> str:
    stamp = now()
    job = JobRecord(id=str(uuid.uuid4()), created_at=stamp, modified_at=stamp, status=status,
                    model="local-ngram", suffix=None, fingerprint=uuid.uuid4().hex, doc={})
    store.add_job(job)
    return job.id


def _model(store: Store, tmp: Path, *, record: bool) -> str:
    job_id = _job(store, "SUCCESS")
    store.blobs.publish_dir(store.model_key(job_id), _source(tmp / job_id, 100))
    if record:
        store.add_model(ModelRecord(id=f"ft:{job_id}", job_id=job_id, root="local-ngram",
                                    created=now(), kind="text", doc={}))
    return job_id


def _keys(blobs: Blobs) -> set[str]:
    return {b.key for prefix in ("files/", "models/") for b in blobs.entries(prefix)}


def _store(kind: str, tmp: Path, s3: S3 | None) -> Store:
    data = tmp / "data"
    data.mkdir()
    blobs: Blobs = (LocalBlobs(data) if kind == "local"
                    else S3Blobs(f"s3://{s3.bucket if s3 else ''}/gc-{uuid.uuid4().hex[:8]}",
                                 data / "cache"))
    return Store(data, None, blobs)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_sweep_removes_only_old_unreferenced_blobs(kind: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    store = _store(kind, tmp_path, request.getfixturevalue("s3") if kind == "s3" else None)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    kept_file = _file(store, scratch, record=True)
    orphan_file = _file(store, scratch, record=False)  # crash between blob and row
    kept_model = _model(store, scratch, record=True)
    orphan_model = _model(store, scratch, record=False)  # crash between publish and record
    deleted_model = _model(store, scratch, record=True)
    record = store.delete_model(f"ft:{deleted_model}")  # crash between row and blobs' delete
    assert record is not None
    training = _job(store, "RUNNING")  # its model being written: no manifest yet, no record
    out = store.blobs.output_dir(store.model_key(training))
    _source(out, 50)
    if kind == "local":  # the local store's model is written in place
        assert {k for k in _keys(store.blobs) if k.startswith(f"models/{training}/")}
    before = _keys(store.blobs)

    young = sweep(store, min_age_s=HOUR)  # everything was written just now
    assert young.removed == [] and _keys(store.blobs) == before
    assert set(young.young) == {store.file_key(orphan_file), store.model_key(orphan_model),
                                store.model_key(deleted_model)}

    later = time.time() + 2 * HOUR
    dry = sweep(store, min_age_s=HOUR, now=later, dry_run=True)
    assert set(dry.removed) == set(young.young) and _keys(store.blobs) == before

    report = sweep(store, min_age_s=HOUR, now=later)
    assert sorted(report.removed) == sorted(young.young)
    manifest = len((store.blobs.local_dir(store.model_key(kept_model)) / MANIFEST).read_bytes())
    line = len(b'{"text": "a", "labels": {"t": "x"}}\n')
    assert report.bytes_removed == line + 2 * (100 + manifest)
    left = _keys(store.blobs)
    assert store.file_key(kept_file) in left and store.file_key(orphan_file) not in left
    assert not [k for k in left if k.startswith((f"models/{orphan_model}/",
                                                 f"models/{deleted_model}/"))]
    assert f"models/{kept_model}/{MANIFEST}" in left
    assert (store.blobs.local_dir(store.model_key(kept_model)) / "weights.bin").exists()
    assert store.file_path(kept_file).exists()
    store.close()


def _age(path: Path, seconds: float) -> None:
    """Make a local blob (a file, or every file of a directory) `seconds` old."""
    stamp = time.time() - seconds
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(item, (stamp, stamp))


def test_factory_gc_command_and_the_start_up_sweep(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    store = Store(data, None, LocalBlobs(data))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    kept = _file(store, scratch, record=True)
    orphans = [_file(store, scratch, record=False) for _ in range(2)]
    young = _file(store, scratch, record=False)
    (data / "tmp" / "upload-crashed").write_bytes(b"half")  # a crashed upload's scratch file
    store.close()
    for path in [data / "files" / f"{f}.jsonl" for f in [kept, *orphans]] + \
            [data / "tmp" / "upload-crashed"]:
        _age(path, 2 * HOUR)

    def gc(*args: str) -> tuple[int, str, str]:
        code = main(["factory", "gc", "--data-dir", str(data), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = gc("--dry-run")
    assert code == 0, err
    assert f"would remove files/{orphans[0]}.jsonl" in out
    assert "would remove tmp/upload-crashed" in out
    assert (data / "files" / f"{orphans[0]}.jsonl").exists()
    code, out, err = gc()
    assert code == 0, err
    assert "3 orphan(s) removed" in out and "1 unreferenced but younger" in out
    assert not (data / "files" / f"{orphans[0]}.jsonl").exists()
    assert not (data / "tmp" / "upload-crashed").exists()
    assert (data / "files" / f"{kept}.jsonl").exists()
    assert (data / "files" / f"{young}.jsonl").exists()
    code, out, err = gc("--min-age", "-1")
    assert code == 1 and "--min-age must be 0 or more" in err

    # A factory sweeps at start: the young orphan, aged now, goes; the referenced file stays.
    _age(data / "files" / f"{young}.jsonl", 2 * HOUR)
    with running_factory(data):
        deadline = Deadline(30)
        while (data / "files" / f"{young}.jsonl").exists():
            assert not deadline.expired(), f"the start-up sweep left it ({deadline.describe()})"
            time.sleep(0.05)
    assert (data / "files" / f"{kept}.jsonl").exists()


def test_the_disk_copies_of_s3_models_are_bounded_least_recently_used_out(
        s3: S3, tmp_path: Path) -> None:
    url = f"s3://{s3.bucket}/cache-{uuid.uuid4().hex[:8]}"
    writer = S3Blobs(url, tmp_path / "writer")
    for name in ("m1", "m2", "m3"):
        writer.publish_dir(f"models/{name}", _source(tmp_path / "src" / name, 1000))
    # Room for two models of 1000 bytes, not three.
    reader = S3Blobs(url, tmp_path / "reader", cache_bytes=2500)

    def cached() -> set[str]:
        return {prefix for prefix, _, _ in reader.cached_models()}

    reader.local_dir("models/m1")
    reader.local_dir("models/m2")
    assert cached() == {"models/m1", "models/m2"}
    reader.local_dir("models/m1")  # m1 used again: m2 is now the least recently used
    reader.local_dir("models/m3")
    assert cached() == {"models/m1", "models/m3"}
    with reader.pinned("models/m2") as m2:  # fetched again; m1 is the oldest now
        assert cached() == {"models/m3", "models/m2"}
        reader.local_dir("models/m1")  # over the bound: m2 is pinned, m3 goes
        assert cached() == {"models/m2", "models/m1"}
        assert (m2 / "weights.bin").stat().st_size == 998
    assert sum(size for _, size, _ in reader.cached_models()) <= 2500
    # Nothing is lost: an evicted model is fetched again, whole.
    assert (reader.local_dir("models/m3") / "weights.bin").read_bytes() == b"x" * 998
    assert not list((tmp_path / "reader" / "tmp").iterdir())  # evictions leave nothing behind
