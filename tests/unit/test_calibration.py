"""Temperature scaling (`service.factory.models.calibration`) on logits whose true temperature is
known: the fit finds it, ECE falls to the sampling noise, the argmax never moves, and a target
without enough labelled examples keeps T = 1."""

from __future__ import annotations

import numpy as np
import pytest

from service.factory.data import Example
from service.factory.models.base import Head
from service.factory.models.calibration import (
    MIN_EXAMPLES,
    calibrate,
    ece,
    fit_temperature,
    holdout_size,
    scaled,
)
from service.factory.models.evaluation import label_matrix
from service.factory.models.scoring import probabilities

INTENT = Head("intent", ("a", "b", "c", "d"), "single_class")
TAGS = Head("tags", ("x", "y", "z"), "multi_class")


def _single(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, list[Example]]:
    """Logits `z` and labels drawn from `softmax(z / true_t)`: the model is `true_t` too sure."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, 4)) * 3).astype(np.float32)
    p = scaled(INTENT, z, true_t)
    labels = [INTENT.labels[rng.choice(4, p=row / row.sum())] for row in p.astype(np.float64)]
    return z, [Example(i, "", {"intent": y}) for i, y in enumerate(labels)]


def _multi(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, list[Example]]:
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, 3)) * 4).astype(np.float32)
    p = scaled(TAGS, z, true_t)
    examples = []
    for i, row in enumerate(p):
        on = [label for label, q in zip(TAGS.labels, row, strict=True) if rng.random() < q]
        examples.append(Example(i, "", {"tags": tuple(on or ["x"])}))
    return z, examples


def test_the_fit_finds_the_true_temperature_and_ece_falls() -> None:
    z, examples = _single(4_000, 2.5)
    y, _ = label_matrix(INTENT, examples)
    t = fit_temperature(INTENT, z, y)
    assert 2.2 < t < 2.8
    before, after = ece(INTENT, scaled(INTENT, z), y), ece(INTENT, scaled(INTENT, z, t), y)
    assert before > 0.1 and after < 0.03, (before, after)
    assert (scaled(INTENT, z).argmax(axis=1) == scaled(INTENT, z, t).argmax(axis=1)).all()


def test_an_unsure_model_is_sharpened() -> None:
    z, examples = _single(4_000, 0.5, seed=1)
    y, _ = label_matrix(INTENT, examples)
    assert 0.42 < fit_temperature(INTENT, z, y) < 0.58


def test_a_held_out_slice_with_no_wrong_answer_keeps_the_scores() -> None:
    """Every answer right (the demo's templated sentiment): the NLL only falls as T shrinks, so
    the fit would stop at the search's bound (1/20) and serve exactly 1.0 and 0.0. T stays 1."""
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 4, size=40)
    z = rng.normal(size=(40, 4)).astype(np.float32)
    z[np.arange(40), gold] = z.max(axis=1) + rng.uniform(0.2, 3.0, size=40)  # gold on top
    examples = [Example(i, "", {"intent": INTENT.labels[g]}) for i, g in enumerate(gold)]
    y, _ = label_matrix(INTENT, examples)
    assert fit_temperature(INTENT, z, y) == 1.0
    # Wrong answers are evidence: the fit then finds a T off the bound.
    z[:4] = -z[:4]
    assert 1 / 20 * 1.01 < fit_temperature(INTENT, z, y) < 1.0


def test_a_multi_label_slice_with_no_wrong_decision_keeps_the_scores() -> None:
    z = np.array([[3.0, -2.0, -1.0], [-2.0, 2.5, 1.5]] * 15, dtype=np.float32)
    examples = [Example(i, "", {"tags": ("x",) if i % 2 == 0 else ("y", "z")})
                for i in range(30)]
    y, _ = label_matrix(TAGS, examples)
    assert fit_temperature(TAGS, z, y) == 1.0


def test_a_multi_label_target_gets_its_own_sigmoid_temperature() -> None:
    z, examples = _multi(3_000, 2.0)
    found = calibrate([TAGS], [z], examples, "held-out")
    (t,) = found.temperatures
    report = found.targets["tags"]
    # Around 2: a row drawn with no label gets "x" (a row must label the target), which moves
    # the truth a little (2.43 measured).
    assert 1.6 < t < 2.8 and report["ece_after"] < report["ece_before"]
    assert report["nll_after"] < report["nll_before"]
    assert found.to_json()["source"] == "held-out" and found.to_json()["ece_bins"] == 15


def test_ece_of_known_scores() -> None:
    """Two bins: 0.95 confident and right 3 times of 4 (|0.75 - 0.95| = 0.2), 0.55 confident and
    right 1 time of 2 (0.05): (4 * 0.2 + 2 * 0.05) / 6 = 0.15."""
    head = Head("t", ("a", "b"), "single_class")
    p = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 2, dtype=np.float32)
    y = np.array([[1, 0]] * 3 + [[0, 1]] + [[1, 0], [0, 1]], dtype=np.float32)
    assert ece(head, p, y) == pytest.approx(0.15, abs=1e-6)


def test_too_few_labelled_examples_keep_the_scores_as_trained() -> None:
    z, examples = _single(MIN_EXAMPLES - 1, 3.0)
    found = calibrate([INTENT], [z], examples, "validation")
    assert found.temperatures == [1.0] and "fewer than" in found.targets["intent"]["reason"]


def test_temperatures_divide_each_heads_logits_and_one_means_unchanged() -> None:
    heads = [INTENT, TAGS]
    z = np.random.default_rng(3).normal(size=(5, 7)).astype(np.float32)
    plain = probabilities(heads, z)
    assert all(np.array_equal(a, b) for a, b in zip(plain, probabilities(heads, z, [1.0, 1.0]),
                                                    strict=True))
    hot = probabilities(heads, z, [2.0, 0.5])
    assert np.allclose(hot[0], scaled(INTENT, z[:, :4], 2.0))
    assert np.allclose(hot[1], scaled(TAGS, z[:, 4:], 0.5))


def test_the_held_out_slice() -> None:
    assert holdout_size(199) == 0 and holdout_size(200) == 20 and holdout_size(3_000) == 300
    assert holdout_size(100_000) == 600
