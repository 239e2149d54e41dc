"""`local-minilm` against the TF-IDF + logistic regression baseline, both fitted here on the same
split of real corpora (a few hundred examples each, a short job, so the file stays within ~3
minutes on 2 cores).

The baseline: make_union(word 1-2 TF-IDF, char_wb 2-5 TF-IDF, sublinear) + LogisticRegression(C=10).
Floors are set below what was measured on this split (see MEASURED), so that they catch a broken
recipe, not noise: every corpus at least baseline - 0.01 (the n-gram blend's promise), the
short-text sentiment corpus above the baseline (what the pretrained encoder adds).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from service.factory.data import Example, TargetSpec
from service.factory.models.base import Hyperparameters, SilentControl, TrainingData, TrainingSpec
from service.factory.models.minilm import MiniLM
from tests.support import corpora
from tests.support.baseline import baseline_f1
from tests.support.factory import bbc_news, split
from tests.support.factory_intents import intent_examples


def test_the_encoder_extra_is_installed() -> None:
    """These tests need the `encoder` extra (`make test` installs it): without it they fail,
    never skip, and this one says what to install."""
    assert MiniLM().availability() is None, MiniLM().availability()

Rows = list[tuple[str, str]]

#: name -> (rows, training steps, seq_len, minimum gain over the baseline).
CASES: dict[str, tuple[Callable[[], Rows], int, int, float]] = {
    "tweets": (lambda: corpora.sentiment_tweets(limit=1_000), 20, 128, 0.03),
    "intents": (lambda: [(f"user: {t}", y) for t, y in intent_examples(per_intent=15)], 20, 64,
                -0.01),
    "bbc": (lambda: bbc_news()[::5], 10, 64, -0.01),
}
#: Measured on 2 cores (macro-F1 on the test split; model = the blend of encoder and n-gram;
#: seconds = the model's training and test predictions), 7 Dec 2026 on a quiet machine, after the
#: encoder's loss began balancing labels (`minilm_train.BALANCE_POWER`; before it, the previous
#: table: tweets 0.6556, intents 0.8785, bbc 0.9629). No rare-label case here: at this size (French
#: Home Assistant domains, 1,074 sentences, 40 steps) the balancing's effect was within the
#: training seed's noise (served minus baseline, training seeds 0, 1, 2: balanced +0.030, +0.030,
#: -0.004; plain -0.004, +0.033, -0.006): `bench.minilm_rare_labels` measures it (100 steps).
#: Since the blend mixes the product half and half with the two models alone
#: (`minilm_train.choose_blends`), the same day: tweets 0.6459 -> 0.6509, intents and bbc the same.
MEASURED = {
    "tweets": {"baseline": 0.5887, "model": 0.6509, "seconds": 36},  # +0.062, floor +0.03
    "intents": {"baseline": 0.8696, "model": 0.8900, "seconds": 15},  # +0.020, floor -0.01
    "bbc": {"baseline": 0.9544, "model": 0.9629, "seconds": 25},  # +0.009, floor -0.01
}


def minilm_f1(train_rows: Rows, test_rows: Rows, steps: int, seq_len: int) -> float:
    from sklearn.metrics import f1_score

    labels = tuple(sorted({y for _, y in train_rows}))
    examples = [Example(i, t, {"y": y}) for i, (t, y) in enumerate(train_rows)]
    spec = TrainingSpec("local-minilm", "text", (TargetSpec("y", labels, "single_class"),),
                        (), (), Hyperparameters(training_steps=steps, learning_rate=4e-5,
                                                seq_len=seq_len), "/unused")
    model, _ = MiniLM(device="cpu").train(TrainingData(examples, [1.0] * len(examples)), spec,
                                          SilentControl())
    predicted = [max(scores["y"], key=scores["y"].__getitem__)
                 for scores in model.classify([t for t, _ in test_rows])]
    return float(f1_score([y for _, y in test_rows], predicted, average="macro"))


@pytest.mark.parametrize("name", list(CASES))
def test_minilm_against_baseline(name: str) -> None:
    load, steps, seq_len, gain = CASES[name]
    train_rows, test_rows = split(load(), 0.3, seed=0)
    started = time.monotonic()
    model = minilm_f1(train_rows, test_rows, steps, seq_len)
    seconds = time.monotonic() - started
    base = baseline_f1(train_rows, test_rows)
    print(f"{name}: minilm {model:.4f} baseline {base:.4f} ({seconds:.0f} s, "
          f"{len(train_rows)} train, {len(test_rows)} test)")
    assert model >= base + gain, (name, model, base)
