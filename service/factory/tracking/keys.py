"""How an integration's API key gets from the job request to the trainer, and nowhere else.

The key is never written down: the job's stored `integrations` leave it out (`jobs.py`), so the
database, the job's JSON, its events and the logs never hold it. Between the request and the
training, it lives in this replica's memory (`KeyRing`, by job id); when training starts it is
handed to the trainer child in one environment variable (`HANDOFF_ENV`, JSON with the job's
integrations), which the trainer reads and removes from its environment before any tracker
starts (`take_handoff`), and the ring forgets it. Keys are not written to the spec file either,
which sits in the job's directory.

What this costs, by design: a job that the factory restarts (QUEUED or VALIDATED when it
stopped) or that another replica starts trains without its key: W&B then writes the run offline
(an event says where, and the `wandb sync` command), an MLflow server that needs a token refuses
the run (an event says so). Encrypting keys into the database with a factory-wide secret would
keep them across restarts; that secret would then be one more thing to rotate and leak, for
a case (a restart between create and train, seconds to minutes) that the offline run covers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

#: The trainer's environment variable carrying the job's integrations and their keys.
HANDOFF_ENV = "FACTORY_TRACKING"


class KeyRing:
    """API keys of jobs that have not started training yet, in this process's memory only."""

    def __init__(self) -> None:
        self._keys: dict[str, list[str | None]] = {}

    def keep(self, job_id: str, keys: Sequence[str | None]) -> None:
        if any(keys):
            self._keys[job_id] = list(keys)

    def take(self, job_id: str) -> list[str | None]:
        """The job's keys, forgotten here (they go to its trainer)."""
        return self._keys.pop(job_id, [])

    def forget(self, job_id: str) -> None:
        self._keys.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class Handoff:
    """What the trainer needs to open the job's trackers."""

    job_id: str
    run_dir: Path
    integrations: tuple[Mapping[str, Any], ...]
    keys: tuple[str | None, ...]


def handoff_env(job_id: str, integrations: Sequence[Mapping[str, Any]] | None,
                keys: Sequence[str | None], run_dir: Path) -> dict[str, str]:
    """The trainer's environment addition for a job (nothing when it has no integrations)."""
    if not integrations:
        return {}
    padded = [*keys, *([None] * len(integrations))][:len(integrations)]
    return {HANDOFF_ENV: orjson.dumps({
        "job_id": job_id, "run_dir": str(run_dir),
        "integrations": [dict(i) for i in integrations], "keys": padded}).decode()}


def take_handoff(environ: dict[str, str] | None = None) -> Handoff | None:
    """In the trainer: the handoff, removed from the environment (so that no process the
    trackers start inherits the keys)."""
    env = os.environ if environ is None else environ
    raw = env.pop(HANDOFF_ENV, None)
    if not raw:
        return None
    doc = orjson.loads(raw)
    return Handoff(job_id=str(doc["job_id"]), run_dir=Path(doc["run_dir"]),
                   integrations=tuple(doc["integrations"]),
                   keys=tuple(None if k is None else str(k) for k in doc["keys"]))
