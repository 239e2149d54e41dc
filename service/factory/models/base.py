"""What a base model is to the factory: the one protocol every base model implements.

The jobs, the trainer process, the catalog and `GET /v1/models` only ever talk to a `BaseModel`
(found in `service.factory.models.registry` by name or alias) and to the `Predictor` it loads:
none of them names a concrete model. Adding a base model means adding a module that implements
`BaseModel` and one line in the registry.

The contract, in the order a job meets it:
- `availability()`: `None` when the model can train and serve here, else a sentence saying what is
  missing and the command that installs it (a job for it is then a 4xx, never a crash).
- `steps_for(examples, hyper)` / `estimate_seconds(...)`: what a dry run and the job's
  `metadata` report before training.
- `train(data, spec, control)`: runs in the trainer child process. It reports checkpoints with
  real losses through `control.checkpoint`, free-form facts (the device it trained on) through
  `control.event`, what it is doing through `control.progress` (each phase as it starts, and
  every training step with the steps it will make in all), polls `control.cancelled()` between
  steps, and returns a `TrainedModel` (whose `info["stopped"]` says why it made fewer steps than
  it planned, if it did).
- `TrainedModel.save(directory)`: writes every file the model needs, with a `model.json` whose
  `base_model` and `format` keys let `registry.load` find the loader again.
- `load(directory)`: a `Predictor` (serving only; it may need fewer packages than training).
- `exporter`: optional. An `Exporter` writes a fine-tuned model in the forms inference servers
  load (`GET /v1/models/{id}/export`); `None` for a model no inference server reads, which stays
  served by the factory. The export writer (`service.export.writer`) keeps the formats,
  `export.json` and the archive, and names no concrete model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from service.factory.data import Example, Kind, TargetSpec

#: Per text: target name -> label -> score (Mistral's `results[i][target]["scores"]`).
Scores = dict[str, dict[str, float]]

#: `seq_len` bounds: below 16 tokens nothing is left of a sentence; Mistral accepts up to 32k, our
#: encoders' position tables end at 512.
SEQ_LEN_MIN = 16
SEQ_LEN_MAX = 32_768


class ModelFormatError(ValueError):
    """A model directory that cannot be loaded: corrupt, half-written, or of an unknown format.
    The message says what to do (usually: train the model again)."""


@dataclass(frozen=True)
class Hyperparameters:
    """A job's hyperparameters, Mistral's names, one set of defaults for every base model.

    Each base model documents what each field does to it (a convex linear model and a pretrained
    transformer cannot read a learning rate the same way). `None` means "the model's default".
    """

    training_steps: int | None = None
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    epochs: float | None = None
    seq_len: int | None = None
    seed: int = 0
    #: A factory extension (not Mistral's): `False` trains `local-minilm` without the n-gram
    #: model's evidence in its scores, so that the model exports to an inference server with the
    #: factory's own scores (`service.export`). `None`: the model's default (blend on).
    ngram_blend: bool | None = None

    @classmethod
    def from_job(cls, values: Mapping[str, Any], seed: int = 0) -> Hyperparameters:
        """From a job's stored `hyperparameters` (Mistral's fields; `None` means the default)."""
        defaults = cls()

        def pick(name: str) -> Any:
            value = values.get(name)
            return getattr(defaults, name) if value is None else value

        return cls(
            training_steps=None if values.get("training_steps") is None
            else int(values["training_steps"]),
            learning_rate=float(pick("learning_rate")),
            weight_decay=float(pick("weight_decay")),
            warmup_fraction=float(pick("warmup_fraction")),
            epochs=None if values.get("epochs") is None else float(values["epochs"]),
            seq_len=None if values.get("seq_len") is None else int(values["seq_len"]),
            seed=seed,
            ngram_blend=None if values.get("ngram_blend") is None
            else bool(values["ngram_blend"]),
        )

    def steps(self, examples: int, batch_size: int, *, default_epochs: float,
              min_steps: int = 1) -> int:
        """Optimiser steps: `training_steps` when given, else `epochs` (or `default_epochs`)
        over `examples` in batches of `batch_size`, at least `min_steps`."""
        if self.training_steps is not None:
            return max(1, self.training_steps)
        per_epoch = max(examples, 1) / max(1, min(batch_size, max(examples, 1)))
        epochs = self.epochs if self.epochs is not None else default_epochs
        return max(min_steps, math.ceil(epochs * per_epoch))


@dataclass(frozen=True)
class TrainingFile:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class TrainingSpec:
    """Everything the trainer process needs, written by the job as JSON (`to_json`/`from_json`)
    so that the two processes agree on one typed shape instead of an untyped dict."""

    base_model: str
    kind: Kind
    targets: tuple[TargetSpec, ...]
    training_files: tuple[TrainingFile, ...]
    validation_files: tuple[str, ...]
    hyperparameters: Hyperparameters
    output_dir: str
    checkpoints: int = 10
    #: Where a model that can use an accelerator trains ("cpu", "cuda", "cuda:1"); None: the
    #: model decides (CUDA when there is one). The job's `device`, else `FACTORY_DEVICE`; None
    #: for a model that uses no accelerator.
    device: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = [asdict(t) for t in self.targets]
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TrainingSpec:
        return cls(
            base_model=str(doc["base_model"]),
            kind=doc["kind"],
            targets=tuple(TargetSpec(t["name"], tuple(t["labels"]), t["loss_function"],
                                     float(t["weight"])) for t in doc["targets"]),
            training_files=tuple(TrainingFile(str(f["path"]), float(f["weight"]))
                                 for f in doc["training_files"]),
            validation_files=tuple(str(p) for p in doc["validation_files"]),
            hyperparameters=Hyperparameters(**doc["hyperparameters"]),
            output_dir=str(doc["output_dir"]),
            checkpoints=int(doc.get("checkpoints", 10)),
            device=None if doc.get("device") is None else str(doc["device"]),
        )


@dataclass(frozen=True)
class TrainingData:
    """Validated examples. `weights` is one weight per training example (its file's weight)."""

    examples: Sequence[Example]
    weights: Sequence[float]
    validation: Sequence[Example] = ()


@dataclass(frozen=True)
class Checkpoint:
    step_number: int
    train_loss: float
    valid_loss: float | None = None
    valid_accuracy: float | None = None


@dataclass
class Evaluation:
    loss: float
    accuracy: float  # mean over targets
    targets: dict[str, dict[str, float]]  # name -> {accuracy, macro_f1, examples}


#: What a model is doing, as `TrainingControl.progress` reports it (a model may name others).
PHASES = ("reading", "loading", "tokenising", "probing", "featurising", "training", "exporting",
          "calibrating", "evaluating")


class TrainingControl(Protocol):
    """How a training run talks back to whoever runs it (the trainer process, a bench, a test)."""

    def checkpoint(self, checkpoint: Checkpoint) -> None: ...

    def event(self, name: str, data: Mapping[str, Any]) -> None: ...

    def progress(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        """The phase the run is in, with how far it is (`done` of `total` items; in the
        `training` phase, optimiser steps). Cheap and frequent: checkpoints come a tenth of the
        way apart, and minutes can pass before the first one (loading, tokenising, probing)."""
        ...

    def cancelled(self) -> bool: ...


@dataclass
class SilentControl:
    """A `TrainingControl` for in-process callers: keeps checkpoints and events, never cancels
    unless `cancel` is set."""

    checkpoints: list[Checkpoint] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    cancel: bool = False
    progressed: list[tuple[str, int | None, int | None]] = field(default_factory=list)

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        self.checkpoints.append(checkpoint)

    def event(self, name: str, data: Mapping[str, Any]) -> None:
        self.events.append((name, dict(data)))

    def progress(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        self.progressed.append((phase, done, total))

    def cancelled(self) -> bool:
        return self.cancel


class Muted:
    """A `TrainingControl` for a model's side fits (a held-out copy, a side model): forwards
    cancellation to `outer`, keeps its checkpoints, events and progress to itself (the job's
    progress is the main fit's)."""

    def __init__(self, outer: TrainingControl) -> None:
        self.outer = outer

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    def event(self, name: str, data: Mapping[str, Any]) -> None:
        pass

    def progress(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        pass

    def cancelled(self) -> bool:
        return self.outer.cancelled()


class TrainingCancelled(Exception):
    """Raised by `train` when `control.cancelled()` turned true."""


@dataclass(frozen=True)
class Head:
    """One target of a trained model: its labels in score order and how they are scored
    (softmax over labels for `single_class`, one sigmoid per label for `multi_class`)."""

    name: str
    labels: tuple[str, ...]
    loss_function: Literal["single_class", "multi_class"]
    weight: float = 1.0

    @classmethod
    def from_target(cls, target: TargetSpec) -> Head:
        return cls(target.name, tuple(target.labels), target.loss_function or "single_class",
                   target.weight)


@runtime_checkable
class Predictor(Protocol):
    """A loaded model, ready to score. `kind` is "text" or "chat" (what it was trained on).
    `inline` says whether a small batch may be scored on the event loop (a linear model answers
    in tens of microseconds; a neural encoder takes milliseconds and goes to a worker thread)."""

    @property
    def kind(self) -> str: ...

    @property
    def heads(self) -> Sequence[Head]: ...

    @property
    def inline(self) -> bool: ...

    def classify(self, texts: Sequence[str]) -> list[Scores]:
        """Per text, per target, every label's score (rounded to 6 decimals)."""
        ...


class TrainedModel(Predictor, Protocol):
    """What `train` returns: a predictor that can also write itself to disk. `info` may carry
    `train_seconds`, `steps` and `trained_examples` (examples seen, for `trained_tokens`)."""

    @property
    def info(self) -> dict[str, Any]: ...

    def save(self, directory: Path) -> None: ...


class NotExportable(Exception):
    """The model cannot be written in the asked format; the message says why and what to do."""


@dataclass
class ExportedTarget:
    """One target of an export: the directory written for it and how its scores relate to the
    factory's (`notes` say what differs; none: it answers as the factory does)."""

    name: str
    directory: str
    labels: list[str]
    loss_function: str
    #: The blend the factory scores this target with: parts (share, encoder weight, n-gram
    #: weight), `minilm_onnx.Blend`.
    blend: tuple[tuple[float, float, float], ...]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "directory": self.directory, "labels": self.labels,
                "loss_function": self.loss_function, "blend": [list(part) for part in self.blend],
                "matches_factory": not self.notes, "notes": self.notes}


@dataclass(frozen=True)
class Exported:
    """What an exporter wrote: a directory per target, and the facts about the model that
    `export.json` carries beside them (the writer adds the model, format and base model)."""

    targets: list[ExportedTarget]
    details: dict[str, Any]


class Exporter(Protocol):
    """Writes fine-tuned models of one base model in the forms inference servers load."""

    #: How to train a model of this base that exports with the factory's own scores: the remedy
    #: named when a model of another base model is refused.
    advice: str

    def export(self, model_dir: Path, model_id: str, meta: Mapping[str, Any], fmt: str,
               out: Path) -> Exported:
        """Write `model_dir` (its `model.json` is `meta`) under `out` in format `fmt`, one of the
        writer's formats, one directory per target (`target_directories`). Raises
        `NotExportable` with the reason and the remedy."""
        ...


def target_directories(names: Sequence[str]) -> list[str]:
    """A directory name per target: the target's name made safe for a path, unique."""
    used: set[str] = set()
    out: list[str] = []
    for name in names:
        directory = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "target"
        while directory in used:
            directory += "_"
        used.add(directory)
        out.append(directory)
    return out


@dataclass(frozen=True)
class Capabilities:
    """What `GET /v1/models` tells about a base model beyond Mistral's fields."""

    multi_class: bool = True
    chat: bool = True
    gpu: bool = False
    pretrained: bool = False


class BaseModel(Protocol):
    """A base model a job can fine-tune. See the module docstring for the contract."""

    name: str
    description: str
    capabilities: Capabilities

    def availability(self) -> str | None: ...

    def steps_for(self, examples: int, hyper: Hyperparameters) -> int: ...

    def batch_size(self, hyper: Hyperparameters) -> int: ...

    def estimate_seconds(self, examples: int, total_chars: int, hyper: Hyperparameters) -> float: ...

    def check(self, hyper: Hyperparameters) -> tuple[str, str] | None:
        """`(field, message)` when a hyperparameter is out of this model's range, else `None`."""
        ...

    def train(self, data: TrainingData, spec: TrainingSpec,
              control: TrainingControl) -> tuple[TrainedModel, Evaluation | None]: ...

    def load(self, directory: Path) -> Predictor: ...

    @property
    def exporter(self) -> Exporter | None:
        """What writes this model's fine-tunes for inference servers; None: nothing can."""
        ...
