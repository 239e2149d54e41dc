"""The trainer's side of tracking: the job's trackers opened, fed, and kept from hurting it.

A tracker is a guest of the training: it is opened after the data is read, told the
hyperparameters, every checkpoint's losses and the final evaluation, and given the model
directory at the end. Nothing it does can fail or stop the job: a tracker whose package is
missing is an `integration` event saying what to install; one whose call raises is an event with
the reason (any key scrubbed from it) and is left out for the rest of the run. Without
integrations the reporter does nothing and imports nothing.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from service.factory.models.base import TrainingSpec
from service.factory.tracking.base import (
    EVENT,
    Param,
    RunContext,
    Tracker,
    TrackerMissing,
    UnknownTracker,
    open_tracker,
)
from service.factory.tracking.keys import Handoff, take_handoff

Event = Callable[[str, Mapping[str, Any]], None]


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
    def __init__(self, handoff: Handoff | None, event: Event) -> None:
        self._event = event
        self._trackers: list[tuple[str, Tracker]] = []
        self._secrets = [k for k in (handoff.keys if handoff else ()) if k]
        if handoff is None:
            return
        context = RunContext(handoff.job_id, handoff.run_dir, event)
        for config, key in zip(handoff.integrations, handoff.keys, strict=True):
            kind = str(config.get("type"))
            try:
                with self._quiet():
                    tracker = open_tracker(config, key, context)
            except (TrackerMissing, UnknownTracker) as exc:
                event(EVENT, {"type": kind, "status": "unavailable", "reason": str(exc)})
            except Exception as exc:
                event(EVENT, {"type": kind, "status": "failed",
                              "reason": self._scrub(f"{type(exc).__name__}: {exc}")})
            else:
                self._trackers.append((kind, tracker))

    @classmethod
    def from_environment(cls, event: Event) -> Reporter:
        return cls(take_handoff(), event)

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Trackers print; the trainer's stdout is its protocol with the factory."""
        with contextlib.redirect_stdout(sys.stderr):
            yield

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[key]")
        return text

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for kind, tracker in list(self._trackers):
            try:
                with self._quiet():
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

    def finish(self, result: Mapping[str, Any] | None, model_dir: Path | None) -> None:
        """The run's end: `result` is the trainer's result line (None when training failed)."""
        summary: dict[str, float] = {}
        if result is not None:
            summary = numbers({k: result.get(k) for k in ("trained_tokens", "examples",
                                                          "steps", "train_seconds")})
            if isinstance(result.get("evaluation"), Mapping):
                summary.update(numbers(result["evaluation"], "evaluation."))
        ok = result is not None
        self._each(lambda t: t.finish(summary, model_dir if ok else None, ok))
        self._trackers.clear()
