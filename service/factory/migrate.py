"""`classifier-gateway factory migrate`: copy a data directory's metadata and blobs into another
set-up (typically Postgres + S3), losing nothing and saying what moved.

Blobs go first (each model published whole, with its manifest), rows after, in one transaction
per table: a model's record arrives only once its files are in the target store. Rows whose key is
already in the target are left as they are, so a migration that stopped half-way (or one run
twice) can simply be run again; the events of a job are copied with the job, in their order.
The source is only read. Model ids keep their workspace segment: the target takes the source's
workspace id when it has none yet.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from service.factory.blobs import BlobMissing, open_blobs
from service.factory.store import Store

#: Tables in the order they are copied, with their key columns.
KEYS: dict[str, tuple[str, ...]] = {
    "files": ("id",), "jobs": ("id",), "checkpoints": ("job_id", "step_number"),
    "models": ("id",),
}


@dataclass
class MigrationReport:
    rows: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    files: int = 0
    models: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{table}: {n} row(s) copied, {self.skipped.get(table, 0)} already there"
               for table, n in self.rows.items()]
        out.append(f"blobs: {self.files} file(s) and {self.models} model(s), {self.bytes} bytes")
        out += [f"missing in the source, not copied: {m}" for m in self.missing]
        return out


def migrate(data_dir: Path, to_url: str | None, storage_url: str | None) -> MigrationReport:
    """Copy `data_dir` (a factory's data directory, read only) into the database `to_url` and
    the blob store `storage_url` (either unset: the default of a factory on a fresh data
    directory is not a target, so at least one must be set)."""
    if not to_url and not storage_url:
        raise ValueError("say where to: --to postgresql://... and/or --storage s3://...")
    if not (data_dir / "factory.sqlite3").exists():
        raise FileNotFoundError(f"{data_dir} holds no factory.sqlite3: not a factory data "
                                "directory")
    report = MigrationReport()
    scratch = Path(tempfile.mkdtemp(prefix="factory-migrate-"))
    source = Store(data_dir)
    try:
        target_blobs = open_blobs(storage_url, scratch) if storage_url else source.blobs
        target_blobs.check()
        target = Store(scratch, to_url, target_blobs) if to_url else Store(
            scratch, f"sqlite:///{data_dir / 'factory.sqlite3'}", target_blobs)
        try:
            if storage_url:
                _copy_blobs(source, target, report)
            if to_url:
                _copy_rows(source, target, report)
        finally:
            target.close()
    finally:
        source.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _copy_blobs(source: Store, target: Store, report: MigrationReport) -> None:
    for record in _all_files(source):
        try:
            path = source.blobs.local_file(source.file_key(record))
            if not path.exists():
                raise BlobMissing(str(path))
        except BlobMissing:
            report.missing.append(f"file {record}")
            continue
        copy = target.tmp_dir() / f"{record}.jsonl"
        shutil.copyfile(path, copy)
        report.bytes += copy.stat().st_size
        target.blobs.put_file(target.file_key(record), copy)
        report.files += 1
    for model in source.list_models():
        try:
            path = source.blobs.local_dir(source.model_key(model.job_id))
        except BlobMissing:
            report.missing.append(f"model {model.id}")
            continue
        report.bytes += target.blobs.publish_dir(target.model_key(model.job_id), path)
        report.models += 1


def _all_files(store: Store) -> list[str]:
    files = store.tables["files"]
    with store.engine.connect() as db:
        return [str(r[0]) for r in db.execute(sa.select(files.c.id).where(files.c.deleted == 0))]


def _copy_rows(source: Store, target: Store, report: MigrationReport) -> None:
    src, dst = source.tables, target.tables
    with source.engine.connect() as read, target.engine.begin() as write:
        workspace = read.execute(sa.select(src["meta"].c.value)
                                 .where(src["meta"].c.key == "workspace")).first()
        there = write.execute(sa.select(dst["meta"].c.value)
                              .where(dst["meta"].c.key == "workspace")).first()
        if workspace is not None and there is None:
            write.execute(sa.insert(dst["meta"]).values(key="workspace", value=workspace[0]))
        for name, key in KEYS.items():
            table = src[name]
            columns = [c.name for c in table.columns]
            existing = {tuple(r) for r in write.execute(
                sa.select(*[dst[name].c[k] for k in key]))}
            rows = [dict(r) for r in read.execute(
                sa.select(table).order_by(sa.literal_column("rowid"))).mappings()]
            new = [{c: row[c] for c in columns} for row in rows
                   if tuple(row[k] for k in key) not in existing]
            if new:
                write.execute(sa.insert(dst[name]), new)
            report.rows[name] = len(new)
            report.skipped[name] = len(rows) - len(new)
            if name == "jobs":
                _copy_events(read, write, source, target,
                             [str(r["id"]) for r in new], report)


def _copy_events(read: sa.Connection, write: sa.Connection, source: Store, target: Store,
                 job_ids: list[str], report: MigrationReport) -> None:
    """The events of the jobs copied now (a job already there kept its own), in order."""
    src, dst = source.tables["events"], target.tables["events"]
    rows = [] if not job_ids else [
        {"job_id": r["job_id"], "name": r["name"], "data": r["data"],
         "created_at": r["created_at"]}
        for r in read.execute(sa.select(src).where(src.c.job_id.in_(job_ids))
                              .order_by(src.c.seq)).mappings()]
    if rows:
        write.execute(sa.insert(dst), rows)
    report.rows["events"] = len(rows)
