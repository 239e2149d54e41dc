"""Scores against gold labels: the one evaluation every base model reports.

Computed from the scores a `Predictor` returns, so that a checkpoint's `valid_loss`, the job's
final `evaluation` and a bench measure the same thing whatever the model: cross-entropy for a
`single_class` target, mean binary cross-entropy over labels for a `multi_class` one; accuracy is
exact match of the predicted label set (argmax, or every label >= 0.5); macro-F1 over the labels
that occur in gold or predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service.factory.data import Example
from service.factory.models.base import Evaluation, Head

F32 = npt.NDArray[np.float32]


def label_matrix(head: Head, examples: Sequence[Example]) -> tuple[F32, npt.NDArray[np.bool_]]:
    """`(y, has)`: a (n, labels) 0/1 matrix (a `single_class` list shares its mass) and which
    examples label this head at all."""
    index = {label: i for i, label in enumerate(head.labels)}
    y = np.zeros((len(examples), len(head.labels)), dtype=np.float32)
    has = np.zeros(len(examples), dtype=bool)
    for row, example in enumerate(examples):
        value = example.labels.get(head.name)
        if value is None:
            continue
        values = (value,) if isinstance(value, str) else value
        hits = [index[v] for v in values if v in index]
        if hits:
            y[row, hits] = 1.0
            has[row] = True
    if head.loss_function == "single_class":
        sums = y.sum(axis=1, keepdims=True)
        y = np.divide(y, sums, out=np.zeros_like(y), where=sums > 0)
    return y, has


def predicted(head: Head, p: F32) -> npt.NDArray[np.bool_]:
    if head.loss_function == "single_class":
        out = np.zeros(p.shape, dtype=bool)
        out[np.arange(len(p)), p.argmax(axis=1)] = True
        return out
    return p >= 0.5


def head_loss(head: Head, p: F32, y: F32) -> float:
    """Mean loss over rows of probabilities `p` against targets `y`."""
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    if head.loss_function == "single_class":
        return float(-(y * np.log(p)).sum(axis=1).mean())
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1).mean())


def macro_f1(pred: npt.NDArray[np.bool_], gold: npt.NDArray[np.bool_]) -> float:
    f1s = []
    for j in range(gold.shape[1]):
        tp = float((pred[:, j] & gold[:, j]).sum())
        fp = float((pred[:, j] & ~gold[:, j]).sum())
        fn = float((~pred[:, j] & gold[:, j]).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def evaluate_probabilities(heads: Sequence[Head], probs: Sequence[F32],
                           examples: Sequence[Example]) -> Evaluation:
    """`probs[h]` is the (n, labels) score matrix of head `h` over `examples`."""
    per_target: dict[str, dict[str, float]] = {}
    loss = 0.0
    for head, p in zip(heads, probs, strict=True):
        y, has = label_matrix(head, examples)
        if not has.any():
            continue
        loss += head.weight * head_loss(head, p[has], y[has])
        pred = predicted(head, p[has])
        gold = y[has] > 0
        per_target[head.name] = {
            "accuracy": round(float((pred == gold).all(axis=1).mean()), 6),
            "macro_f1": round(macro_f1(pred, gold), 6),
            "examples": int(has.sum()),
        }
    accuracy = float(np.mean([t["accuracy"] for t in per_target.values()])) if per_target else 0.0
    return Evaluation(loss, accuracy, per_target)
