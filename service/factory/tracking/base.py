"""The experiment-tracker seam: one protocol, a registry of kinds, one module per tracker.

A job's `integrations` (Mistral's `{"type": "wandb", ...}`, and `{"type": "mlflow", ...}`) name
trackers. They run in the factory replica that supervises the job, beside the record of the run,
not in the training: that replica already receives every message of the run whatever executes it
(a local child process, a Ray actor: `jobs.py`, `JobManager._supervise`), so one code path tracks
for every executor; and the API keys never leave that replica's memory (`keys.py`): nothing is
handed to a child's environment, nor through a cluster's API (Ray's dashboard shows an actor's
arguments). The supervisor opens the trackers when the run is submitted
(`reporter.JobTracking`), hands them the hyperparameters, every checkpoint's losses, and at the
end the evaluation and the model directory (fetched from the store), or the job's failure,
cancel, or this replica's stopping.

The price: the trackers see the run, not the machine that trains it. W&B's system metrics
(CPU, memory, GPU) would describe the factory replica, so they are off (`wandb_run.py`); the
training's own numbers are all in the checkpoints. And a run's tracker lives with its replica:
a replica that takes a job over (its supervisor died) has neither the key nor a W&B offline run
on its disk, so it says so in the job's events instead of resuming the run (`jobs.py`).

A tracker kind is a module in `TRACKERS` with `PACKAGE` (what it imports), `INSTALL` (the command
that installs it) and `open_run(config, api_key, context) -> Tracker`. The registry imports it only
when a job asks for it, after importing its package, so a factory whose jobs track nothing never
imports `wandb` or `mlflow`, and a missing one is an event saying what to install, never a failed
job.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

#: A hyperparameter's value as trackers take it.
Param = str | int | float | bool | None

#: Kind name -> its module. A new tracker is a module and a line here.
TRACKERS: dict[str, str] = {
    "wandb": "service.factory.tracking.wandb_run",
    "mlflow": "service.factory.tracking.mlflow_run",
}

#: The job event every tracker reports to: `{"type": kind, "status": ..., ...}`.
EVENT = "integration"

#: How a tracked run ended: the job's own outcome, or STOPPED when the replica that tracked it
#: stopped supervising the job (it shut down, or another replica took the job's lease over).
Outcome = Literal["SUCCESS", "FAILED", "CANCELLED", "STOPPED"]


class Tracker(Protocol):
    """One run in one tracker. Calls are made in this order, from one thread: `start` once, `log`
    per checkpoint, `finish` once, whatever the outcome (`model_dir` only on SUCCESS). A call that
    raises disables the tracker for the rest of the run (the job goes on)."""

    #: Whether `finish` uses the model's directory: only then is it fetched from the store (with
    #: S3, a download to the replica's cache).
    takes_model: bool

    def start(self, params: Mapping[str, Param]) -> None: ...

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, summary: Mapping[str, float], model_dir: Path | None,
               outcome: Outcome) -> None: ...


@dataclass(frozen=True)
class RunContext:
    """What a tracker knows of its job: its id (the run's default name), a local directory it
    may write into (the job's, on the supervising replica), and how to record a job event (where
    the run is: a URL, or an offline directory to sync)."""

    job_id: str
    run_dir: Path
    event: Callable[[str, Mapping[str, Any]], None]


class UnknownTracker(LookupError):
    pass


class TrackerMissing(ImportError):
    """The tracker's package is not installed; the message says what to install."""


def tracker_module(kind: str) -> ModuleType:
    """The module of a tracker kind, imported (`TrackerMissing` when its package is not
    installed, `UnknownTracker` for a kind no module implements)."""
    name = TRACKERS.get(kind)
    if name is None:
        raise UnknownTracker(f"no tracker for integrations of type {kind!r}; known: "
                             f"{', '.join(sorted(TRACKERS))}")
    module = importlib.import_module(name)
    try:
        importlib.import_module(str(module.PACKAGE))
    except ImportError as exc:  # not installed, or installed without what it needs
        raise TrackerMissing(f"the {module.PACKAGE!r} package cannot be imported on the factory "
                             f"replica that supervises the job ({exc}): {module.INSTALL}") from None
    return module


def open_tracker(config: Mapping[str, Any], api_key: str | None,
                 context: RunContext) -> Tracker:
    """A tracker for one entry of a job's `integrations` (its stored form, without the key,
    which comes apart: `keys.py`)."""
    module = tracker_module(str(config.get("type")))
    tracker: Tracker = module.open_run(dict(config), api_key, context)
    return tracker
