"""Everything the factory must not lose: SQLite for metadata, plain files on disk for blobs.

Layout of the data directory:
    factory.sqlite3        files, jobs, events, checkpoints, models, meta
    files/<file id>.jsonl  uploaded files, as uploaded
    models/<job id>/       a trained model (`model.json` + `weights.npz`), written atomically
    jobs/<job id>/         the trainer's spec and log

Every call is short (one statement or a small transaction), so the event loop may call it directly;
a lock makes the one connection safe for the worker threads that also record progress.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL, created_at INTEGER NOT NULL, num_lines INTEGER, sample_type TEXT NOT NULL,
    mimetype TEXT, visibility TEXT, deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_by_content ON files (filename, sha256);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, modified_at INTEGER NOT NULL,
    status TEXT NOT NULL, model TEXT NOT NULL, suffix TEXT, fingerprint TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, name TEXT NOT NULL,
    data TEXT, created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL, step_number INTEGER NOT NULL, metrics TEXT NOT NULL,
    created_at INTEGER NOT NULL, PRIMARY KEY (job_id, step_number)
);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, root TEXT NOT NULL, created INTEGER NOT NULL,
    kind TEXT NOT NULL, doc TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
);
"""


def now() -> int:
    return int(time.time())


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int
    num_lines: int | None
    sample_type: str
    mimetype: str | None
    visibility: str | None
    deleted: bool = False


@dataclass
class JobRecord:
    id: str
    created_at: int
    modified_at: int
    status: str
    model: str
    suffix: str | None
    fingerprint: str
    doc: dict[str, Any]


@dataclass
class ModelRecord:
    id: str
    job_id: str
    root: str
    created: int
    kind: str
    doc: dict[str, Any]
    deleted: bool = False


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        for sub in ("files", "models", "jobs", "tmp"):
            (data_dir / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "factory.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    # Paths.
    def file_path(self, file_id: str) -> Path:
        return self.data_dir / "files" / f"{file_id}.jsonl"

    def model_dir(self, job_id: str) -> Path:
        return self.data_dir / "models" / job_id

    def job_dir(self, job_id: str) -> Path:
        path = self.data_dir / "jobs" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    # Meta.
    def workspace_id(self) -> str:
        """Eight hex digits, fixed for this data directory: the 'workspace' segment of model ids."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'workspace'").fetchone()
            if row is not None:
                return str(row["value"])
            value = secrets.token_hex(4)
            db.execute("INSERT INTO meta (key, value) VALUES ('workspace', ?)", (value,))
            return value

    # Files.
    def add_file(self, record: FileRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO files (id, filename, purpose, bytes, sha256, created_at, num_lines, "
                "sample_type, mimetype, visibility, deleted) VALUES (?,?,?,?,?,?,?,?,?,?,0)",
                (record.id, record.filename, record.purpose, record.bytes, record.sha256,
                 record.created_at, record.num_lines, record.sample_type, record.mimetype,
                 record.visibility),
            )

    def get_file(self, file_id: str, *, include_deleted: bool = False) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows or (rows[0]["deleted"] and not include_deleted):
            return None
        return _file(rows[0])

    def find_file(self, filename: str, sha256: str, purpose: str) -> FileRecord | None:
        rows = self._query(
            "SELECT * FROM files WHERE filename = ? AND sha256 = ? AND purpose = ? AND deleted = 0 "
            "ORDER BY created_at LIMIT 1", (filename, sha256, purpose))
        return _file(rows[0]) if rows else None

    def list_files(self, *, page: int, page_size: int, purpose: str | None = None,
                   search: str | None = None,
                   sample_types: Sequence[str] | None = None) -> tuple[list[FileRecord], int]:
        where: list[str] = ["deleted = 0"]
        params: list[Any] = []
        if purpose:
            where.append("purpose = ?")
            params.append(purpose)
        if search:
            where.append("(filename LIKE ? OR id LIKE ?)")
            params += [f"%{search}%", f"%{search}%"]
        if sample_types:
            where.append(f"sample_type IN ({','.join('?' * len(sample_types))})")
            params += list(sample_types)
        clause = " AND ".join(where)
        total = int(self._query(f"SELECT COUNT(*) AS n FROM files WHERE {clause}", params)[0]["n"])
        rows = self._query(
            f"SELECT * FROM files WHERE {clause} ORDER BY created_at DESC, rowid DESC "
            "LIMIT ? OFFSET ?", [*params, page_size, page * page_size])
        return [_file(r) for r in rows], total

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            changed = db.execute("UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0",
                                 (file_id,)).rowcount
        if changed:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(changed)

    # Jobs.
    def add_job(self, job: JobRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, created_at, modified_at, status, model, suffix, fingerprint, "
                "doc) VALUES (?,?,?,?,?,?,?,?)",
                (job.id, job.created_at, job.modified_at, job.status, job.model, job.suffix,
                 job.fingerprint, orjson.dumps(job.doc).decode()),
            )
            _event(db, job.id, "status-updated", {"status": job.status}, job.created_at)

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def update_job(self, job_id: str, *, status: str | None = None,
                   event_data: dict[str, Any] | None = None, **doc: Any) -> JobRecord:
        """Change a job's status and/or document fields in one transaction; a status change is
        recorded as a `status-updated` event (with `event_data` merged into its data)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            job = _job(row)
            job.doc.update(doc)
            stamp = now()
            if status is not None and status != job.status:
                job.status = status
                _event(db, job_id, "status-updated", {"status": status, **(event_data or {})},
                       stamp)
            job.modified_at = stamp
            db.execute("UPDATE jobs SET status = ?, modified_at = ?, doc = ? WHERE id = ?",
                       (job.status, stamp, orjson.dumps(job.doc).decode(), job_id))
            return job

    def add_event(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        with self._tx() as db:
            _event(db, job_id, name, data, now())

    def list_jobs(self, *, page: int, page_size: int, model: str | None = None,
                  status: str | None = None, suffix: str | None = None,
                  created_after: int | None = None,
                  created_before: int | None = None) -> tuple[list[JobRecord], int]:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        for column, value in (("model", model), ("status", status), ("suffix", suffix)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if created_after is not None:
            where.append("created_at >= ?")
            params.append(created_after)
        if created_before is not None:
            where.append("created_at <= ?")
            params.append(created_before)
        clause = " AND ".join(where)
        total = int(self._query(f"SELECT COUNT(*) AS n FROM jobs WHERE {clause}", params)[0]["n"])
        rows = self._query(
            f"SELECT * FROM jobs WHERE {clause} ORDER BY created_at DESC, rowid DESC "
            "LIMIT ? OFFSET ?", [*params, page_size, page * page_size])
        return [_job(r) for r in rows], total

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        rows = self._query(
            f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(statuses))}) "
            "ORDER BY created_at, rowid", statuses)
        return [_job(r) for r in rows]

    def find_active_job(self, fingerprint: str, statuses: Sequence[str]) -> JobRecord | None:
        rows = self._query(
            f"SELECT * FROM jobs WHERE fingerprint = ? AND status IN "
            f"({','.join('?' * len(statuses))}) LIMIT 1", [fingerprint, *statuses])
        return _job(rows[0]) if rows else None

    def events(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT name, data, created_at FROM events WHERE job_id = ? ORDER BY seq",
                           (job_id,))
        return [{"name": r["name"], "data": orjson.loads(r["data"]) if r["data"] else None,
                 "created_at": r["created_at"]} for r in rows]

    def add_checkpoint(self, job_id: str, step_number: int, metrics: dict[str, Any],
                       created_at: int) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints (job_id, step_number, metrics, "
                       "created_at) VALUES (?,?,?,?)",
                       (job_id, step_number, orjson.dumps(metrics).decode(), created_at))

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step_number DESC",
                           (job_id,))
        return [{"metrics": orjson.loads(r["metrics"]), "step_number": r["step_number"],
                 "created_at": r["created_at"]} for r in rows]

    # Models.
    def add_model(self, record: ModelRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO models (id, job_id, root, created, kind, doc, deleted) "
                       "VALUES (?,?,?,?,?,?,0)",
                       (record.id, record.job_id, record.root, record.created, record.kind,
                        orjson.dumps(record.doc).decode()))

    def get_model(self, model_id: str) -> ModelRecord | None:
        rows = self._query("SELECT * FROM models WHERE id = ? AND deleted = 0", (model_id,))
        return _model(rows[0]) if rows else None

    def list_models(self) -> list[ModelRecord]:
        rows = self._query("SELECT * FROM models WHERE deleted = 0 ORDER BY created, rowid")
        return [_model(r) for r in rows]

    def delete_model(self, model_id: str) -> ModelRecord | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM models WHERE id = ? AND deleted = 0",
                             (model_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE models SET deleted = 1 WHERE id = ?", (model_id,))
        return _model(row)


def _event(db: sqlite3.Connection, job_id: str, name: str, data: dict[str, Any],
           created_at: int) -> None:
    db.execute("INSERT INTO events (job_id, name, data, created_at) VALUES (?,?,?,?)",
               (job_id, name, orjson.dumps(data).decode(), created_at))


def _file(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        id=row["id"], filename=row["filename"], purpose=row["purpose"], bytes=row["bytes"],
        sha256=row["sha256"], created_at=row["created_at"], num_lines=row["num_lines"],
        sample_type=row["sample_type"], mimetype=row["mimetype"], visibility=row["visibility"],
        deleted=bool(row["deleted"]),
    )


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"], created_at=row["created_at"], modified_at=row["modified_at"],
        status=row["status"], model=row["model"], suffix=row["suffix"],
        fingerprint=row["fingerprint"], doc=orjson.loads(row["doc"]),
    )


def _model(row: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        id=row["id"], job_id=row["job_id"], root=row["root"], created=row["created"],
        kind=row["kind"], doc=orjson.loads(row["doc"]), deleted=bool(row["deleted"]),
    )
