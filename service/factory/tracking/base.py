"""The experiment-tracker seam: one protocol, a registry of kinds, one module per tracker.

A job's `integrations` (Mistral's `{"type": "wandb", ...}`, and `{"type": "mlflow", ...}`) name
trackers. They run in the trainer process, beside the model, since that is where the losses
are, and so whatever runs the trainer (a local child, a Ray task) tracks without more code: the
trainer opens them (`reporter.Reporter`), hands them the hyperparameters, every checkpoint's
losses and the final evaluation, and the model directory at the end.

A tracker kind is a module in `TRACKERS` with `PACKAGE` (what it imports), `INSTALL` (the command
that installs it) and `open_run(config, api_key, context) -> Tracker`. The registry imports it only
when a job asks for it, after importing its package, so the factory itself never
imports `wandb` or `mlflow`, and a missing one is an event saying what to install, never a failed
job.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

#: A hyperparameter's value as trackers take it.
Param = str | int | float | bool | None

#: Kind name -> its module. A new tracker is a module and a line here.
TRACKERS: dict[str, str] = {
    "wandb": "service.factory.tracking.wandb_run",
    "mlflow": "service.factory.tracking.mlflow_run",
}

#: The job event every tracker reports to: `{"type": kind, "status": ..., ...}`.
EVENT = "integration"


class Tracker(Protocol):
    """One run in one tracker. Calls are made in this order: `start` once, `log` per checkpoint,
    `finish` once (also when training failed: `ok` false). A call that raises disables the
    tracker for the rest of the run (the job goes on)."""

    def start(self, params: Mapping[str, Param]) -> None: ...

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, summary: Mapping[str, float], model_dir: Path | None, ok: bool) -> None: ...


@dataclass(frozen=True)
class RunContext:
    """What a tracker knows of its job: its id (the run's default name), a local directory it
    may write into (the job's, on the machine that trains), and how to record a job event (where
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
        raise TrackerMissing(f"the {module.PACKAGE!r} package cannot be imported where the job "
                             f"trained ({exc}): {module.INSTALL}") from None
    return module


def open_tracker(config: Mapping[str, Any], api_key: str | None,
                 context: RunContext) -> Tracker:
    """A tracker for one entry of a job's `integrations` (its stored form, without the key,
    which comes apart: `keys.py`)."""
    module = tracker_module(str(config.get("type")))
    tracker: Tracker = module.open_run(dict(config), api_key, context)
    return tracker
