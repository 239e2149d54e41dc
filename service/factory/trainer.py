"""The training process: `python -m service.factory.trainer <spec.json>`.

Training runs here, in its own process, so the factory's event loop never waits for numpy and a
cancel is a plain kill (effective at once, nothing to clean up: the model directory is renamed
into place only when complete). Progress goes to stdout as JSON lines:
`{"type": "checkpoint", ...}` per checkpoint, `{"type": "event", "name": ..., "data": ...}` for
facts the job should record (the device that trained it), `{"type": "progress", "phase": ...,
"done": ..., "total": ...}` as the model goes (each phase, each step), and one
`{"type": "result", ...}` at the
end; a failure is a non-zero exit with the reason as the last line of stderr. The job hands over a
`TrainingSpec` (JSON) naming the base model; which model trains is the registry's business.
Stdout is the protocol's alone: what libraries print goes to stderr. The job's experiment
trackers, if it names any, are not here: the factory replica that supervises the job feeds them
from these messages (`service.factory.tracking`), so the trainer never holds an API key.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from service.factory.data import Example, validate_file
from service.factory.models.base import Checkpoint, TrainingData, TrainingSpec
from service.factory.models.registry import default_registry

_PR_SET_PDEATHSIG = 1
#: The factory's pid, set by the factory when it starts a trainer.
PARENT_ENV = "FACTORY_TRAINER_PARENT_PID"


#: The protocol's stream: the process's stdout as it started (`_own_stdout` points fd 1, where
#: anything else would print, at stderr).
_protocol = sys.stdout


def _emit(message: dict[str, Any]) -> None:
    _protocol.write(orjson.dumps(message).decode() + "\n")
    _protocol.flush()


def _own_stdout() -> None:
    global _protocol
    _protocol = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)


Emit = Callable[[dict[str, Any]], None]


class Control:
    """Checkpoints, events and progress go to `emit` as messages (stdout's JSON lines in the
    trainer process; a buffer that the factory polls on a Ray worker); SIGTERM asks the model to
    stop at its next step (the factory's cancel is a SIGKILL, this is for a polite stop), where
    this runs in a process's main thread."""

    def __init__(self, emit: Emit = _emit) -> None:
        self.stop = False
        self.emit = emit
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: object) -> None:
        self.stop = True

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 6)

        metrics = {"train_loss": r(checkpoint.train_loss),
                   "valid_loss": r(checkpoint.valid_loss),
                   "valid_mean_token_accuracy": r(checkpoint.valid_accuracy)}
        self.emit({"type": "checkpoint", "step_number": checkpoint.step_number,
                   "metrics": metrics})

    def event(self, name: str, data: Mapping[str, Any]) -> None:
        self.emit({"type": "event", "name": name, "data": dict(data)})

    def progress(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        self.emit({"type": "progress", "phase": phase, "done": done, "total": total})

    def cancelled(self) -> bool:
        return self.stop


def load_data(spec: TrainingSpec) -> TrainingData:
    examples: list[Example] = []
    weights: list[float] = []
    for item in spec.training_files:
        report = validate_file(item.path, kind=spec.kind, targets=spec.targets, max_errors=0)
        examples.extend(report.examples)
        weights.extend([item.weight] * len(report.examples))
    validation: list[Example] = []
    for path in spec.validation_files:
        validation.extend(validate_file(path, kind=spec.kind, targets=spec.targets,
                                        max_errors=0).examples)
    if not examples:
        raise ValueError("no valid training example left")
    return TrainingData(examples, weights, validation)


def run(spec: TrainingSpec, control: Control | None = None) -> dict[str, Any]:
    """Train the model `spec` names into `spec.output_dir` (renamed into place once whole);
    returns the `result` message, also emitted last."""
    base = default_registry().get(spec.base_model)
    missing = base.availability()
    if missing is not None:
        raise RuntimeError(missing)
    control = control or Control()
    control.progress("reading")  # the training files, validated again: seconds for large ones
    data = load_data(spec)
    model, evaluation = base.train(data, spec, control)
    output = Path(spec.output_dir)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save(partial)
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    examples = data.examples
    tokens_per_example = sum(len(e.text.split()) for e in examples) / len(examples)
    trained_examples = int(model.info.get("trained_examples", len(examples)))
    result = {
        "type": "result",
        "trained_tokens": int(trained_examples * tokens_per_example),
        "examples": len(examples),
        "steps": int(model.info.get("steps", model.info.get("iterations", 0))),
        "stopped": model.info.get("stopped"),
        "train_seconds": model.info.get("train_seconds"),
        # The temperatures fitted after training, where, and ECE before and after, per target.
        "calibration": model.info.get("calibration"),
        "evaluation": None if evaluation is None else {
            "valid_loss": round(evaluation.loss, 6),
            "valid_accuracy": round(evaluation.accuracy, 6),
            "targets": evaluation.targets,
        },
    }
    control.emit(result)
    return result


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the factory dies, so a crashed factory leaves no orphan training
    (its restart marks the job FAILED; a trainer still running would be invisible to it). If the
    factory died before this ran, the parent is already someone else: stop at once."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):
        os._exit(3)


def main(argv: list[str]) -> int:
    _die_with_parent()
    _own_stdout()
    if len(argv) != 1:
        print("usage: python -m service.factory.trainer <spec.json>", file=sys.stderr)
        return 2
    try:
        run(TrainingSpec.from_json(orjson.loads(Path(argv[0]).read_bytes())))
    except MemoryError:
        print("training failed: out of memory; train on fewer or shorter examples, or give the "
              "factory more memory", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
