"""Logits -> per-head scores, shared by every base model: a softmax over a `single_class`
target's labels, one sigmoid per label of a `multi_class` target, heads side by side in one
logit matrix (`slices`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service.factory.models.base import Head, Scores

F32 = npt.NDArray[np.float32]


def softmax(z: F32) -> F32:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: F32 = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def sigmoid(z: F32) -> F32:
    """The logistic function through tanh, which cannot overflow."""
    out: F32 = (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
    return out


def slices(heads: Sequence[Head]) -> list[slice]:
    """Each head's columns in a matrix holding every head's labels in head order."""
    out, start = [], 0
    for head in heads:
        out.append(slice(start, start + len(head.labels)))
        start += len(head.labels)
    return out


def probabilities(heads: Sequence[Head], z: F32,
                  temperatures: Sequence[float] | None = None) -> list[F32]:
    """One (n, labels) score matrix per head from the (n, all labels) logits `z`, each head's
    logits divided by its temperature (`models.calibration`; none: 1, the scores as trained)."""
    out = []
    for k, (head, s) in enumerate(zip(heads, slices(heads), strict=True)):
        zs = z[:, s]
        if temperatures is not None and temperatures[k] != 1.0:
            zs = (zs / np.float32(temperatures[k])).astype(np.float32)
        out.append(softmax(zs) if head.loss_function == "single_class" else sigmoid(zs))
    return out


def labelled(heads: Sequence[Head], probs: Sequence[F32], n: int) -> list[Scores]:
    """Mistral's per-text results, `{target: {label: score}}`, scores rounded to 6 decimals."""
    results: list[Scores] = [{} for _ in range(n)]
    for head, p in zip(heads, probs, strict=True):
        for i, row in enumerate(p.astype(np.float64).round(6).tolist()):
            results[i][head.name] = dict(zip(head.labels, row, strict=True))
    return results
