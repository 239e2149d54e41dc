"""The training process: `python -m service.factory.trainer <spec.json>`.

Training runs here, in its own process, so the factory's event loop never waits for numpy and a
cancel is a plain kill (effective at once, nothing to clean up: the model directory is renamed
into place only when complete). Progress goes to stdout as JSON lines:
`{"type": "checkpoint", ...}` per checkpoint and one `{"type": "result", ...}` at the end; a
failure is a non-zero exit with the reason as the last line of stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from service.factory.data import Example, TargetSpec, validate_file
from service.factory.model import Checkpoint, Hyperparameters, train

_PR_SET_PDEATHSIG = 1
#: The factory's pid, set by the factory when it starts a trainer.
PARENT_ENV = "FACTORY_TRAINER_PARENT_PID"


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(message).decode() + "\n")
    sys.stdout.flush()


def run(spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    targets = [TargetSpec(t["name"], tuple(t["labels"]), t["loss_function"], float(t["weight"]))
               for t in spec["targets"]]
    examples: list[Example] = []
    weights: list[float] = []
    for item in spec["training_files"]:
        report = validate_file(item["path"], kind=kind, targets=targets, max_errors=0)
        examples.extend(report.examples)
        weights.extend([float(item["weight"])] * len(report.examples))
    validation: list[Example] = []
    for path in spec["validation_files"]:
        validation.extend(validate_file(path, kind=kind, targets=targets, max_errors=0).examples)
    if not examples:
        raise ValueError("no valid training example left")
    h = spec["hyperparameters"]
    hyper = Hyperparameters(
        training_steps=h.get("training_steps"), learning_rate=float(h["learning_rate"]),
        weight_decay=float(h.get("weight_decay") if h.get("weight_decay") is not None else 0.1),
        warmup_fraction=float(h.get("warmup_fraction")
                              if h.get("warmup_fraction") is not None else 0.05),
        epochs=h.get("epochs"), seed=int(spec.get("seed", 0)),
    )

    def on_checkpoint(c: Checkpoint) -> None:
        _emit({"type": "checkpoint", "step_number": c.step_number, "created_at": c.created_at,
               "metrics": {"train_loss": round(c.train_loss, 6),
                           "valid_loss": None if c.valid_loss is None else round(c.valid_loss, 6),
                           "valid_mean_token_accuracy": None if c.valid_accuracy is None
                           else round(c.valid_accuracy, 6)}})

    model, evaluation = train(examples, targets, hyper, validation=validation,
                              example_weights=weights, on_checkpoint=on_checkpoint,
                              checkpoints=int(spec.get("checkpoints", 10)), kind=kind)
    output = Path(spec["output_dir"])
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save(partial)
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    steps = int(model.info["steps"])
    tokens_per_example = sum(len(e.text.split()) for e in examples) / len(examples)
    _emit({
        "type": "result",
        "trained_tokens": int(steps * int(model.info["batch_size"]) * tokens_per_example),
        "examples": len(examples), "steps": steps,
        "train_seconds": model.info["train_seconds"],
        "evaluation": None if evaluation is None else {
            "valid_loss": round(evaluation.loss, 6),
            "valid_accuracy": round(evaluation.accuracy, 6),
            "targets": evaluation.targets,
        },
    })


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
    if len(argv) != 1:
        print("usage: python -m service.factory.trainer <spec.json>", file=sys.stderr)
        return 2
    try:
        run(orjson.loads(Path(argv[0]).read_bytes()))
    except Exception as exc:
        print(f"training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
