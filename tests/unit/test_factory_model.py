"""The n-gram model: deterministic features, heads that mean what they say, a schedule that
honours Mistral's hyperparameters, and models that survive a save and load."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.factory.data import Example, TargetSpec
from service.factory.model import (
    BATCH_SIZE,
    REFERENCE_LR,
    Checkpoint,
    Classifier,
    Featurizer,
    Hyperparameters,
    train,
)
from tests.support.factory import REPO, sentiment_rows


def _examples(n: int = 200) -> list[Example]:
    return [Example(i, row["text"], row["labels"]) for i, row in enumerate(sentiment_rows(n))]


SENTIMENT = [TargetSpec("sentiment", ("negative", "positive"), "single_class")]


def test_features_are_the_same_in_another_process() -> None:
    """Python's `hash` changes per process; ours must not, or a reloaded model is garbage."""
    texts = ["Hello wörld, how are you?", "short", ""]
    here = Featurizer().transform(texts)
    code = ("from service.factory.model import Featurizer;"
            "x = Featurizer().transform(['Hello wörld, how are you?', 'short', '']);"
            "print(x.indices.tolist()); print(x.indptr.tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == str(here.indices.tolist()) and out[1] == str(here.indptr.tolist())


def test_rows_are_normalised_and_empty_text_is_empty() -> None:
    x = Featurizer().transform(["some words here", "", "more"])
    assert x.rows == 3
    norms = [float(np.linalg.norm(x.data[x.indptr[i]:x.indptr[i + 1]])) for i in range(3)]
    assert norms[0] == pytest.approx(1.0, abs=1e-5) and norms[2] == pytest.approx(1.0, abs=1e-5)
    # An empty text still has its padding n-gram; nothing breaks on it.
    assert x.indptr[2] - x.indptr[1] <= 1


def test_training_learns_and_scores_are_probabilities() -> None:
    model, evaluation = train(_examples(), SENTIMENT, Hyperparameters(training_steps=100,
                                                                     learning_rate=4e-5),
                              validation=_examples(60))
    assert evaluation is not None and evaluation.targets["sentiment"]["macro_f1"] == 1.0
    (probs,) = model.predict_proba(["the car was fantastic and perfect", "useless and broken"])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert probs[0, 1] > 0.8 and probs[1, 0] > 0.8


def test_checkpoints_report_falling_losses() -> None:
    seen: list[Checkpoint] = []
    train(_examples(), SENTIMENT, Hyperparameters(training_steps=40), validation=_examples(40),
          on_checkpoint=seen.append, checkpoints=4)
    assert [c.step_number for c in seen] == [10, 20, 30, 40]
    assert all(c.valid_loss is not None and c.valid_accuracy is not None for c in seen)
    assert seen[-1].train_loss < seen[0].train_loss
    assert (seen[-1].valid_loss or 0) < (seen[0].valid_loss or 0)


def test_save_and_load_give_identical_scores(tmp_path: Path) -> None:
    model, _ = train(_examples(), SENTIMENT, Hyperparameters(training_steps=20))
    model.save(tmp_path / "m")
    loaded = Classifier.load(tmp_path / "m")
    texts = ["great meal", "awful phone", "unseen words entirely"]
    assert loaded.classify(texts) == model.classify(texts)
    assert loaded.heads == model.heads


def test_schedule_warmup_then_decay_relative_to_mistral_default() -> None:
    h = Hyperparameters(training_steps=100, learning_rate=4e-5, warmup_fraction=0.1)
    rates = [h.lr_at(step, 100) for step in range(100)]
    peak = REFERENCE_LR * 0.4
    assert rates[0] < rates[5] < rates[9]
    assert max(rates) == pytest.approx(peak, rel=1e-6)
    assert rates[-1] < rates[50] < peak
    assert rates[-1] >= 0.1 * peak - 1e-12
    assert Hyperparameters(learning_rate=1e-4, warmup_fraction=0).lr_at(0, 10) == REFERENCE_LR


def test_steps_from_training_steps_or_epochs() -> None:
    assert Hyperparameters(training_steps=7).steps_for(10_000) == 7
    assert Hyperparameters(epochs=2).steps_for(1000) == math.ceil(2 * 1000 / BATCH_SIZE)
    assert Hyperparameters(epochs=3).steps_for(100) == 3  # one full batch per epoch
    assert Hyperparameters().steps_for(50) == 100


def test_weight_decay_shrinks_weights() -> None:
    loose, _ = train(_examples(), SENTIMENT, Hyperparameters(training_steps=50, weight_decay=0.0))
    tight, _ = train(_examples(), SENTIMENT, Hyperparameters(training_steps=50, weight_decay=1.0))
    assert np.abs(tight.weights).sum() < np.abs(loose.weights).sum()


def test_multi_label_head_uses_independent_sigmoids() -> None:
    examples = []
    for i in range(120):
        tags = tuple(t for t, on in (("a", i % 2 == 0), ("b", i % 3 == 0)) if on) or ("c",)
        text = " ".join({"a": "apple", "b": "banana", "c": "cherry"}[t] for t in tags)
        examples.append(Example(i, text, {"tags": tags}))
    model, _ = train(examples, [TargetSpec("tags", ("a", "b", "c"), "multi_class")],
                     Hyperparameters(training_steps=100))
    (probs,) = model.predict_proba(["apple banana"])
    assert probs[0, 0] > 0.5 and probs[0, 1] > 0.5 and probs[0, 2] < 0.5
    assert probs.sum() > 1.0
