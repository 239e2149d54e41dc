"""The executor seam: what the job manager asks of whatever runs a training.

A `TrainingSpec` handed to an executor names blobs, not paths: its training and validation
files are store keys (`files/<id>.jsonl`) and its `output_dir` is the model's key
(`models/<job id>`). The executor reads the files from the store where the training runs and
publishes the model back to it (`Blobs.publish_dir`: the manifest last, so a model is visible only
once whole); the manager then records the model, which is what makes it served.

A run speaks the trainer's messages (`service/factory/trainer.py`): `checkpoint`, `event`,
`progress`, and last either `result` (the model's files are in the store) or `failed` with a
reason a user can act on. `ref` is what another replica needs to follow the run when its
supervisor dies: `follow` answers None when the run died with it (a local child process).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from service.factory.blobs import Blobs
from service.factory.models.base import TrainingFile, TrainingSpec

Message = dict[str, Any]


class TrainingRun(ABC):
    """One training, started by `Executor.submit` or found again by `Executor.follow`."""

    #: Stored on the job (`run`): the executor's name and how to find the run again.
    ref: dict[str, str]

    @abstractmethod
    def messages(self) -> AsyncIterator[Message]:
        """The run's messages in order, ending with `result` or `failed`."""

    @property
    def cursor(self) -> int:
        """How many messages were consumed: a follower resumes after them (no event twice)."""
        return 0

    @abstractmethod
    async def cancel(self) -> None:
        """Stop the training now (the manager records CANCELLED once `messages` ends)."""

    @abstractmethod
    async def abandon(self) -> None:
        """This replica stops supervising (shutdown, or its lease was taken over): a run that
        can outlive it goes on for the next supervisor; one that cannot is stopped."""

    async def close(self) -> None:  # noqa: B027 - only remote runs hold anything
        """The outcome is recorded: free what the run still holds."""


class Executor(ABC):
    name: str

    @abstractmethod
    async def submit(self, job_id: str, spec: TrainingSpec, job_dir: Path) -> TrainingRun:
        """Start training `spec` (blob keys, see the module's docstring) for `job_id`; `job_dir`
        is this replica's scratch directory for the job. Nothing of the job's experiment
        tracking goes to the run: the supervising replica tracks it (`tracking/base.py`)."""

    def device_problem(self, device: str) -> str | None:
        """None when a training on `device` ("cpu", "cuda", "cuda:N") can get one here, else a
        sentence saying what to do instead. Blocking (it may ask a cluster): call it from a
        thread. A job is refused (422) or failed on it rather than left waiting for a GPU that
        never comes."""
        return None

    async def follow(self, job_id: str, ref: Mapping[str, str],
                     cursor: int = 0) -> TrainingRun | None:
        """The run `ref` names, still going or finished but not yet recorded, from message
        `cursor` on; None when it died with the replica that supervised it."""
        return None

    async def stop(self, ref: Mapping[str, str]) -> None:  # noqa: B027
        """Stop the run `ref` names from a replica that does not supervise it (a cancel)."""

    async def close(self) -> None:  # noqa: B027
        """The factory stops."""


def localised(spec: TrainingSpec, blobs: Blobs) -> TrainingSpec:
    """`spec` with local paths: the files fetched from the store (once, into its cache) and the
    directory the model is written to before `blobs.publish_dir(spec.output_dir, ...)`."""
    return dataclasses.replace(
        spec,
        training_files=tuple(TrainingFile(str(blobs.local_file(f.path)), f.weight)
                             for f in spec.training_files),
        validation_files=tuple(str(blobs.local_file(key)) for key in spec.validation_files),
        output_dir=str(blobs.output_dir(spec.output_dir)))
