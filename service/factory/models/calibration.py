"""Temperature scaling: one scalar per target, fitted after training so that a score of 0.9 is
right about 90% of the time on data like the training data. Shared by every base model.

Why temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): one
parameter per target cannot overfit a few hundred held-out examples, it divides the logits, so
the argmax (and therefore accuracy and macro-F1) is unchanged, and an export carries it as one
factor on the logits. A `single_class` target is `softmax(z / T)`; a `multi_class` target is one
sigmoid per label, `sigmoid(z / T)`, all labels of the target sharing the target's own `T`.

`T` minimises the held-out negative log-likelihood (the loss the job reports: cross-entropy, or
mean binary cross-entropy over labels), found by scipy's bounded Brent search on `log T` in
`[log 1/20, log 20]`: the objective is smooth and one-dimensional, and the log makes `T = 2` and
`T = 1/2` equally far from 1. A model without a temperature (trained before this module, or with
no data to fit on) has `T = 1`: its scores are what they always were.

ECE (expected calibration error, 15 equal-width bins, Naeini et al. 2015 / Guo et al. 2017) of
the top label: for `single_class` the confidence is the top score and it is right when the top
label is the gold one; for `multi_class` each label's yes/no decision counts, with confidence
`max(p, 1 - p)`. ECE is the bins' mean |accuracy - confidence|, weighted by their sizes.

What calibration cannot do: it makes the scores honest on inputs *like the held-out data*. An
input unlike anything the model was trained on still gets a confident answer (docs/factory.md,
"Calibrated scores").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar

from service.factory.data import Example
from service.factory.models.base import Head
from service.factory.models.evaluation import head_loss, label_matrix
from service.factory.models.scoring import sigmoid, softmax

F32 = npt.NDArray[np.float32]

ECE_BINS = 15
#: `T` is searched in [1/20, 20]: a model 20x too sure or too unsure is further off than
#: anything measured (the n-gram model's fitted T was 0.5-2 on our corpora).
LOG_T_BOUND = math.log(20.0)
#: Fewer labelled examples than this for a target: its T stays 1 (a scalar fitted on a handful
#: of examples moves with each of them).
MIN_EXAMPLES = 20
#: Without a validation file, the share of the training data held out to fit T on (by models
#: that hold out a slice of their own), its floor and its cap: below `HOLDOUT_MIN_EXAMPLES`
#: training examples the slice (20) is too small to fit on and the model keeps T = 1.
HOLDOUT_FRACTION = 0.1
HOLDOUT_MIN_EXAMPLES = 200
HOLDOUT_MAX = 600


def holdout_size(examples: int) -> int:
    """How many of `examples` training examples are held out to fit on (0: none)."""
    if examples < HOLDOUT_MIN_EXAMPLES:
        return 0
    return min(HOLDOUT_MAX, max(1, round(HOLDOUT_FRACTION * examples)))


def scaled(head: Head, z: F32, temperature: float = 1.0) -> F32:
    """A head's scores from its logits `z` at `temperature`."""
    zt = z if temperature == 1.0 else (z / np.float32(temperature)).astype(np.float32)
    return softmax(zt) if head.loss_function == "single_class" else sigmoid(zt)


def ece(head: Head, p: F32, y: F32, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error of scores `p` against targets `y` (rows that label
    this head only; see the module docstring for `multi_class`)."""
    if not len(p):
        return 0.0
    if head.loss_function == "single_class":
        confidence = p.max(axis=1).astype(np.float64)
        correct = (y[np.arange(len(y)), p.argmax(axis=1)] > 0).astype(np.float64)
    else:
        q = p.astype(np.float64).ravel()
        confidence = np.maximum(q, 1.0 - q)
        correct = ((q >= 0.5) == (y.ravel() > 0)).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a single_class confidence is >= 1/labels.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += float(inside.sum()) * abs(float(correct[inside].mean())
                                               - float(confidence[inside].mean()))
    return total / len(confidence)


def weighted_loss(head: Head, p: F32, y: F32, weights: F32 | None = None) -> float:
    """`evaluation.head_loss` with a weight per row (an example's file weight: training counted
    it that many times, so the temperature does too)."""
    if weights is None:
        return head_loss(head, p, y)
    q = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    if head.loss_function == "single_class":
        rows = -(y * np.log(q)).sum(axis=1)
    else:
        rows = -(y * np.log(q) + (1 - y) * np.log(1 - q)).mean(axis=1)
    w = weights.astype(np.float64)
    return float((rows * w).sum() / max(float(w.sum()), 1e-12))


def wrong_decisions(head: Head, z: F32, y: F32) -> int:
    """How many rows the logits `z` get wrong: the top label is not a gold one
    (`single_class`), or a label's yes/no decision at 0.5 disagrees with `y` (`multi_class`).
    Temperature leaves these decisions as they are."""
    if head.loss_function == "single_class":
        return int((y[np.arange(len(y)), z.argmax(axis=1)] <= 0).sum())
    return int(((z >= 0) != (y > 0)).any(axis=1).sum())


def fit_temperature(head: Head, z: F32, y: F32, weights: F32 | None = None) -> float:
    """The `T` minimising the mean NLL of `scaled(head, z, T)` against `y`, each row counted
    `weights` times (module docstring). `T` is never below 1 when no row is wrong: sharpening
    then only meets the search's bound."""
    def nll(log_t: float) -> float:
        return weighted_loss(head, scaled(head, z, math.exp(log_t)), y, weights)

    result = minimize_scalar(nll, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded",
                             options={"xatol": 1e-4})
    best = float(result.x)
    if best < 0.0 and not wrong_decisions(head, z, y):
        # Every held-out answer right: the NLL falls all the way to the search's bound (1/20),
        # and the demo's 36 templated examples then served exactly 1.0 and 0.0. Nothing in the
        # data says how far to sharpen, so the scores stay as trained.
        return 1.0
    # Never worse than leaving the scores alone (a flat objective can stop a hair off).
    return math.exp(best) if nll(best) <= nll(0.0) else 1.0


@dataclass
class Calibration:
    """What fitting found: a temperature per head, and the report the job keeps."""

    temperatures: list[float]
    #: Where T was fitted: "validation" (the job's validation files), "held-out" (a slice of
    #: the training data the fitted model did not train on), or "none".
    source: str
    examples: int
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": "temperature", "source": self.source, "examples": self.examples,
                "ece_bins": ECE_BINS, "targets": self.targets}


def uncalibrated(heads: Sequence[Head], reason: str) -> Calibration:
    """T = 1 for every head, and why (the job's `calibration` event says it)."""
    return Calibration([1.0] * len(heads), "none", 0,
                       {h.name: {"temperature": 1.0, "reason": reason} for h in heads})


def calibrate(heads: Sequence[Head], logits: Sequence[F32], examples: Sequence[Example],
              source: str, weights: Sequence[float] | None = None) -> Calibration:
    """Fit each head's `T` on `logits[h]` (its (n, labels) logits over `examples`, each counted
    its `weights`: the file weights of held-out training examples; validation files have none)
    and report ECE before (T = 1) and after, unweighted, measured on the same examples: one
    parameter per target barely flatters its own fit (a test holds it on a separate split)."""
    w_all = None if weights is None else np.asarray(weights, dtype=np.float32)
    temperatures: list[float] = []
    report: dict[str, dict[str, Any]] = {}
    for head, z in zip(heads, logits, strict=True):
        y, has = label_matrix(head, examples)
        count = int(has.sum())
        if count < MIN_EXAMPLES:
            temperatures.append(1.0)
            report[head.name] = {"temperature": 1.0, "examples": count,
                                 "reason": f"fewer than {MIN_EXAMPLES} labelled examples"}
            continue
        zh, yh = z[has], y[has]
        t = fit_temperature(head, zh, yh, None if w_all is None else w_all[has])
        temperatures.append(t)
        report[head.name] = {
            "temperature": round(t, 6), "examples": count,
            "ece_before": round(ece(head, scaled(head, zh), yh), 6),
            "ece_after": round(ece(head, scaled(head, zh, t), yh), 6),
            "nll_before": round(head_loss(head, scaled(head, zh), yh), 6),
            "nll_after": round(head_loss(head, scaled(head, zh, t), yh), 6)}
    return Calibration(temperatures, source, len(examples), report)


__all__ = ["ECE_BINS", "Calibration", "calibrate", "ece", "fit_temperature", "holdout_size",
           "scaled", "uncalibrated", "wrong_decisions"]
