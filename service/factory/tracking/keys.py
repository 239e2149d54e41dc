"""Where an integration's API key lives: in the memory of the replica that created the job, and
nowhere else.

The key is never written down: the job's stored `integrations` leave it out (`jobs.py`), so the
database, the job's JSON, its events and the logs never hold it. Between the request and the
training it waits in this replica's memory (`KeyRing`, by job id); when training starts, the
replica takes it from the ring to open the job's trackers itself, since the trackers run in the
replica that supervises the job (`base.py`), for every executor: the key never leaves this
process, neither to a trainer child's environment nor through a cluster's API (Ray's dashboard
shows an actor's arguments), nor to the spec file in the job's directory. The trackers hold it
until the run ends; an offline W&B run is started without it.

What this costs, by design: a job that the factory restarts (QUEUED or VALIDATED when it
stopped) or that another replica starts trains without its key: W&B then writes the run offline
(an event says where, and the `wandb sync` command), an MLflow server that needs a token refuses
the run (an event says so). A replica that takes over a running job (its supervisor died) has no
key either and does not resume the tracker runs (an `interrupted` event per integration).
Encrypting keys into the database with a factory-wide secret would keep them across restarts;
that secret would then be one more thing to rotate and leak, for a case (a restart between create
and train, seconds to minutes) that the offline run covers.
"""

from __future__ import annotations

from collections.abc import Sequence


class KeyRing:
    """API keys of jobs that have not started training yet, in this process's memory only."""

    def __init__(self) -> None:
        self._keys: dict[str, list[str | None]] = {}

    def keep(self, job_id: str, keys: Sequence[str | None]) -> None:
        if any(keys):
            self._keys[job_id] = list(keys)

    def take(self, job_id: str) -> list[str | None]:
        """The job's keys, forgotten here (they go to the job's trackers, in this process)."""
        return self._keys.pop(job_id, [])

    def forget(self, job_id: str) -> None:
        self._keys.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._keys)
