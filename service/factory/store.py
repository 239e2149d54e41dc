"""Everything the factory must not lose: metadata in SQL (SQLAlchemy Core), blobs in `blobs.py`.

The metadata (files, jobs, events, checkpoints, models, meta) lives in the SQLite file
`factory.sqlite3` of the data directory by default, so that a single factory needs nothing
started, and in Postgres when `FACTORY_DATABASE_URL=postgresql://...` is set, so that replicas
share it. The schema is migrated by Alembic at every start (`migrations/`); its first revision is
the tables the first (raw `sqlite3`) factory wrote, so an existing data directory keeps working.

Layout of the data directory:
    factory.sqlite3        metadata (unless FACTORY_DATABASE_URL names another database)
    files/<file id>.jsonl  uploaded files, as uploaded           } the local blob store, unless
    models/<job id>/       a trained model + MANIFEST.json       } FACTORY_STORAGE_URL says s3://
    jobs/<job id>/         the trainer's spec and log (scratch, never shared)
    cache/                 blobs fetched from a remote store (scratch)

Every call is short (one statement or a small transaction), so the event loop may call it directly;
the engine's pool makes it safe for the worker threads that also record progress.

A job that a replica works on (validating, training, following a run on Ray) carries a lease:
`lease_owner` and `lease_until` (ms). The owner renews it (`renew_leases`, a heartbeat); another
replica may take it only once it has lapsed (`take_lease`: one conditional UPDATE, `WHERE
lease_until < now OR lease_owner = me`), so exactly one replica supervises a job at a time.

Job status changes are conditional (`UPDATE jobs ... WHERE id = ? AND status = <the status read>`,
with the row locked on Postgres): when two replicas race to start, finish or cancel one job, one
wins and the other gets `StaleStatus`, instead of both acting on it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping

from service.factory.blobs import Blobs, LocalBlobs
from service.factory.migrations import runner as migrations

#: Statuses after which nobody supervises a job (schemas.TERMINAL; not imported: the store
#: stays below the API's schemas).
_ENDED = frozenset({"SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED"})


class StaleStatus(Exception):
    """A conditional job update lost: the job's status is no longer one the caller expected
    (another replica, or a cancel, moved it first)."""

    def __init__(self, job_id: str, status: str, expected: Collection[str]) -> None:
        super().__init__(f"job {job_id} is {status}, not {' or '.join(sorted(expected))}")
        self.job_id, self.status, self.expected = job_id, status, tuple(expected)


class DatabaseUnavailable(Exception):
    """The metadata database cannot be reached or opened; the message names the setting."""


def _tables(with_rowid: bool) -> tuple[sa.MetaData, dict[str, sa.Table]]:
    """The tables as the queries see them; `migrations/` creates and changes them (revision
    0001: as the first factory created them). SQLite orders rows of one second by its implicit
    `rowid`; other databases have a real `rowid` identity column, so that the same
    `ORDER BY rowid` keeps insertion order there too."""
    md = sa.MetaData()

    def rowid() -> list[sa.Column[Any]]:
        return [sa.Column("rowid", sa.BigInteger, sa.Identity(), nullable=False, unique=True)] \
            if with_rowid else []

    text, integer = sa.Text, sa.BigInteger
    tables = {
        "meta": sa.Table("meta", md, sa.Column("key", text, primary_key=True),
                         sa.Column("value", text, nullable=False)),
        "files": sa.Table(
            "files", md, sa.Column("id", text, primary_key=True),
            sa.Column("filename", text, nullable=False), sa.Column("purpose", text, nullable=False),
            sa.Column("bytes", integer, nullable=False), sa.Column("sha256", text, nullable=False),
            sa.Column("created_at", integer, nullable=False), sa.Column("num_lines", integer),
            sa.Column("sample_type", text, nullable=False), sa.Column("mimetype", text),
            sa.Column("visibility", text),
            sa.Column("deleted", integer, nullable=False, server_default="0"),
            *rowid(), sa.Index("files_by_content", "filename", "sha256")),
        "jobs": sa.Table(
            "jobs", md, sa.Column("id", text, primary_key=True),
            sa.Column("created_at", integer, nullable=False),
            sa.Column("modified_at", integer, nullable=False),
            sa.Column("status", text, nullable=False), sa.Column("model", text, nullable=False),
            sa.Column("suffix", text), sa.Column("fingerprint", text, nullable=False),
            sa.Column("doc", text, nullable=False), *rowid(),
            # revision 0002: the supervising replica's lease (`take_lease`)
            sa.Column("lease_owner", text), sa.Column("lease_until", integer)),
        "events": sa.Table(
            "events", md, sa.Column("seq", integer().with_variant(sa.Integer, "sqlite"),
                                    primary_key=True, autoincrement=True),
            sa.Column("job_id", text, nullable=False), sa.Column("name", text, nullable=False),
            sa.Column("data", text), sa.Column("created_at", integer, nullable=False),
            sa.Index("events_by_job", "job_id", "seq"), sqlite_autoincrement=True),
        "checkpoints": sa.Table(
            "checkpoints", md, sa.Column("job_id", text, primary_key=True),
            sa.Column("step_number", integer, primary_key=True),
            sa.Column("metrics", text, nullable=False),
            sa.Column("created_at", integer, nullable=False)),
        "models": sa.Table(
            "models", md, sa.Column("id", text, primary_key=True),
            sa.Column("job_id", text, nullable=False), sa.Column("root", text, nullable=False),
            sa.Column("created", integer, nullable=False), sa.Column("kind", text, nullable=False),
            sa.Column("doc", text, nullable=False),
            sa.Column("deleted", integer, nullable=False, server_default="0"), *rowid()),
    }
    return md, tables


def now() -> int:
    return int(time.time())


def now_ms() -> int:
    return int(time.time() * 1000)


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
    def __init__(self, data_dir: Path, database_url: str | None = None,
                 blobs: Blobs | None = None) -> None:
        self.data_dir = data_dir
        for sub in ("jobs", "tmp"):
            (data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.blobs = blobs or LocalBlobs(data_dir)
        url = database_url or f"sqlite:///{data_dir / 'factory.sqlite3'}"
        self.engine = _engine(url)
        self.dialect = self.engine.dialect.name
        self._md, self._t = _tables(with_rowid=self.dialect != "sqlite")
        #: The tables, for `migrate.py`, which copies them row by row.
        self.tables = self._t
        # SQLite takes one writer at a time anyway; the lock keeps BEGIN IMMEDIATE from waiting
        # on the busy timeout between this process's own threads.
        self._lock = threading.Lock() if self.dialect == "sqlite" else None
        try:
            with self.engine.begin() as db:
                migrations.upgrade(db)
        except sa.exc.OperationalError as exc:
            raise DatabaseUnavailable(
                f"cannot open the factory's database {self.engine.url.render_as_string()} "
                f"(FACTORY_DATABASE_URL): {' '.join(str(exc.orig).split())}") from None

    def schema_revision(self) -> str | None:
        """The Alembic revision of the database (`migrations.head()` once opened)."""
        with self.engine.connect().execution_options(factory_read=True) as db:
            return migrations.current(db)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        if self._lock is None:
            with self.engine.begin() as db:
                yield db
            return
        with self._lock, self.engine.begin() as db:
            yield db

    def _query(self, statement: sa.Executable) -> list[RowMapping]:
        with self.engine.connect().execution_options(factory_read=True) as db:
            return list(db.execute(statement).mappings().all())

    # Paths: local copies of the blobs, for the code that reads files (validation, the trainer).
    def file_key(self, file_id: str) -> str:
        return f"files/{file_id}.jsonl"

    def file_path(self, file_id: str) -> Path:
        """A local path to an uploaded file: itself in the local store, else a cached copy."""
        return self.blobs.local_file(self.file_key(file_id))

    def model_key(self, job_id: str) -> str:
        return f"models/{job_id}"

    def job_dir(self, job_id: str) -> Path:
        path = self.data_dir / "jobs" / job_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    # Meta.
    def workspace_id(self) -> str:
        """Eight hex digits, fixed for this database: the 'workspace' segment of model ids."""
        meta = self._t["meta"]
        with self._tx() as db:
            row = db.execute(sa.select(meta.c.value).where(meta.c.key == "workspace")).first()
            if row is not None:
                return str(row[0])
        value = secrets.token_hex(4)
        try:
            with self._tx() as db:
                db.execute(sa.insert(meta).values(key="workspace", value=value))
        except sa.exc.IntegrityError:  # another replica wrote it first: theirs stands
            pass
        return str(self._query(sa.select(meta.c.value).where(meta.c.key == "workspace"))[0]
                   ["value"])

    # Files.
    def add_file(self, record: FileRecord) -> None:
        with self._tx() as db:
            db.execute(sa.insert(self._t["files"]).values(
                id=record.id, filename=record.filename, purpose=record.purpose,
                bytes=record.bytes, sha256=record.sha256, created_at=record.created_at,
                num_lines=record.num_lines, sample_type=record.sample_type,
                mimetype=record.mimetype, visibility=record.visibility, deleted=0))

    def get_file(self, file_id: str, *, include_deleted: bool = False) -> FileRecord | None:
        files = self._t["files"]
        rows = self._query(sa.select(files).where(files.c.id == file_id))
        if not rows or (rows[0]["deleted"] and not include_deleted):
            return None
        return _file(rows[0])

    def find_file(self, filename: str, sha256: str, purpose: str) -> FileRecord | None:
        f = self._t["files"]
        rows = self._query(
            sa.select(f).where(f.c.filename == filename, f.c.sha256 == sha256,
                               f.c.purpose == purpose, f.c.deleted == 0)
            .order_by(f.c.created_at).limit(1))
        return _file(rows[0]) if rows else None

    def list_files(self, *, page: int, page_size: int, purpose: str | None = None,
                   search: str | None = None,
                   sample_types: Sequence[str] | None = None) -> tuple[list[FileRecord], int]:
        f = self._t["files"]
        where: list[sa.ColumnElement[bool]] = [f.c.deleted == 0]
        if purpose:
            where.append(f.c.purpose == purpose)
        if search:
            where.append(sa.or_(f.c.filename.like(f"%{search}%"), f.c.id.like(f"%{search}%")))
        if sample_types:
            where.append(f.c.sample_type.in_(list(sample_types)))
        total = int(self._query(sa.select(sa.func.count().label("n")).select_from(f)
                                .where(*where))[0]["n"])
        rows = self._query(sa.select(f).where(*where)
                           .order_by(f.c.created_at.desc(), sa.literal_column("rowid").desc())
                           .limit(page_size).offset(page * page_size))
        return [_file(r) for r in rows], total

    def delete_file(self, file_id: str) -> bool:
        f = self._t["files"]
        with self._tx() as db:
            changed = db.execute(sa.update(f).where(f.c.id == file_id, f.c.deleted == 0)
                                 .values(deleted=1)).rowcount
        if changed:
            self.blobs.delete(self.file_key(file_id))
        return bool(changed)

    # Jobs.
    def add_job(self, job: JobRecord) -> None:
        with self._tx() as db:
            db.execute(sa.insert(self._t["jobs"]).values(
                id=job.id, created_at=job.created_at, modified_at=job.modified_at,
                status=job.status, model=job.model, suffix=job.suffix,
                fingerprint=job.fingerprint, doc=orjson.dumps(job.doc).decode()))
            self._event(db, job.id, "status-updated", {"status": job.status}, job.created_at)

    def get_job(self, job_id: str) -> JobRecord | None:
        j = self._t["jobs"]
        rows = self._query(sa.select(j).where(j.c.id == job_id))
        return _job(rows[0]) if rows else None

    def update_job(self, job_id: str, *, status: str | None = None,
                   expect: Collection[str] | None = None,
                   event_data: dict[str, Any] | None = None, owner: str | None = None,
                   lease_s: float | None = None, **doc: Any) -> JobRecord:
        """Change a job's status and/or document fields in one transaction; a status change is
        recorded as a `status-updated` event (with `event_data` merged into its data).

        With `expect`, the change happens only while the job's status is one of those, else
        `StaleStatus`: the one way a worker takes, finishes or cancels a job, so that of two
        replicas racing for it exactly one goes on. The UPDATE itself says `WHERE status = <the
        status read>` (and the row is locked between read and write where the database can), so
        a change that slips in between is caught, not overwritten.

        With `owner`, the change happens only while that replica holds the job's lease (or none
        does): a supervisor that lost its lease (taken over while it stalled) ends nothing.
        With `owner` and `lease_s`, the same UPDATE makes `owner` the job's supervisor for
        `lease_s` seconds (a worker taking a job). Ending a job releases its lease."""
        with self._tx() as db:
            return self._update_job(db, job_id, status, expect, event_data, doc, owner, lease_s)

    def finish_with_model(self, record: ModelRecord, *, expect: Collection[str],
                          owner: str | None = None, **doc: Any) -> JobRecord:
        """Record a trained model and its job's SUCCESS in one transaction: the model becomes
        visible exactly when the job succeeds, and of two replicas finishing one job only one
        adds it (`StaleStatus` for the other, or when a cancel came first)."""
        with self._tx() as db:
            job = self._update_job(db, record.job_id, "SUCCESS", expect, None, doc, owner)
            db.execute(sa.insert(self._t["models"]).values(
                id=record.id, job_id=record.job_id, root=record.root, created=record.created,
                kind=record.kind, doc=orjson.dumps(record.doc).decode(), deleted=0))
            return job

    def _update_job(self, db: Connection, job_id: str, status: str | None,
                    expect: Collection[str] | None, event_data: dict[str, Any] | None,
                    doc: dict[str, Any], owner: str | None = None,
                    lease_s: float | None = None) -> JobRecord:
        j = self._t["jobs"]
        row = db.execute(sa.select(j).where(j.c.id == job_id).with_for_update()) \
            .mappings().first()
        if row is None:
            raise KeyError(job_id)
        job = _job(row)
        read_status = job.status
        if expect is not None and read_status not in expect:
            raise StaleStatus(job_id, read_status, expect)
        holder = row["lease_owner"] if (row["lease_until"] or 0) >= now_ms() else None
        if owner is not None and holder not in (None, owner):
            raise StaleStatus(job_id, f"{read_status}, supervised by replica {holder}",
                              expect or (read_status,))
        job.doc.update(doc)
        stamp = now()
        if status is not None and status != job.status:
            job.status = status
            self._event(db, job_id, "status-updated",
                        {"status": status, **(event_data or {})}, stamp)
        job.modified_at = stamp
        lease: dict[str, Any] = {}
        if job.status in _ENDED:
            lease = {"lease_owner": None, "lease_until": None}
        elif owner is not None and lease_s is not None:
            lease = {"lease_owner": owner, "lease_until": now_ms() + int(lease_s * 1000)}
        changed = db.execute(
            sa.update(j).where(j.c.id == job_id, j.c.status == read_status)
            .values(status=job.status, modified_at=stamp,
                    doc=orjson.dumps(job.doc).decode(), **lease)).rowcount
        if changed != 1:
            raise StaleStatus(job_id, "changed meanwhile", expect or (read_status,))
        return job

    # Leases: which replica supervises a job.
    def take_lease(self, job_id: str, owner: str, ttl_s: float, *,
                   statuses: Collection[str] | None = None) -> bool:
        """Make `owner` the job's supervisor for `ttl_s` seconds, if nobody else holds a live
        lease on it (and, with `statuses`, while its status is one of them). One conditional
        UPDATE: of two replicas taking a lapsed lease at once, exactly one wins."""
        j = self._t["jobs"]
        stamp = now_ms()
        where: list[sa.ColumnElement[bool]] = [
            j.c.id == job_id,
            sa.or_(j.c.lease_until.is_(None), j.c.lease_until < stamp, j.c.lease_owner == owner)]
        if statuses is not None:
            where.append(j.c.status.in_(list(statuses)))
        with self._tx() as db:
            changed = db.execute(sa.update(j).where(*where).values(
                lease_owner=owner, lease_until=stamp + int(ttl_s * 1000))).rowcount
        return bool(changed)

    def renew_leases(self, job_ids: Collection[str], owner: str, ttl_s: float) -> set[str]:
        """The heartbeat: extend `owner`'s leases on these jobs; returns the ones it still held
        (a job missing from the answer was taken over, or has no lease any more)."""
        if not job_ids:
            return set()
        j = self._t["jobs"]
        stamp = now_ms()
        with self._tx() as db:
            db.execute(sa.update(j).where(j.c.id.in_(list(job_ids)), j.c.lease_owner == owner)
                       .values(lease_until=stamp + int(ttl_s * 1000)))
        rows = self._query(sa.select(j.c.id).where(j.c.id.in_(list(job_ids)),
                                                   j.c.lease_owner == owner))
        return {str(r["id"]) for r in rows}

    def hand_over(self, job_id: str, owner: str) -> None:
        """`owner` stops supervising a job that goes on (its run outlives the replica): the
        lease lapses now, so that the next replica's scan takes it without waiting."""
        j = self._t["jobs"]
        with self._tx() as db:
            db.execute(sa.update(j).where(j.c.id == job_id, j.c.lease_owner == owner)
                       .values(lease_until=0))

    def lapsed_leases(self, statuses: Collection[str]) -> list[tuple[JobRecord, str]]:
        """Jobs in `statuses` whose supervisor stopped renewing its lease: (job, last owner)."""
        j = self._t["jobs"]
        rows = self._query(sa.select(j).where(j.c.status.in_(list(statuses)),
                                              j.c.lease_until.is_not(None),
                                              j.c.lease_until < now_ms())
                           .order_by(j.c.created_at, sa.literal_column("rowid")))
        return [(_job(r), str(r["lease_owner"])) for r in rows]

    def lease(self, job_id: str) -> tuple[str | None, int | None]:
        """(owner, until in ms) of a job's lease."""
        j = self._t["jobs"]
        rows = self._query(sa.select(j.c.lease_owner, j.c.lease_until).where(j.c.id == job_id))
        if not rows:
            return None, None
        return rows[0]["lease_owner"], rows[0]["lease_until"]

    def add_event(self, job_id: str, name: str, data: dict[str, Any]) -> None:
        with self._tx() as db:
            self._event(db, job_id, name, data, now())

    def list_jobs(self, *, page: int, page_size: int, model: str | None = None,
                  status: str | None = None, suffix: str | None = None,
                  created_after: int | None = None,
                  created_before: int | None = None) -> tuple[list[JobRecord], int]:
        j = self._t["jobs"]
        where: list[sa.ColumnElement[bool]] = []
        for column, value in ((j.c.model, model), (j.c.status, status), (j.c.suffix, suffix)):
            if value is not None:
                where.append(column == value)
        if created_after is not None:
            where.append(j.c.created_at >= created_after)
        if created_before is not None:
            where.append(j.c.created_at <= created_before)
        total = int(self._query(sa.select(sa.func.count().label("n")).select_from(j)
                                .where(sa.true(), *where))[0]["n"])
        rows = self._query(sa.select(j).where(sa.true(), *where)
                           .order_by(j.c.created_at.desc(), sa.literal_column("rowid").desc())
                           .limit(page_size).offset(page * page_size))
        return [_job(r) for r in rows], total

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        j = self._t["jobs"]
        rows = self._query(sa.select(j).where(j.c.status.in_(statuses))
                           .order_by(j.c.created_at, sa.literal_column("rowid")))
        return [_job(r) for r in rows]

    def find_active_job(self, fingerprint: str, statuses: Sequence[str]) -> JobRecord | None:
        j = self._t["jobs"]
        rows = self._query(sa.select(j).where(j.c.fingerprint == fingerprint,
                                              j.c.status.in_(list(statuses))).limit(1))
        return _job(rows[0]) if rows else None

    def events(self, job_id: str) -> list[dict[str, Any]]:
        e = self._t["events"]
        rows = self._query(sa.select(e.c.name, e.c.data, e.c.created_at)
                           .where(e.c.job_id == job_id).order_by(e.c.seq))
        return [{"name": r["name"], "data": orjson.loads(r["data"]) if r["data"] else None,
                 "created_at": r["created_at"]} for r in rows]

    def add_checkpoint(self, job_id: str, step_number: int, metrics: dict[str, Any],
                       created_at: int) -> None:
        c = self._t["checkpoints"]
        with self._tx() as db:
            db.execute(sa.delete(c).where(c.c.job_id == job_id, c.c.step_number == step_number))
            db.execute(sa.insert(c).values(job_id=job_id, step_number=step_number,
                                           metrics=orjson.dumps(metrics).decode(),
                                           created_at=created_at))

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        c = self._t["checkpoints"]
        rows = self._query(sa.select(c).where(c.c.job_id == job_id)
                           .order_by(c.c.step_number.desc()))
        return [{"metrics": orjson.loads(r["metrics"]), "step_number": r["step_number"],
                 "created_at": r["created_at"]} for r in rows]

    # Models.
    def add_model(self, record: ModelRecord) -> None:
        with self._tx() as db:
            db.execute(sa.insert(self._t["models"]).values(
                id=record.id, job_id=record.job_id, root=record.root, created=record.created,
                kind=record.kind, doc=orjson.dumps(record.doc).decode(), deleted=0))

    def get_model(self, model_id: str) -> ModelRecord | None:
        m = self._t["models"]
        rows = self._query(sa.select(m).where(m.c.id == model_id, m.c.deleted == 0))
        return _model(rows[0]) if rows else None

    def list_models(self) -> list[ModelRecord]:
        m = self._t["models"]
        rows = self._query(sa.select(m).where(m.c.deleted == 0)
                           .order_by(m.c.created, sa.literal_column("rowid")))
        return [_model(r) for r in rows]

    def delete_model(self, model_id: str) -> ModelRecord | None:
        m = self._t["models"]
        with self._tx() as db:
            row = db.execute(sa.select(m).where(m.c.id == model_id, m.c.deleted == 0)
                             .with_for_update()).mappings().first()
            if row is None:
                return None
            changed = db.execute(sa.update(m).where(m.c.id == model_id, m.c.deleted == 0)
                                 .values(deleted=1)).rowcount
        return _model(row) if changed else None

    def referenced_blobs(self, active_statuses: Sequence[str]) -> set[str]:
        """The blob keys the metadata needs (`gc.py`): every file not deleted, and the model
        prefix of every model not deleted and of every job still at work (whose model is being
        written). Read in one transaction, so that a sweep sees one moment of the database."""
        f, m, j = self._t["files"], self._t["models"], self._t["jobs"]
        with self._tx() as db:
            files = db.execute(sa.select(f.c.id).where(f.c.deleted == 0)).scalars().all()
            models = db.execute(sa.select(m.c.job_id).where(m.c.deleted == 0)).scalars().all()
            jobs = db.execute(sa.select(j.c.id).where(j.c.status.in_(list(active_statuses)))
                              ).scalars().all()
        return ({self.file_key(i) for i in files}
                | {self.model_key(i) for i in [*models, *jobs]})

    def _event(self, db: Connection, job_id: str, name: str, data: dict[str, Any],
               created_at: int) -> None:
        db.execute(sa.insert(self._t["events"]).values(
            job_id=job_id, name=name, data=orjson.dumps(data).decode(), created_at=created_at))


def _engine(url: str) -> Engine:
    """An engine for `url`. SQLite: WAL (readers never wait on the writer), and transactions
    that begin IMMEDIATE, so a read-then-write transaction holds the write lock from its read
    (pysqlite's own BEGIN is deferred, which would let two writers read the same status)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise DatabaseUnavailable(
            f"FACTORY_DATABASE_URL {url.split('@')[-1]!r} cannot be used: {exc} (Postgres needs "
            "the `cluster` extra: pip install 'classifier-gateway[cluster]')") from None
    if engine.dialect.name == "sqlite":
        engine = sa.create_engine(url, connect_args={"check_same_thread": False,
                                                     "isolation_level": None})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi: Any, _record: Any) -> None:
            dbapi.execute("PRAGMA journal_mode=WAL")
            dbapi.execute("PRAGMA synchronous=NORMAL")
            dbapi.execute("PRAGMA busy_timeout=10000")

        @sa.event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            read = conn.get_execution_options().get("factory_read")
            conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine


def _file(row: RowMapping) -> FileRecord:
    return FileRecord(
        id=row["id"], filename=row["filename"], purpose=row["purpose"], bytes=row["bytes"],
        sha256=row["sha256"], created_at=row["created_at"], num_lines=row["num_lines"],
        sample_type=row["sample_type"], mimetype=row["mimetype"], visibility=row["visibility"],
        deleted=bool(row["deleted"]),
    )


def _job(row: RowMapping) -> JobRecord:
    return JobRecord(
        id=row["id"], created_at=row["created_at"], modified_at=row["modified_at"],
        status=row["status"], model=row["model"], suffix=row["suffix"],
        fingerprint=row["fingerprint"], doc=orjson.loads(row["doc"]),
    )


def _model(row: RowMapping) -> ModelRecord:
    return ModelRecord(
        id=row["id"], job_id=row["job_id"], root=row["root"], created=row["created"],
        kind=row["kind"], doc=orjson.loads(row["doc"]), deleted=bool(row["deleted"]),
    )
