"""The supervisor's side of tracking: a job's trackers opened, fed, and kept from hurting it.

A tracker is a guest of the job's record: it is opened when the run is submitted, told the
hyperparameters, every checkpoint's losses and the final evaluation, and given the model
directory at the end (or told that the job failed, was cancelled, or that this replica stopped
supervising it). Nothing it does can fail or stop the job: a tracker whose package is missing is
an `integration` event saying what to install; one whose call raises is an event with the reason
(any key scrubbed from it) and is left out for the rest of the run.

Tracker calls block: an HTTP request to MLflow (up to a minute when its server is down),
`wandb.init`'s reachability probe (3 s at most), the model's upload. The supervisor's event loop
must never wait on them, so `JobTracking` runs a job's calls in a thread of the job's own, in the
order they were made; the loop only waits for the end (`finish`), so that a job is recorded as
ended once its tracker runs are. The trainer is never slowed by a tracker either: it sends its
checkpoints to the supervisor, which queues them for the tracking thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.factory.models.base import TrainingSpec
from service.factory.tracking.base import (
    EVENT,
    Outcome,
    Param,
    RunContext,
    Tracker,
    TrackerMissing,
    UnknownTracker,
    open_tracker,
)

log = logging.getLogger("service.factory.tracking")

Event = Callable[[str, Mapping[str, Any]], None]
#: The model's directory on this machine, for as long as the block reads it (the store's
#: `Blobs.pinned`): fetched only when a tracker is left to take it.
ModelDir = Callable[[], contextlib.AbstractContextManager[Path]]


def numbers(doc: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested document, flattened to `a.b` keys (booleans and texts left
    out): what trackers take as metrics."""
    out: dict[str, float] = {}
    for key, value in doc.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            out[f"{prefix}{key}"] = float(value)
        elif isinstance(value, Mapping):
            out.update(numbers(value, f"{prefix}{key}."))
    return out


def spec_params(spec: TrainingSpec) -> dict[str, Param]:
    """A job's hyperparameters and set-up, flat, as every tracker records them."""
    params: dict[str, Param] = {f"hyperparameters.{k}": v
                                for k, v in asdict(spec.hyperparameters).items()}
    params.update({
        "base_model": spec.base_model, "kind": spec.kind, "device": spec.device,
        "checkpoints": spec.checkpoints, "training_files": len(spec.training_files),
        "validation_files": len(spec.validation_files),
        "targets": ",".join(t.name for t in spec.targets),
    })
    for target in spec.targets:
        params[f"targets.{target.name}.labels"] = ",".join(target.labels)
    return params


class Reporter:
    """The trackers of one job. Every call blocks (the module's docstring): make them from one
    thread, in order (`JobTracking` does)."""

    def __init__(self, job_id: str, run_dir: Path, integrations: Sequence[Mapping[str, Any]],
                 keys: Sequence[str | None], event: Event) -> None:
        self._event = event
        self._trackers: list[tuple[str, Tracker]] = []
        self._secrets = [k for k in keys if k]
        padded = [*keys, *([None] * len(integrations))][:len(integrations)]
        context = RunContext(job_id, run_dir, event)
        # No stdout redirect around the trackers' calls (as the trainer, whose stdout was its
        # protocol, had): here stdout is the factory's log, and `contextlib.redirect_stdout`
        # swaps the process-wide `sys.stdout`, which two jobs tracking at once in one replica
        # would race on (one job's exit restoring the stream the other had swapped out).
        for config, key in zip(integrations, padded, strict=True):
            kind = str(config.get("type"))
            try:
                tracker = open_tracker(config, key, context)
            except (TrackerMissing, UnknownTracker) as exc:
                event(EVENT, {"type": kind, "status": "unavailable", "reason": str(exc)})
            except Exception as exc:
                event(EVENT, {"type": kind, "status": "failed",
                              "reason": self._scrub(f"{type(exc).__name__}: {exc}")})
            else:
                self._trackers.append((kind, tracker))

    @property
    def active(self) -> list[str]:
        """The kinds of the trackers still taking the run."""
        return [kind for kind, _ in self._trackers]

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[key]")
        return text

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for kind, tracker in list(self._trackers):
            try:
                call(tracker)
            except Exception as exc:
                self._trackers.remove((kind, tracker))
                self._event(EVENT, {"type": kind, "status": "failed",
                                    "reason": self._scrub(f"{type(exc).__name__}: {exc}")})

    def start(self, spec: TrainingSpec) -> None:
        params = spec_params(spec)
        self._each(lambda t: t.start(params))

    def checkpoint(self, step: int, metrics: Mapping[str, float | None]) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if values:
            self._each(lambda t: t.log(step, values))

    def finish(self, outcome: Outcome, result: Mapping[str, Any] | None = None,
               model: ModelDir | None = None, note: str | None = None) -> None:
        """The run's end: `result` is the trainer's result message (on SUCCESS), `model` gets
        the model's directory (called only when a tracker takes it); `note`, for a STOPPED run,
        is said in an event per tracker."""
        if not self._trackers:
            return
        summary: dict[str, float] = {}
        if result is not None:
            summary = numbers({k: result.get(k) for k in ("trained_tokens", "examples",
                                                          "steps", "train_seconds")})
            if isinstance(result.get("evaluation"), Mapping):
                summary.update(numbers(result["evaluation"], "evaluation."))
        if note is not None:
            for kind in self.active:
                self._event(EVENT, {"type": kind, "status": "stopped", "reason": note})
        with contextlib.ExitStack() as stack:
            model_dir = None
            if outcome == "SUCCESS" and model is not None \
                    and any(t.takes_model for _, t in self._trackers):
                try:
                    model_dir = stack.enter_context(model())
                except Exception as exc:  # the store away: the numbers are still worth having
                    for kind in self.active:
                        self._event(EVENT, {"type": kind, "status": "failed",
                                            "reason": "the model's files could not be read "
                                            f"from the store ({type(exc).__name__}: {exc}): "
                                            "the run has the job's numbers, not its model"})
            self._each(lambda t: t.finish(summary, model_dir, outcome))
        self._trackers.clear()


class JobTracking:
    """A job's `Reporter`, driven from the supervisor's event loop: the calls run in a thread of
    the job's own, in the order they were made. `start` and `checkpoint` are queued and return at
    once; `finish` (once, later calls do nothing) waits until every call before it is done."""

    def __init__(self, job_id: str, run_dir: Path, integrations: Sequence[Mapping[str, Any]],
                 keys: Sequence[str | None], event: Event) -> None:
        self.job_id = job_id
        #: The last checkpoint's step handed on (what a STOPPED run's note names).
        self.step: int | None = None
        self._ended = False
        self._thread = ThreadPoolExecutor(max_workers=1,
                                          thread_name_prefix=f"factory-tracking-{job_id[:8]}")
        self._reporter = self._thread.submit(Reporter, job_id, run_dir, integrations, keys,
                                             event)
        self._reporter.add_done_callback(self._logged)

    @property
    def ended(self) -> bool:
        return self._ended

    def _logged(self, future: Future[Any]) -> None:
        """A call that raised past the reporter (a bug: the reporter catches the trackers'
        errors) is logged, never raised in the job."""
        error = None if future.cancelled() else future.exception()
        if error is not None:
            log.error("job %s: tracking failed: %s", self.job_id,
                      f"{type(error).__name__}: {error}")

    def _call(self, call: Callable[[Reporter], None]) -> Future[None]:
        future = self._thread.submit(lambda: call(self._reporter.result()))
        future.add_done_callback(self._logged)
        return future

    def start(self, spec: TrainingSpec) -> None:
        self._call(lambda r: r.start(spec))

    def checkpoint(self, step: int, metrics: Mapping[str, float | None]) -> None:
        self.step = step
        values = dict(metrics)
        self._call(lambda r: r.checkpoint(step, values))

    async def finish(self, outcome: Outcome, result: Mapping[str, Any] | None = None,
                     model: ModelDir | None = None, note: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        done = self._call(lambda r: r.finish(outcome, result, model, note))
        self._thread.shutdown(wait=False)
        # Shielded: a supervisor cancelled meanwhile (the factory stopping) still lets the
        # trackers end, rather than cancelling a finish still queued behind a checkpoint.
        with contextlib.suppress(Exception):
            await asyncio.shield(asyncio.wrap_future(done))
