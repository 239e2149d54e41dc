"""`local-ngram`: TF-IDF word and character n-grams, and a logistic regression head per target,
fitted to convergence. The default base model: no downloaded weights, seconds to train, sub-ms to
answer, and as good as the strong linear baseline of text classification.

Why this design. The model's features are those of the usual scikit-learn baseline (word 1-2 and
`char_wb` 2-5 TF-IDF, see `ngram_features`) and its objective is that baseline's: L2-regularised
logistic regression with `C = 1 / weight_decay` (10 at Mistral's default 0.1, the baseline's C),
fitted by scikit-learn's `LogisticRegression` (Newton-CG) to convergence. The objective is convex,
so the solver reaches the baseline's own optimum, and the model is within noise of (usually above)
the baseline fitted on the same split (tests/integration/test_factory_accuracy.py). The previous
model of this factory ran minibatch AdamW for Mistral's step count and rate and lost to the
baseline by 0.01 to 0.12 macro-F1 with Mistral's example job: those numbers were made for a 3B
model, not for a convex problem.

Solver choice, measured on 8,230 BBC paragraphs (5 topics, 411k columns, 8.4M nonzeros, 2 busy
cores): scikit-learn's lbfgs 55 s, saga 93 s (not converged), scipy's L-BFGS-B on our own
objective 83 s (70% of it L-BFGS-B's own bookkeeping over 2M variables), Newton-CG 15 s in 5
iterations, all within 0.003 macro-F1 of each other. Newton-CG it is.

Heads. A softmax over a `single_class` target's labels (one multinomial regression), one sigmoid
per label of a `multi_class` target (one binary regression per label). A target's `weight` and
each example's file `weight` multiply its loss (that is, its C); an example counts only for the
targets it labels. The heads' weights are then gathered into one matrix, so serving is one sparse
product per batch.

What each hyperparameter does to this model:
- `training_steps`: the most Newton-CG iterations, at least `MIN_ITERATIONS` (20). The solver
  stops at convergence, in 5-15 iterations, so Mistral's example (100) and the default (100) both
  mean "to convergence".
- `epochs`: the same budget (one Newton iteration reads the whole data set about 2x per inner
  conjugate-gradient step), at least 20.
- `weight_decay`: the L2 penalty, `C = 1 / weight_decay` (0 means C = 10,000: barely regularised).
- `learning_rate`, `warmup_fraction`: recorded, no effect: Newton's method needs no step size,
  and a convex problem has one optimum whatever the path.
- `seq_len`: no effect (every n-gram of the text counts).
- `seed`: no effect (the solver is deterministic).

Calibration: after the fit, a temperature per target (`calibrate`, `models.calibration`), on the
validation files, else on a held-out slice with a copy of the model fitted on the rest. An L2
penalty fitted to convergence is under-confident on long documents and many labels (T 0.3-0.6
on BBC articles and 42 intents) and over-confident on short noisy texts (T ~1.3-1.8 on tweets):
bench/calibration.py has the ECE before and after.

Figures (bench/factory_bench.py, 2 cores): see docs/factory.md "Base models".
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from service.factory.data import Example
from service.factory.models import calibration
from service.factory.models.base import (
    Capabilities,
    Checkpoint,
    Evaluation,
    Exporter,
    Head,
    Hyperparameters,
    ModelFormatError,
    Muted,
    Predictor,
    Scores,
    TrainingCancelled,
    TrainingControl,
    TrainingData,
    TrainingSpec,
)
from service.factory.models.calibration import Calibration
from service.factory.models.evaluation import evaluate_probabilities, label_matrix
from service.factory.models.ngram_features import Block, Featurizer
from service.factory.models.scoring import labelled, probabilities, slices

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

NAME = "local-ngram"
FORMAT = 2
#: Newton-CG iterations: it converges in 5-15 on every corpus we measured (each iteration solves
#: the Newton system with conjugate gradients, tens of Hessian-vector products), so a budget of
#: 20 or more means "to convergence"; scikit-learn's default budget is 100.
MIN_ITERATIONS = 20
DEFAULT_ITERATIONS = 100
TYPICAL_ITERATIONS = 10
MAX_C = 1e4
#: scikit-learn's default: stop when the largest gradient component is below it.
SOLVER_TOLERANCE = 1e-4


#: Batches at least this large are scored by `_workers()` threads (smaller ones are not worth a
#: thread hop: one 480-character text takes ~0.3 ms).
PARALLEL_MIN_ITEMS = 32


@functools.cache
def _workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(_workers(), thread_name_prefix="ngram")


@dataclass
class NGramModel:
    """A fitted model: the featurizer's vocabulary and idf, and one weight matrix (a column per
    label of every head) over its columns."""

    featurizer: Featurizer
    heads: list[Head]
    weights: F32  # (featurizer.columns, total labels)
    bias: F32  # (total labels,)
    kind: str = "text"
    info: dict[str, Any] = field(default_factory=dict)
    inline: bool = True
    #: Per head, the temperature its logits are divided by (`models.calibration`); a model saved
    #: without one (before calibration) has 1.0: its scores are those it was trained with.
    temperatures: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.temperatures:
            self.temperatures = [1.0] * len(self.heads)

    def logits(self, texts: Sequence[str]) -> F32:
        """Scores before softmax/sigmoid. A batch of `PARALLEL_MIN_ITEMS` or more is split across
        the cores: the work is numpy over arrays (vocabulary lookups, sorts) that releases the
        GIL, and it is memory-bound, so two cores score a batch of 128 paragraphs ~1.6x faster
        than one (measured on 2 cores: 3,364 -> 5,195-5,305 paragraphs/s at batch 128; short texts
        lose a little to the thread hop, 14,132 -> 11,717 at 100 characters)."""
        workers = _workers()
        if len(texts) < PARALLEL_MIN_ITEMS or workers < 2:
            return self._logits(texts)
        step = -(-len(texts) // workers)
        parts = list(_pool().map(self._logits, [texts[i:i + step]
                                                for i in range(0, len(texts), step)]))
        out: F32 = np.concatenate(parts)
        return out

    def _logits(self, texts: Sequence[str]) -> F32:
        x = self.featurizer.transform(texts)
        out: F32 = np.asarray(x @ self.weights, dtype=np.float32) + self.bias
        return out

    def predict_proba(self, texts: Sequence[str]) -> list[F32]:
        """One (n, labels) matrix per head, in head order."""
        z = self.logits(texts)
        return probabilities(self.heads, z, self.temperatures)

    def classify(self, texts: Sequence[str]) -> list[Scores]:
        return labelled(self.heads, self.predict_proba(texts), len(texts))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        f = self.featurizer
        np.savez(directory / "ngram.npz", word_vocabulary=f.words.vocabulary,
                 word_columns=f.words.columns, word_idf=f.words.idf,
                 char_vocabulary=f.chars.vocabulary, char_columns=f.chars.columns,
                 char_idf=f.chars.idf, weights=self.weights, bias=self.bias)
        meta = {"format": FORMAT, "base_model": NAME, "kind": self.kind, "info": self.info,
                "temperatures": list(self.temperatures),
                "heads": [{"name": h.name, "labels": list(h.labels),
                           "loss_function": h.loss_function, "weight": h.weight}
                          for h in self.heads]}
        (directory / "model.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, directory: Path) -> NGramModel:
        try:
            meta = orjson.loads((directory / "model.json").read_bytes())
            if meta.get("format") != FORMAT:
                raise ModelFormatError(f"{directory}: local-ngram model format "
                                       f"{meta.get('format')!r}, this factory reads {FORMAT}; "
                                       "train the model again")
            with np.load(directory / "ngram.npz") as z:
                featurizer = Featurizer(*(
                    Block(z[f"{name}_vocabulary"].astype(np.uint64),
                          z[f"{name}_columns"].astype(np.int64),
                          z[f"{name}_idf"].astype(np.float32)) for name in ("word", "char")))
                weights = z["weights"].astype(np.float32)
                bias = z["bias"].astype(np.float32)
            heads = [Head(h["name"], tuple(h["labels"]), h["loss_function"], float(h["weight"]))
                     for h in meta["heads"]]
            # No key: saved before calibration, served with the scores it was trained with.
            temperatures = [float(t) for t in meta.get("temperatures") or [1.0] * len(heads)]
            if len(temperatures) != len(heads) or min(temperatures) <= 0:
                raise ValueError(f"temperatures {temperatures} for {len(heads)} heads")
        except ModelFormatError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError,
                zipfile.BadZipFile) as exc:
            raise ModelFormatError(f"{directory}: the local-ngram model cannot be read "
                                   f"({type(exc).__name__}: {exc}); train it again") from None
        labels = sum(len(h.labels) for h in heads)
        if weights.shape != (featurizer.columns, labels) or bias.shape != (labels,):
            raise ModelFormatError(f"{directory}: weights of shape {weights.shape} do not match "
                                   f"{featurizer.columns} columns and {labels} labels; train the "
                                   "model again")
        return cls(featurizer, heads, weights, bias, str(meta.get("kind", "text")),
                   dict(meta.get("info", {})), temperatures=temperatures)


class _Head:
    """One target's logistic regression(s): multinomial for `single_class`, one binary model per
    label for `multi_class`. Each is scikit-learn's `LogisticRegression` with the Newton-CG
    solver, stepped one iteration at a time (`warm_start`) so that training can report real
    losses and stop when asked."""

    def __init__(self, head: Head, x: sp.csr_matrix, examples: Sequence[Example],
                 sample_weights: F32, c: float) -> None:
        self.head = head
        y, has = label_matrix(head, examples)
        rows = np.flatnonzero(has)
        self.fits: list[tuple[int | None, LogisticRegression | None, float]] = []
        self.parts: list[tuple[sp.csr_matrix, npt.NDArray[np.int64], F32]] = []
        weights = sample_weights * head.weight
        if head.loss_function == "single_class":
            # A list of labels for a single_class target shares the example between them.
            r, j = np.nonzero(y[rows] > 0)
            self.parts.append((x[rows[r]], j.astype(np.int64), (weights[rows[r]] * y[rows[r], j])
                               .astype(np.float32)))
            self.fits.append((None, _regression(c), 0.0))
        else:
            xs = x[rows]
            for label in range(len(head.labels)):
                target = (y[rows, label] > 0).astype(np.int64)
                self.parts.append((xs, target, weights[rows].astype(np.float32)))
                prior = float(np.clip(target.mean() if len(target) else 0.0, 1e-3, 1 - 1e-3))
                constant = target.min(initial=0) == target.max(initial=0)
                # A label that is always (or never) there: its prior, no regression to fit.
                self.fits.append((label, None if constant else _regression(c),
                                  math.log(prior / (1 - prior))))

    def step(self) -> bool:
        """One more solver iteration for every regression; False once all have converged."""
        moved = False
        for (_, model, _), (x, y, w) in zip(self.fits, self.parts, strict=True):
            if model is None:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x, y, sample_weight=w)
            moved |= int(np.max(model.n_iter_)) > 0
        return moved

    def coefficients(self, columns: int) -> tuple[F32, F32]:
        """(columns, labels) weights and (labels,) biases in the head's label order."""
        k = len(self.head.labels)
        w = np.zeros((columns, k), dtype=np.float32)
        b = np.zeros(k, dtype=np.float32)
        for label, model, constant in self.fits:
            if label is None:
                assert model is not None
                classes = [int(c) for c in model.classes_]
                coef = model.coef_.astype(np.float32)
                if len(classes) == 2 and coef.shape[0] == 1:  # binary: softmax([0, z]) == sigmoid(z)
                    w[:, classes[1]] = coef[0]
                    b[classes[1]] = float(model.intercept_[0])
                else:
                    w[:, classes] = coef.T
                    b[classes] = model.intercept_.astype(np.float32)
                missing = [j for j in range(k) if j not in classes]
                b[missing] = -30.0  # a declared label with no example: never predicted
            elif model is None:
                b[label] = constant
            else:
                w[:, label] = model.coef_[0]
                b[label] = float(model.intercept_[0])
        return w, b


def _regression(c: float) -> LogisticRegression:
    return LogisticRegression(C=c, solver="newton-cg", max_iter=1, warm_start=True,
                              tol=SOLVER_TOLERANCE)


def iterations(hyper: Hyperparameters) -> int:
    if hyper.training_steps is not None:
        return max(MIN_ITERATIONS, hyper.training_steps)
    if hyper.epochs is not None:
        return max(MIN_ITERATIONS, math.ceil(hyper.epochs))
    return DEFAULT_ITERATIONS


def fit(examples: Sequence[Example], heads: Sequence[Head], hyper: Hyperparameters, *,
        kind: str = "text", sample_weights: Sequence[float] | None = None,
        validation: Sequence[Example] = (), control: TrainingControl | None = None,
        checkpoints: int = 10) -> tuple[NGramModel, Evaluation | None]:
    """Fit the model; `control` gets a checkpoint with real losses per solver iteration (the
    solver converges in 5-15 iterations), thinned to about `checkpoints`."""
    started = time.monotonic()
    texts = [e.text for e in examples]
    if control is not None:
        control.progress("featurising", 0, len(texts))
    featurizer, x = Featurizer.fit(texts, _pool() if _workers() > 1 else None)
    columns = featurizer.columns
    weights = (np.ones(len(examples), dtype=np.float32) if sample_weights is None
               else np.asarray(sample_weights, dtype=np.float32))
    c = MAX_C if hyper.weight_decay <= 0 else min(MAX_C, 1.0 / hyper.weight_decay)
    fitted = [_Head(head, x, examples, weights, c) for head in heads]
    # The training loss at each checkpoint: X @ W reads W sequentially from a CSC copy, 6x faster
    # than from CSR (0.045 s against 0.28 s for 10k paragraphs).
    x_csc = x.tocsc()
    budget = iterations(hyper)
    every = max(1, math.ceil(min(budget, TYPICAL_ITERATIONS) / max(1, checkpoints)))
    valid_texts = [e.text for e in validation]
    evaluation: Evaluation | None = None
    done = 0
    stopped: str | None = None

    def model_of() -> NGramModel:
        parts = [f.coefficients(columns) for f in fitted]
        w = np.concatenate([p[0] for p in parts], axis=1) if parts else \
            np.zeros((columns, 0), np.float32)
        b = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
        info = {"examples": len(examples), "iterations": done, "C": c,
                "train_seconds": round(time.monotonic() - started, 3), "stopped": stopped}
        return NGramModel(featurizer, list(heads), w, b, kind, info)

    def report() -> None:
        nonlocal evaluation
        model = model_of()
        z = np.asarray(x_csc @ model.weights, dtype=np.float32) + model.bias
        probs = probabilities(model.heads, z)
        train_loss = evaluate_probabilities(model.heads, probs, examples).loss
        valid_loss = valid_acc = None
        if validation:
            evaluation = evaluate_probabilities(model.heads, model.predict_proba(valid_texts),
                                                validation)
            valid_loss, valid_acc = evaluation.loss, evaluation.accuracy
        if control is not None:
            control.checkpoint(Checkpoint(done, train_loss, valid_loss, valid_acc))

    reported = -1
    if control is not None:
        control.progress("training", 0, budget)
    while done < budget:
        if control is not None and control.cancelled():
            raise TrainingCancelled
        moved = [f.step() for f in fitted]
        if not any(moved):
            # Why the job ends before its `step N/budget`: the budget is an upper bound.
            stopped = "the solver converged"
            break
        done += 1
        if control is not None:
            control.progress("training", done, budget)
        if done % every == 0:
            report()
            reported = done
    if reported != done:
        report()
    return model_of(), evaluation


def head_logits(model: NGramModel, texts: Sequence[str]) -> list[F32]:
    """Each head's (n, labels) logits, before any temperature."""
    z = model.logits(texts)
    return [z[:, s] for s in slices(model.heads)]


def calibrate(model: NGramModel, data: TrainingData, spec: TrainingSpec,
              control: TrainingControl) -> Calibration:
    """A temperature per target for `model` (fitted on all of `data.examples`): on the
    validation files when the job has them; else on a held-out slice (`calibration.holdout_size`:
    10%, at most 600) of the training data, with a copy of the model fitted on the rest. The
    served model is the one fitted on everything: a temperature has to be fitted on examples the
    model did not train on (the model fitted to convergence is far surer on its own training
    data), and the n-gram model refits in seconds, so the slice costs no training data. The
    copy's T stands for the full model's (10% more data moves a regularised fit little; the
    bench measures the result on a test split). Below `HOLDOUT_MIN_EXAMPLES` (200) examples
    without a validation file: T = 1."""
    heads = model.heads
    if data.validation:
        control.progress("calibrating", 0, len(data.validation))
        return calibration.calibrate(heads, head_logits(model, [e.text for e in data.validation]),
                                     data.validation, "validation")
    examples = list(data.examples)
    size = calibration.holdout_size(len(examples))
    if not size:
        return calibration.uncalibrated(
            heads, f"no validation file, and {len(examples)} training examples are too few to "
                   f"hold out a slice (at least {calibration.HOLDOUT_MIN_EXAMPLES}): scores as "
                   "trained; add a validation file to calibrate")
    control.progress("calibrating", 0, size)
    held = set(np.random.default_rng(spec.hyperparameters.seed)
               .permutation(len(examples))[:size].tolist())
    rest = [i for i in range(len(examples)) if i not in held]
    weights = list(data.weights)
    copy, _ = fit([examples[i] for i in rest], list(heads), spec.hyperparameters,
                  kind=spec.kind, sample_weights=[weights[i] for i in rest],
                  control=Muted(control))
    held_out = [examples[i] for i in sorted(held)]
    return calibration.calibrate(heads, head_logits(copy, [e.text for e in held_out]),
                                 held_out, "held-out", [weights[i] for i in sorted(held)])


class NGram:
    """The `local-ngram` base model (see the module docstring)."""

    name = NAME
    description = ("TF-IDF word and character n-grams with a logistic regression head per "
                   "target, fitted to convergence; needs no downloaded weights")
    capabilities = Capabilities(multi_class=True, chat=True, gpu=False, pretrained=False)
    #: No inference server reads TF-IDF features + logistic regression: served by the factory only.
    exporter: Exporter | None = None

    def availability(self) -> str | None:
        return None

    def batch_size(self, hyper: Hyperparameters) -> int:
        return 0  # full batch

    def steps_for(self, examples: int, hyper: Hyperparameters) -> int:
        return iterations(hyper)

    def estimate_seconds(self, examples: int, total_chars: int, hyper: Hyperparameters) -> float:
        # Measured on 2 cores: about 2 s per MB of text for the features and 10-15 s per 4 MB of
        # text for the solver (10k paragraphs of 480 characters: ~20 s in all).
        return 1.0 + total_chars / 2e5 * 1.0e-1 + total_chars * 4e-6

    def check(self, hyper: Hyperparameters) -> tuple[str, str] | None:
        if hyper.ngram_blend is not None:
            return ("ngram_blend", "ngram_blend turns the n-gram evidence in local-minilm's "
                                   "scores on or off; local-ngram is the n-gram model itself: "
                                   "leave ngram_blend out, or train local-minilm")
        return None

    def train(self, data: TrainingData, spec: TrainingSpec,
              control: TrainingControl) -> tuple[NGramModel, Evaluation | None]:
        """Fit on every training example, then a temperature per target (`calibrate`); the
        job's evaluation is of the calibrated model (same argmax, so the same accuracy and
        macro-F1; its loss is the calibrated one)."""
        heads = [Head.from_target(t) for t in spec.targets]
        model, evaluation = fit(data.examples, heads, spec.hyperparameters, kind=spec.kind,
                                sample_weights=data.weights, validation=data.validation,
                                control=control, checkpoints=spec.checkpoints)
        found = calibrate(model, data, spec, control)
        model.temperatures = found.temperatures
        model.info["calibration"] = found.to_json()
        control.event("calibration", found.to_json())
        if data.validation:
            evaluation = evaluate_probabilities(
                model.heads, model.predict_proba([e.text for e in data.validation]),
                data.validation)
        return model, evaluation

    def load(self, directory: Path) -> Predictor:
        # A model of the first format keeps its weights in weights.npz (this one: ngram.npz);
        # each loader reads model.json itself and says what is wrong with a damaged directory.
        if (directory / "weights.npz").exists() and not (directory / "ngram.npz").exists():
            from service.factory.models.ngram_v1 import LegacyNGramModel

            return LegacyNGramModel.load(directory)
        return NGramModel.load(directory)


__all__ = ["NGram", "NGramModel", "calibrate", "fit", "head_logits"]
