"""Fine-tuning jobs: creation checks, the lifecycle, and the workers that run them.

Lifecycle (Mistral's statuses, exactly): QUEUED -> VALIDATING -> VALIDATED -> (auto_start, or
`start`) RUNNING -> SUCCESS; FAILED_VALIDATION when the data is bad; FAILED when training breaks
(or the factory died while it ran); CANCELLATION_REQUESTED -> CANCELLED on `cancel`.

`max_concurrent_jobs` workers (default 1) take jobs in creation order; the others stay QUEUED.
Validation runs in a thread; training in a child process (`service.factory.trainer`), which a
cancel kills at once. Every status change is a `status-updated` event in the store, so a restart
loses nothing: QUEUED jobs are queued again, and a job that was VALIDATING or RUNNING when the
process died is FAILED with that reason.

Replicas sharing one database (FACTORY_DATABASE_URL) each work the jobs they were asked to create
or start. Every status change that acts on a job (taking it, finishing it, cancelling it) is
conditional on the status it expects (`Store.update_job(expect=...)`), so that of two replicas
racing for one job exactly one acts; a job records the replica that runs it (`replica`), the
replica that runs a job notices a cancel made on another one within a second, and a restarting
replica fails only the jobs that it left behind (FACTORY_REPLICA_ID).

Training runs on an executor (`executors/`, FACTORY_EXECUTOR): a child process of this replica,
or a Ray actor. Exactly one replica supervises a job it works on: it holds the job's lease in the
database (FACTORY_LEASE_S, 15 s), renews it every third of that (the heartbeat), and only it
records the job's progress and outcome. Every replica, at each beat, takes the jobs whose lease
lapsed (one conditional UPDATE: one taker): it follows a run that outlived its replica (Ray) to
its end, and fails a job whose run died with it (a child process) with the reason. A replica dead
is so replaced within FACTORY_LEASE_S * 4/3 (20 s).

A job's experiment trackers (its `integrations`) run here, in the replica that supervises it,
whatever the executor: fed from the run's messages, in a thread of the job's own
(`tracking/reporter.py`), and ended before the job's outcome is recorded (SUCCESS with the model,
FAILED, CANCELLED), or when this replica stops supervising it. The API keys never leave this
replica's memory; a replica that takes a job over has none and does not resume its tracker runs
(`tracking/base.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from service.factory.blobs import BlobMissing
from service.factory.data import (
    TargetSpec,
    ValidationReport,
    merge_reports,
    resolve_targets,
    validate_file,
)
from service.factory.errors import Conflict, FactoryError, NotFound
from service.factory.executors.base import Executor, TrainingRun
from service.factory.executors.registry import open_executor
from service.factory.metrics import FactoryMetrics
from service.factory.models.base import (
    BaseModel,
    Hyperparameters,
    TrainingFile,
    TrainingSpec,
)
from service.factory.models.registry import (
    LEGACY_BASE,
    Registry,
    UnknownBaseModel,
    default_registry,
)
from service.factory.schemas import ACTIVE_STATUSES, TERMINAL, JobIn
from service.factory.settings import FactorySettings
from service.factory.store import JobRecord, ModelRecord, StaleStatus, Store, now
from service.factory.tracking.base import EVENT as TRACKING_EVENT
from service.factory.tracking.base import Outcome
from service.factory.tracking.keys import KeyRing
from service.factory.tracking.reporter import JobTracking, ModelDir
from service.tracing import JOB, MODEL, Tracing, span

log = logging.getLogger("service.factory.jobs")

#: The statuses in which a replica works on a job and holds its lease.
SUPERVISED = ("VALIDATING", "RUNNING", "CANCELLATION_REQUESTED")
SHUTDOWN_REASON = ("the factory was shut down while this job was {status}; its partial work is "
                   "lost: create the job again")
CRASH_REASON = ("the factory stopped while this job was {status}; its partial work is lost: "
                "create the job again")
ORPHAN_REASON = ("the factory replica {replica} that supervised this job stopped (no heartbeat "
                 "for {lease} s) while the job was {status}; its training ran in that replica "
                 "(FACTORY_EXECUTOR={executor}) and stopped with it: create the job again "
                 "(with FACTORY_EXECUTOR=ray a training outlives its replica)")
LOST_RUN_REASON = ("the factory replica {replica} that supervised this job stopped (no heartbeat "
                   "for {lease} s) while the job was {status}, and its training is gone from "
                   "the {executor} cluster too (its actor died, or this replica cannot reach "
                   "it: check FACTORY_EXECUTOR and FACTORY_RAY_ADDRESS): create the job again")
#: A tracker run that this replica ends before the job does (`integration` event, `stopped`).
TRACKING_STOPPED = ("the factory replica {replica} that logged this run stopped supervising the "
                    "job (it shut down, or another replica took the job over); the API key lived "
                    "only in its memory, so no other replica continues the run: it ends here at "
                    "{step}, marked as not finished. The job's own checkpoints, evaluation and "
                    "outcome are complete in GET /v1/fine_tuning/jobs/{job_id}")
#: A tracker run left by a replica that died (`integration` event, `interrupted`).
TRACKING_INTERRUPTED = ("the factory replica {replica} that logged this job's {kind} run stopped "
                        "while the job was {status}; the API key lived only in its memory{where}, "
                        "so this replica ({me}) does not resume the run: in {kind} it ends at "
                        "the last step {replica} logged and is left unfinished. The job's own "
                        "checkpoints, evaluation and outcome are complete in "
                        "GET /v1/fine_tuning/jobs/{job_id}")


def fine_tuned_model_id(base: str, workspace: str, job_id: str, when: float) -> str:
    """`ft:classifier:<base>:<8 hex>:<YYYYMMDD>:<first 8 hex of the job id>`."""
    day = datetime.fromtimestamp(when, UTC).strftime("%Y%m%d")
    return f"ft:classifier:{base}:{workspace}:{day}:{job_id.replace('-', '')[:8]}"


@dataclass
class _Running:
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    run: TrainingRun | None = None
    #: Whether this replica holds the job's lease (from its first status change on).
    leased: bool = False
    #: The lease was taken over (this replica stalled past it): stop, record nothing.
    lost: bool = False
    #: Messages of the run consumed, and as last saved on the job (`run_cursor`).
    cursor: int = 0
    saved_cursor: int = 0
    #: The trainer's latest `progress` (see `JobManager.progress`): kept here, written to the
    #: store only when the phase changes, since a step may be a fraction of a second.
    progress: dict[str, Any] = field(default_factory=dict)
    #: The job's experiment trackers, fed by this replica (None: the job has no integrations,
    #: or this replica took the job over and cannot track it).
    tracking: JobTracking | None = None


class JobManager:
    def __init__(self, store: Store, settings: FactorySettings, metrics: FactoryMetrics,
                 on_model: Callable[[ModelRecord], None] | None = None,
                 registry: Registry | None = None, tracing: Tracing | None = None,
                 executor: Executor | None = None) -> None:
        self.store = store
        self.tracing = tracing
        self.registry = registry or default_registry()
        self.settings = settings
        self.metrics = metrics
        self.on_model = on_model
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.running: dict[str, _Running] = {}
        self.workers: list[asyncio.Task[None]] = []
        self.workspace = store.workspace_id()
        #: Integrations' API keys, in memory until their job's trackers open
        #: (`tracking/keys.py`).
        self.keys = KeyRing()
        self.me = settings.replica
        self.executor = executor or open_executor(settings, store.blobs)
        self.supervisor: asyncio.Task[None] | None = None
        self.adopting: set[asyncio.Task[None]] = set()

    # Life of the manager.
    def _mine(self, job: JobRecord) -> bool:
        """Whether this replica ran the job (jobs of factories before replicas record none)."""
        return job.doc.get("replica") in (None, self.settings.replica)

    async def start(self) -> None:
        for job in self.store.jobs_with_status("VALIDATING", "RUNNING", "STARTED"):
            if not self._mine(job):
                continue
            if self._followable(job):  # a Ray run outlives its replica: follow it again
                self._adopt_now(job.id, self.me)
                continue
            reason = CRASH_REASON.format(status=job.status)
            with contextlib.suppress(StaleStatus):
                self.store.update_job(job.id, status="FAILED", error=reason, expect=(job.status,),
                                      event_data={"reason": reason})
                self.metrics.jobs.labels(status="FAILED").inc()
                log.warning("job %s was %s when the factory stopped: FAILED", job.id, job.status)
        for job in self.store.jobs_with_status("CANCELLATION_REQUESTED"):
            if not self._mine(job):
                continue
            if self._followable(job):
                self._adopt_now(job.id, self.me)
                continue
            with contextlib.suppress(StaleStatus):
                self.store.update_job(job.id, status="CANCELLED",
                                      expect=("CANCELLATION_REQUESTED",))
                self.metrics.jobs.labels(status="CANCELLED").inc()
        for job in self.store.jobs_with_status("QUEUED", "VALIDATED"):
            if job.status == "QUEUED" or job.doc.get("start_requested"):
                self.queue.put_nowait(job.id)
        self._update_queued()
        self.workers = [asyncio.create_task(self._worker(), name=f"factory-job-worker-{i}")
                        for i in range(self.settings.max_concurrent_jobs)]
        self.supervisor = asyncio.create_task(self._supervision(), name="factory-supervision")

    def _followable(self, job: JobRecord) -> bool:
        """Whether the job's run can outlive its replica and this one's executor can follow it."""
        ref = job.doc.get("run")
        return (job.status != "VALIDATING" and isinstance(ref, dict)
                and ref.get("executor") not in (None, "local")
                and ref.get("executor") == self.executor.name)

    def _adopt_now(self, job_id: str, owner: str) -> None:
        self.store.take_lease(job_id, self.me, self.settings.lease_s)
        task = asyncio.create_task(self._adopt(job_id, owner), name=f"factory-job-adopt-{job_id}")
        self.adopting.add(task)
        task.add_done_callback(self.adopting.discard)

    async def stop(self) -> None:
        """Stop the workers. A run that outlives this replica (Ray) is handed over: its lease
        lapses now and another replica (or this one's next start) follows it. A job caught
        validating or training here is killed and recorded as FAILED now (a crash leaves that
        to the replica that takes its lease, which says the same)."""
        tasks = [*self.workers, *self.adopting] + ([self.supervisor] if self.supervisor else [])
        for task in tasks:
            task.cancel()
        for job_id, running in list(self.running.items()):
            if running.run is not None:
                await running.run.abandon()
                if running.run.ref.get("executor") != "local":
                    self.store.hand_over(job_id, self.me)
                    continue
            job = self.store.get_job(job_id)
            if job is not None and job.status in ("VALIDATING", "RUNNING",
                                                  "CANCELLATION_REQUESTED"):
                with contextlib.suppress(StaleStatus):
                    if job.status == "CANCELLATION_REQUESTED":
                        self._finish(job_id, "CANCELLED")
                    else:
                        self._finish(job_id, "FAILED", error=SHUTDOWN_REASON.format(
                            status=job.status))
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.executor.close()

    # API operations.
    async def create(self, request: JobIn, *, dry_run: bool = False) -> JobRecord | dict[str, Any]:
        if request.job_type not in (None, "classifier"):
            raise FactoryError("this factory trains classifiers only: use job_type \"classifier\"",
                               param="job_type")
        base = self._base_model(request.model)
        hyper = Hyperparameters.from_job(request.hyperparameters.model_dump())
        problem = base.check(hyper)
        if problem is not None:
            field_name, message = problem
            raise FactoryError(f"hyperparameters.{field_name}: {message}",
                               param=f"hyperparameters.{field_name}", status=422,
                               code="invalid_hyperparameter")
        if request.device is not None and base.capabilities.gpu:
            # local-ngram ignores the device (it trains on the CPU): nothing to check.
            unusable = await asyncio.to_thread(self.executor.device_problem, request.device)
            if unusable is not None:
                raise FactoryError(unusable, param="device", status=422,
                                   code="device_unavailable")
        files = request.files()
        if not files:
            raise FactoryError("training_files is empty: upload a JSONL file with "
                               "POST /v1/files and pass its id", param="training_files")
        for f in files:
            self._check_file(f.file_id, "training_files")
        for file_id in request.validation_files or []:
            self._check_file(file_id, "validation_files")
        hyper_doc = request.hyperparameters.model_dump()
        targets = ([t.model_dump() for t in request.classifier_targets]
                   if request.classifier_targets else None)
        doc: dict[str, Any] = {
            "base_model": base.name,
            "auto_start": request.auto_start,
            "training_files": [f.model_dump() for f in files],
            "validation_files": list(request.validation_files or []),
            "hyperparameters": hyper_doc,
            # An integration's API key is never stored nor echoed: it stays in memory until
            # the job trains (`self.keys`).
            "integrations": [i.model_dump(exclude={"api_key"}, exclude_none=True)
                             for i in request.integrations or []],
            "invalid_sample_skip_percentage": request.invalid_sample_skip_percentage,
            "classifier_targets": targets,
            "fine_tuned_model": None, "trained_tokens": None, "metadata": None,
            "device": request.device,
        }
        if dry_run:
            return await asyncio.to_thread(self._dry_run, doc)
        fingerprint = hashlib.sha256(orjson.dumps(
            [request.model, request.suffix, doc["training_files"], doc["validation_files"],
             hyper_doc, targets]
            # the device only when chosen: fingerprints of jobs without one stay as they were
            + ([request.device] if request.device else []),
            option=orjson.OPT_SORT_KEYS)).hexdigest()
        existing = self.store.find_active_job(fingerprint, ACTIVE_STATUSES)
        if existing is not None:
            raise Conflict(f"a job with the same model, files, hyperparameters and suffix is "
                           f"already {existing.status}: {existing.id}; cancel it or change "
                           "the request", param="training_files", code="duplicate_job")
        stamp = now()
        job = JobRecord(id=str(uuid.uuid4()), created_at=stamp, modified_at=stamp,
                        status="QUEUED", model=request.model, suffix=request.suffix,
                        fingerprint=fingerprint, doc=doc)
        self.store.add_job(job)
        self.keys.keep(job.id, [i.api_key.get_secret_value() if i.api_key else None
                                for i in request.integrations or []])
        self.queue.put_nowait(job.id)
        self._update_queued()
        return job

    def _base_model(self, name: str) -> BaseModel:
        """The base model a job's `model` names, usable here, or the 4xx that says why not."""
        try:
            base = self.registry.resolve(name)
        except UnknownBaseModel:
            names = [*self.registry.names(), *self.registry.aliases]
            raise NotFound(f"base model {name!r} cannot be fine-tuned here; use one of "
                           f"{', '.join(names)} (GET /v1/models lists them)", param="model",
                           code="unknown_model") from None
        missing = base.availability()
        if missing is not None:
            raise FactoryError(f"base model {name!r} is not available on this factory: {missing}",
                               param="model", code="model_unavailable")
        return base

    def _job_base(self, job: JobRecord) -> BaseModel:
        """The base model a stored job trains (jobs from before base models had names trained
        the n-gram model)."""
        return self.registry.get(str(job.doc.get("base_model") or LEGACY_BASE))

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no fine-tuning job {job_id!r}", param="job_id", code="not_found")
        return job

    async def start_job(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        try:
            if job.status == "VALIDATED":
                job = self.store.update_job(job_id, start_requested=True, expect=("VALIDATED",))
                self.queue.put_nowait(job_id)
                self._update_queued()
                return job
            if job.status in ("QUEUED", "VALIDATING"):
                return self.store.update_job(job_id, start_requested=True,
                                             expect=("QUEUED", "VALIDATING", "VALIDATED"))
        except StaleStatus as exc:
            job = self.get(job_id)
            if exc.status not in ("VALIDATED", "RUNNING"):
                raise Conflict(f"job {job_id} is {job.status}; only a VALIDATED job can be "
                               "started", param="job_id") from None
            return job
        raise Conflict(f"job {job_id} is {job.status}; only a VALIDATED job (created with "
                       "auto_start false) can be started", param="job_id")

    async def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job, whichever replica runs it: one waiting is CANCELLED at once (unless a
        worker took it in the meantime); one at work becomes CANCELLATION_REQUESTED, which the
        replica running it sees and acts on. Each step is conditional, so that a cancel racing a
        worker (or another cancel) never lands on a finished job nor counts twice."""
        for _ in range(5):
            job = self.get(job_id)
            if job.status in TERMINAL:
                raise Conflict(f"job {job_id} is already {job.status}", param="job_id")
            try:
                if job.status in ("QUEUED", "VALIDATED") and job_id not in self.running:
                    job = self.store.update_job(job_id, status="CANCELLED",
                                                expect=("QUEUED", "VALIDATED"))
                    self.keys.forget(job_id)
                    self.metrics.jobs.labels(status="CANCELLED").inc()
                    self._update_queued()
                    return job
                job = self.store.update_job(
                    job_id, status="CANCELLATION_REQUESTED",
                    expect=[s for s in ACTIVE_STATUSES if s not in ("QUEUED", "VALIDATED")]
                    + (["QUEUED", "VALIDATED"] if job_id in self.running else []))
                break
            except StaleStatus:
                continue  # it moved meanwhile (a worker took it, or it ended): look again
        else:
            raise Conflict(f"job {job_id} keeps changing status; try again", param="job_id")
        running = self.running.get(job_id)
        if running is not None:
            running.cancel.set()
            if running.run is not None:
                await running.run.cancel()
        else:
            # Supervised elsewhere: a run that an executor can reach from here (Ray) is stopped
            # from here at once; its supervisor records CANCELLED when it sees the run end.
            ref = job.doc.get("run")
            if isinstance(ref, dict) and ref.get("executor") == self.executor.name:
                await self.executor.stop(ref)
        return job

    def progress(self, job: JobRecord) -> dict[str, Any] | None:
        """What the job is doing: `phase` (reading, loading, tokenising, probing, featurising,
        training, exporting, evaluating; `done` when it ended) with its `done` of `total` items,
        and the training's `step` of `total_steps` (the steps the model planned, which the job's
        `hyperparameters`/`metadata` may only estimate), `stopped` saying why a model made fewer.
        Live while the job trains; afterwards as last recorded."""
        running = self.running.get(job.id)
        if running is not None and running.progress:
            return dict(running.progress)
        stored = job.doc.get("progress")
        return dict(stored) if isinstance(stored, dict) else None

    def _progressed(self, job_id: str, running: _Running, message: dict[str, Any]) -> None:
        """A trainer's progress line: kept in memory; a new phase is also a `progress` event
        and stored on the job, so that `jobs get` shows when each phase began."""
        phase = str(message.get("phase") or "training")
        done, total = message.get("done"), message.get("total")
        changed = phase != running.progress.get("phase")
        running.progress.update(phase=phase, done=done, total=total)
        if phase == "training":
            running.progress.update(step=done, total_steps=total)
        if changed:
            if self.tracing is not None:  # the job's span is current in its worker
                self.tracing.event(f"phase {phase}", {JOB: job_id})
            self.store.add_event(job_id, "progress", {"phase": phase} | (
                {"total": total} if total is not None else {}))
            self.store.update_job(job_id, progress=dict(running.progress))

    # Workers.
    def _check_file(self, file_id: str, param: str) -> None:
        record = self.store.get_file(file_id)
        if record is None:
            raise NotFound(f"{param}: no file {file_id!r}; upload it with POST /v1/files",
                           param=param, code="file_not_found")
        if record.purpose != "fine-tune":
            raise FactoryError(f"{param}: file {file_id} has purpose {record.purpose!r}; "
                               "upload it with purpose \"fine-tune\"", param=param)

    def _update_queued(self) -> None:
        self.metrics.jobs_queued.set(len(self.store.jobs_with_status("QUEUED")))

    async def _worker(self) -> None:
        while True:
            job_id = await self.queue.get()
            job = self.store.get_job(job_id)
            if job is None or job.status not in ("QUEUED", "VALIDATED"):
                continue
            running = self.running[job_id] = _Running()
            try:
                # Each job is its own trace: it outlives the request that created it.
                with span(self.tracing, "factory.job", {JOB: job_id, MODEL: job.model}):
                    await self._run(job, running)
                    if self.tracing is not None:
                        done = self.store.get_job(job_id)
                        self.tracing.set({"classifier.job.status": done.status if done else ""})
                        evaluation = done.doc.get("evaluation") if done else None
                        if isinstance(evaluation, dict):  # numbers only: never a text or label
                            self.tracing.event("evaluation", _numbers(evaluation))
            except asyncio.CancelledError:
                raise
            except StaleStatus as exc:
                # Another replica took the job first (not ours to touch), or a cancel made on
                # another replica moved our job on: we end it.
                log.info("job %s: %s", job_id, exc)
                self._cancel_if_asked(job_id)
            except Exception as exc:
                log.exception("job %s failed", job_id)
                with contextlib.suppress(StaleStatus):
                    self._finish(job_id, "FAILED", error=f"internal error: {exc}")
            finally:
                self.running.pop(job_id, None)
                self._update_queued()

    def _finish(self, job_id: str, status: str, **doc: Any) -> JobRecord:
        """End a job that is still active (`StaleStatus` when it ended meanwhile elsewhere).
        A SUCCESS lands only on a RUNNING job: a cancel that came first wins."""
        data = {"reason": doc["error"]} if doc.get("error") else None
        expect = ("RUNNING",) if status == "SUCCESS" else \
            [s for s in ACTIVE_STATUSES if s != status] + ["CANCELLATION_REQUESTED"]
        job = self.store.update_job(job_id, status=status, event_data=data, expect=expect,
                                    **doc)
        self.keys.forget(job_id)
        self.metrics.jobs.labels(status=status).inc()
        return job

    def _cancelled(self, job_id: str, running: _Running) -> bool:
        if running.cancel.is_set():
            self._finish(job_id, "CANCELLED")
            return True
        return False

    async def _run(self, job: JobRecord, running: _Running) -> None:
        if job.status == "QUEUED":
            job = self.store.update_job(job.id, status="VALIDATING", expect=("QUEUED",),
                                        replica=self.me, owner=self.me,
                                        lease_s=self.settings.lease_s)
            running.leased = True
            self._update_queued()
            outcome = await asyncio.to_thread(self._validate, job)
            if self._cancelled(job.id, running):
                return
            if isinstance(outcome, str):
                self._finish(job.id, "FAILED_VALIDATION", error=outcome)
                return
            job = self.store.update_job(job.id, status="VALIDATED", expect=("VALIDATING",),
                                        **outcome)
            if not job.doc["auto_start"] and not job.doc.get("start_requested"):
                return
        if self._cancelled(job.id, running):
            return
        await self._train(job, running)

    def _validate(self, job: JobRecord) -> dict[str, Any] | str:
        """Validate every file; a dict of job fields when training may go on, else the reason
        (the errors also go into a `validation-errors` event, with line numbers)."""
        declared = None
        if job.doc.get("classifier_targets"):
            declared = [TargetSpec(t["name"], tuple(t["labels"]), t.get("loss_function"),
                                   float(t.get("weight", 1.0)))
                        for t in job.doc["classifier_targets"]]
        limit = self.settings.max_reported_errors
        kind = None
        reports: list[tuple[str, str, ValidationReport]] = []
        for role, file_ids in (("training", [f["file_id"] for f in job.doc["training_files"]]),
                               ("validation", job.doc["validation_files"])):
            for file_id in file_ids:
                try:
                    path = self.store.file_path(file_id)
                except BlobMissing:
                    path = None
                if path is None or not path.exists():
                    return f"{role} file {file_id} was deleted; upload it again"
                report = validate_file(path, kind=kind, targets=declared, keep_examples=False,
                                       max_errors=limit)
                kind = kind or report.kind
                reports.append((role, file_id, report))
        skip = float(job.doc.get("invalid_sample_skip_percentage") or 0.0)
        errors: list[str] = []
        for role, file_id, report in reports:
            errors += [f"{role} file {file_id}, {e}" for e in report.errors]
        failed = [(role, file_id, r) for role, file_id, r in reports if not r.acceptable(skip)]
        if errors:
            self.store.add_event(job.id, "validation-errors", {
                "errors": errors[:limit],
                "error_count": sum(r.error_count for _, _, r in reports),
                "invalid_sample_skip_percentage": skip,
            })
        if failed:
            role, file_id, report = failed[0]
            if report.valid == 0 and report.error_count == 0:
                return f"{role} file {file_id} has no examples"
            shown = "; ".join(errors[:3])
            return (f"{report.error_count} of {report.lines} lines of the {role} file {file_id} "
                    f"are invalid ({report.invalid_fraction:.1%}, above "
                    f"invalid_sample_skip_percentage {skip:.1%}): {shown}"
                    + (" ..." if len(errors) > 3 else ""))
        training = [r for role, _, r in reports if role == "training"]
        merged = merge_reports(training)
        targets = resolve_targets(merged, declared)
        for target in targets:
            if len(target.labels) < 2 and target.loss_function == "single_class":
                return (f"target {target.name!r} has only the label(s) {list(target.labels)} in "
                        "the training data: a single_class target needs at least two labels")
        base = self._job_base(job)
        hyper = Hyperparameters.from_job(job.doc["hyperparameters"])
        return {
            "kind": merged.kind,
            "targets": [{"name": t.name, "labels": list(t.labels), "weight": t.weight,
                         "loss_function": t.loss_function} for t in targets],
            "validation": {role + ":" + file_id: r.to_dict() | {"errors": r.to_dict()["errors"][:5]}
                           for role, file_id, r in reports},
            "metadata": _estimate(base, hyper, merged),
        }

    def _dry_run(self, doc: dict[str, Any]) -> dict[str, Any]:
        reports = [validate_file(self.store.file_path(f["file_id"]), keep_examples=False,
                                 max_errors=0) for f in doc["training_files"]]
        merged = merge_reports(reports)
        base = self.registry.get(doc["base_model"])
        hyper = Hyperparameters.from_job(doc["hyperparameters"])
        metadata = _estimate(base, hyper, merged)
        steps = base.steps_for(merged.valid, hyper)
        batch = base.batch_size(hyper) or max(merged.valid, 1)
        return {
            "object": "job.metadata", "deprecated": False,
            "details": f"{merged.valid} valid examples in {merged.lines} lines; base model "
                       f"{base.name}; at most {steps} steps of {batch} examples",
            **metadata,
            "epochs": round(steps * min(batch, max(merged.valid, 1)) / max(merged.valid, 1), 4),
            "training_steps": steps,
        }

    async def _train(self, job: JobRecord, running: _Running) -> None:
        job = self.store.update_job(job.id, status="RUNNING", expect=("VALIDATED",),
                                    replica=self.me, owner=self.me,
                                    lease_s=self.settings.lease_s)
        running.leased = True
        self.metrics.jobs_running.inc()
        try:
            spec = self._spec(job)
            job_dir = self.store.job_dir(job.id)
            if spec.device is not None:
                # Checked again here: the cluster may have lost its GPUs since the job was
                # created, or FACTORY_DEVICE=cuda chose it; Ray would keep it pending forever.
                problem = await asyncio.to_thread(self.executor.device_problem, spec.device)
                if problem is not None:
                    self._finish(job.id, "FAILED", error=problem)
                    return
            run = running.run = await self.executor.submit(job.id, spec, job_dir)
            self.store.update_job(job.id, run=run.ref)
            running.tracking = self._tracking(job, job_dir)
            if running.tracking is not None:
                running.tracking.start(spec)
            if running.cancel.is_set():
                await run.cancel()
            await self._supervise(job, running, run)
        finally:
            self.metrics.jobs_running.dec()

    def _spec(self, job: JobRecord) -> TrainingSpec:
        """The job's training as the executors take it: blob keys, not paths (see
        `executors/base.py`)."""
        return TrainingSpec(
            base_model=self._job_base(job).name,
            kind=job.doc["kind"],
            targets=tuple(TargetSpec(t["name"], tuple(t["labels"]), t["loss_function"],
                                     float(t["weight"])) for t in job.doc["targets"]),
            training_files=tuple(TrainingFile(self.store.file_key(f["file_id"]),
                                              float(f["weight"]))
                                 for f in job.doc["training_files"]),
            validation_files=tuple(self.store.file_key(f) for f in job.doc["validation_files"]),
            # seed 0: the same data and hyperparameters give the same model
            hyperparameters=Hyperparameters.from_job(job.doc["hyperparameters"], seed=0),
            output_dir=self.store.model_key(job.id),
            checkpoints=self.settings.checkpoints,
            device=self._device(job),
        )

    def _device(self, job: JobRecord) -> str | None:
        """Where the job trains: its own `device`, else FACTORY_DEVICE; None for a base model
        that uses no accelerator (local-ngram), so that Ray holds no GPU for it."""
        if not self._job_base(job).capabilities.gpu:
            return None
        device = job.doc.get("device") or self.settings.device
        return None if device is None else str(device)

    def _tracking(self, job: JobRecord, job_dir: Path) -> JobTracking | None:
        """The job's trackers, opening in their thread (None when it names none). Its keys
        come out of this replica's memory here, and stay with the trackers."""
        integrations = job.doc.get("integrations") or []
        keys = self.keys.take(job.id)
        if not integrations:
            return None

        def event(name: str, data: Mapping[str, Any]) -> None:
            self.store.add_event(job.id, name, dict(data))

        return JobTracking(job.id, job_dir / "tracking", integrations, keys, event)

    async def _end_tracking(self, job_id: str, running: _Running, outcome: Outcome,
                            result: dict[str, Any] | None = None) -> None:
        """End the job's tracker runs with its outcome (before the outcome is recorded, so that
        a job seen ended has its tracker runs ended too); the model, on SUCCESS, as the store
        has it (fetched to this machine in the tracking thread, only when a tracker takes it)."""
        tracking = running.tracking
        if tracking is None or tracking.ended:
            return
        model: ModelDir | None = None
        if outcome == "SUCCESS":
            model = functools.partial(self.store.blobs.pinned, self.store.model_key(job_id))
        note = None
        if outcome == "STOPPED":
            step = "its start" if tracking.step is None else f"step {tracking.step}"
            note = TRACKING_STOPPED.format(replica=self.me, step=step, job_id=job_id)
        await tracking.finish(outcome, result, model, note)

    async def _supervise(self, job: JobRecord, running: _Running, run: TrainingRun) -> None:
        """Record what the run says (checkpoints, events, progress) until it ends, then its
        outcome: the model, a failure with its reason, or CANCELLED. The job's trackers get
        the same; they are ended as STOPPED when this replica stops supervising before the
        outcome is recorded (shut down, the lease taken over, an error)."""
        try:
            await self._follow(job, running, run)
        finally:
            await self._end_tracking(job.id, running, "STOPPED")

    async def _follow(self, job: JobRecord, running: _Running, run: TrainingRun) -> None:
        watcher = asyncio.create_task(self._watch_cancel(job.id, running))
        result: dict[str, Any] | None = None
        failure: str | None = None
        try:
            async for message in run.messages():
                kind = message["type"]
                if kind == "checkpoint":
                    self.store.add_checkpoint(job.id, message["step_number"],
                                              message["metrics"], int(time.time()))
                    if running.tracking is not None:
                        running.tracking.checkpoint(int(message["step_number"]),
                                                    message["metrics"])
                elif kind == "event":
                    self.store.add_event(job.id, str(message["name"]), dict(message["data"]))
                elif kind == "progress":
                    self._progressed(job.id, running, message)
                elif kind == "result":
                    result = message
                elif kind == "failed":
                    failure = str(message["reason"])
                running.cursor = run.cursor
        finally:
            watcher.cancel()
        if running.lost:
            return  # another replica took the lease: it records the outcome
        try:
            await self._record(job, running, result, failure)
        finally:
            await run.close()

    async def _record(self, job: JobRecord, running: _Running, result: dict[str, Any] | None,
                      failure: str | None) -> None:
        if running.progress:  # where it got to, for `jobs get` once it is over
            self.store.update_job(job.id, progress=dict(running.progress))
        current = self.store.get_job(job.id)
        if running.cancel.is_set() or (current is not None
                                       and current.status == "CANCELLATION_REQUESTED"):
            if result is not None:  # it finished as the cancel came: the cancel wins
                await asyncio.to_thread(self.store.blobs.delete_dir,
                                        self.store.model_key(job.id))
            await self._end_tracking(job.id, running, "CANCELLED")
            self._finish(job.id, "CANCELLED")
            return
        if result is None:
            await self._end_tracking(job.id, running, "FAILED")
            self._finish(job.id, "FAILED", error=failure or "the training ended without a result")
            return
        # The trackers end first, with the model (a cancel that lands while they upload it wins
        # below all the same: the job is CANCELLED, its tracker runs say it finished).
        await self._end_tracking(job.id, running, "SUCCESS", result)
        # The run published the model's files, whole; the record makes it visible: a crash
        # (or a failing store) between the two leaves files nobody reads, never a half model.
        when = time.time()
        model_id = fine_tuned_model_id(job.model, self.workspace, job.id, when)
        record = ModelRecord(id=model_id, job_id=job.id, root=job.model, created=int(when),
                             kind=job.doc["kind"],
                             doc={"targets": job.doc["targets"], "suffix": job.suffix,
                                  "base_model": self._job_base(job).name,
                                  "evaluation": result.get("evaluation")})
        steps = result.get("steps")
        progress = {**running.progress, "phase": "done", "done": None, "total": None}
        if isinstance(steps, int) and steps > 0:
            progress["step"] = steps
        if result.get("stopped"):
            progress["stopped"] = str(result["stopped"])
        running.progress = progress  # what a poll sees until the worker lets the job go
        try:
            self.store.finish_with_model(record, expect=("RUNNING",), owner=self.me,
                                         fine_tuned_model=model_id,
                                         trained_tokens=result["trained_tokens"],
                                         evaluation=result.get("evaluation"),
                                         calibration=result.get("calibration"),
                                         train_seconds=result.get("train_seconds"),
                                         progress=progress)
        except StaleStatus as exc:
            # A cancel (from any replica) came first: it wins, and the model goes.
            if exc.status == "CANCELLATION_REQUESTED":
                await asyncio.to_thread(self.store.blobs.delete_dir,
                                        self.store.model_key(job.id))
                self._finish(job.id, "CANCELLED")
                return
            raise
        self.metrics.jobs.labels(status="SUCCESS").inc()
        if self.on_model is not None:
            self.on_model(record)
        log.info("job %s: SUCCESS, model %s", job.id, model_id)

    # Supervision: leases, heartbeats, and taking over the jobs of a replica that died.
    async def _supervision(self) -> None:
        """Every third of FACTORY_LEASE_S: renew this replica's leases (the heartbeat), and take
        the jobs whose supervisor stopped renewing theirs."""
        interval = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat()
                await self._take_lapsed()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database away for a moment: try again next beat
                log.exception("supervision: heartbeat or take-over failed; retrying")

    async def _heartbeat(self) -> None:
        ids = [job_id for job_id, r in self.running.items() if r.leased]
        held = await asyncio.to_thread(self.store.renew_leases, ids, self.me,
                                       self.settings.lease_s)
        for job_id in ids:
            running = self.running.get(job_id)
            if running is None:
                continue
            if job_id not in held:
                job = self.store.get_job(job_id)
                if job is not None and job.status not in TERMINAL:
                    # It stalled past its lease and another replica took the job: let go.
                    log.warning("job %s: lease taken over by another replica; letting go",
                                job_id)
                    running.lost = True
                    if running.run is not None:
                        await running.run.abandon()
            elif running.run is not None and running.cursor != running.saved_cursor:
                with contextlib.suppress(StaleStatus):  # a cancel moved it: saved next beat
                    self.store.update_job(job_id, run_cursor=running.cursor)
                    running.saved_cursor = running.cursor

    async def _take_lapsed(self) -> None:
        lapsed = await asyncio.to_thread(self.store.lapsed_leases, SUPERVISED)
        for job, owner in lapsed:
            if job.id in self.running:
                continue
            taken = await asyncio.to_thread(self.store.take_lease, job.id, self.me,
                                            self.settings.lease_s, statuses=SUPERVISED)
            if not taken:
                continue  # another replica was first
            log.warning("job %s: replica %s stopped renewing its lease; %s supervises it now",
                        job.id, owner, self.me)
            task = asyncio.create_task(self._adopt(job.id, owner),
                                       name=f"factory-job-adopt-{job.id}")
            self.adopting.add(task)
            task.add_done_callback(self.adopting.discard)

    async def _adopt(self, job_id: str, owner: str) -> None:
        """Supervise a job whose replica died: follow its run to its end when the run outlived
        it (Ray), else end the job with the reason."""
        job = self.store.get_job(job_id)
        if job is None or job.status not in SUPERVISED:
            return
        running = self.running[job_id] = _Running(leased=True)
        try:
            if job.status != "VALIDATING":  # its trackers opened with its training
                self._tracking_interrupted(job, owner)
            ref = job.doc.get("run")
            run = None
            if job.status != "VALIDATING" and isinstance(ref, dict) \
                    and ref.get("executor") == self.executor.name:
                run = await self.executor.follow(job_id, ref,
                                                 int(job.doc.get("run_cursor") or 0))
            if run is None:
                if job.status == "CANCELLATION_REQUESTED":
                    self._finish(job_id, "CANCELLED")
                    return
                executor = ref.get("executor", "local") if isinstance(ref, dict) else "local"
                reason = (ORPHAN_REASON if executor == "local" else LOST_RUN_REASON).format(
                    replica=owner, status=job.status, lease=f"{self.settings.lease_s:g}",
                    executor=executor)
                self._finish(job_id, "FAILED", error=reason, owner=self.me)
                log.warning("job %s: FAILED, %s", job_id, reason)
                return
            self.store.add_event(job_id, "supervisor-changed", {"from": owner, "to": self.me})
            running.run = run
            running.progress = dict(job.doc.get("progress") or {})
            if job.status == "RUNNING":
                self.metrics.jobs_running.inc()
            try:
                await self._supervise(job, running, run)
            finally:
                if job.status == "RUNNING":
                    self.metrics.jobs_running.dec()
        except StaleStatus as exc:
            log.info("job %s: %s", job_id, exc)
        except Exception as exc:
            log.exception("job %s: following it failed", job_id)
            with contextlib.suppress(StaleStatus):
                self._finish(job_id, "FAILED", error=f"internal error: {exc}")
        finally:
            self.running.pop(job_id, None)

    def _tracking_interrupted(self, job: JobRecord, owner: str) -> None:
        """Say, per integration, that the job's tracker run stays where its dead replica left
        it: the keys lived in that replica's memory, and a W&B offline run on its disk."""
        for integration in job.doc.get("integrations") or []:
            kind = str(integration.get("type"))
            where = (", and its offline W&B run (if W&B was offline) is on that replica's disk, "
                     "to sync from there with `wandb sync`") if kind == "wandb" else ""
            self.store.add_event(job.id, TRACKING_EVENT, {
                "type": kind, "status": "interrupted", "reason": TRACKING_INTERRUPTED.format(
                    replica=owner, kind=kind, status=job.status, where=where, me=self.me,
                    job_id=job.id)})

    def _cancel_if_asked(self, job_id: str) -> None:
        """End as CANCELLED a job of this replica that a cancel (from anywhere) has reached."""
        job = self.store.get_job(job_id)
        # Ours: it records this replica, or none yet when the cancel came between this worker
        # picking the job up and its first status change.
        replica = job.doc.get("replica") if job is not None else None
        mine = replica == self.settings.replica or (replica is None and job_id in self.running)
        if job is not None and job.status == "CANCELLATION_REQUESTED" and mine:
            with contextlib.suppress(StaleStatus):
                self._finish(job_id, "CANCELLED")

    async def _watch_cancel(self, job_id: str, running: _Running) -> None:
        """Stop the run when the job was cancelled on another replica (this one's own
        cancels stop it at once)."""
        while not running.cancel.is_set():
            await asyncio.sleep(1.0)
            job = await asyncio.to_thread(self.store.get_job, job_id)
            if job is None or job.status in ("CANCELLATION_REQUESTED", *TERMINAL):
                running.cancel.set()
                if running.run is not None:
                    await running.run.cancel()


def _estimate(base: BaseModel, hyper: Hyperparameters, merged: ValidationReport) -> dict[str, Any]:
    """Mistral's job `metadata`: the base model's own duration estimate and token counts."""
    steps = base.steps_for(merged.valid, hyper)
    batch = base.batch_size(hyper) or max(merged.valid, 1)
    tokens_per_example = max(1, merged.total_chars // max(1, merged.valid) // 4)
    return {
        "expected_duration_seconds": max(1, round(base.estimate_seconds(
            merged.valid, merged.total_chars, hyper))),
        "cost": 0.0, "cost_currency": "EUR",
        "train_tokens_per_step": batch * tokens_per_example,
        "train_tokens": steps * batch * tokens_per_example,
        "data_tokens": merged.total_chars // 4, "estimated_start_time": None,
    }


def _numbers(doc: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) evaluation, flattened to `a.b` keys, for a span event."""
    out: dict[str, float] = {}
    for key, value in doc.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
    return out
