"""`local-ngram`'s temperatures on real corpora (registry-package wheels, tests/support/corpora.py):
trained as a job trains it (`NGram.train`), scored on a test split it never saw. ECE (15 bins, top
label) falls, and the argmax does not move, so macro-F1 is unchanged.

Small on purpose (~5-10 s each on 2 busy cores); bench/calibration.py measures both models on
3,000 training examples. Measured on 2026-12-07 (2 cores shared with other jobs), ECE on the
test split before -> after:
- tweets, 1,000 training examples, no validation file (T fitted on the 100 held out): 0.090 ->
  0.047 (T = 1.82);
- 42 intents, 700 training examples and a validation file of 76: 0.179 -> 0.029 (T = 0.49: the
  model is too *unsure*; the n-gram model's L2 penalty spreads 42 labels' mass).
The floors leave room for noise (the test splits are 1,500 and 775 examples: ECE's own sampling
error is ~0.01-0.02 there).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.factory.data import Example, TargetSpec
from service.factory.models.base import (
    Head,
    Hyperparameters,
    SilentControl,
    TrainingData,
    TrainingSpec,
)
from service.factory.models.calibration import ece, scaled
from service.factory.models.evaluation import label_matrix
from service.factory.models.ngram import NGram, head_logits
from tests.support import corpora
from tests.support.factory import split
from tests.support.factory_intents import intent_examples

Rows = list[tuple[str, str]]
#: name -> (rows, training examples, validation examples, ECE floor before, ceiling after).
CASES: dict[str, tuple[Callable[[], Rows], int, int, float, float]] = {
    "tweets_held_out": (lambda: corpora.sentiment_tweets(limit=3_000), 1_000, 0, 0.07, 0.065),
    "intents_validation": (lambda: intent_examples(per_intent=40), 700, 76, 0.12, 0.045),
}


def _examples(rows: Rows) -> list[Example]:
    return [Example(i, text, {"y": label}) for i, (text, label) in enumerate(rows)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_temperatures_bring_ece_down_on_a_test_split_and_keep_the_argmax(case: str) -> None:
    load, n_train, n_valid, before_floor, after_ceiling = CASES[case]
    rows = load()
    pool, test = split(rows, 0.5, seed=0)
    train, valid = pool[:n_train], pool[n_train:n_train + n_valid]
    labels = tuple(sorted({label for _, label in rows}))
    target = TargetSpec("y", labels, "single_class")
    head = Head.from_target(target)
    spec = TrainingSpec("local-ngram", "text", (target,), (), (),
                        Hyperparameters(training_steps=100, learning_rate=4e-5), "/unused")
    control = SilentControl()
    model, _ = NGram().train(TrainingData(_examples(train), [1.0] * len(train),
                                          _examples(valid)), spec, control)
    event = dict(control.events)["calibration"]
    assert event["source"] == ("validation" if valid else "held-out")

    (z,) = head_logits(model, [text for text, _ in test])
    y, has = label_matrix(head, _examples(test))
    assert has.all()
    (t,) = model.temperatures
    before, after = scaled(head, z), scaled(head, z, t)
    ece_before, ece_after = ece(head, before, y), ece(head, after, y)
    print(f"{case}: T {t:.3f}, ECE {ece_before:.4f} -> {ece_after:.4f}")
    assert (before.argmax(axis=1) == after.argmax(axis=1)).all()
    assert ece_before >= before_floor and ece_after <= after_ceiling
    assert ece_after < ece_before
