"""Calibrated scores: ECE of the top label before and after the temperatures, and macro-F1, for
each base model on a sentiment corpus and an intent corpus, side by side in one run.

Each model is trained as a job without a validation file trains it (`BaseModel.train`, so the
temperatures are fitted on a held-out slice of the training data, `models.calibration`), with
Mistral's example job (`training_steps: 100, learning_rate: 4e-5`), then scored on the test
split:
- `sentiment`: `sentiment_tweets` (CrowdFlower tweets, 3 labels, its default 12,000 rows) split
  80/20 as tests/integration/test_ngram_quality.py splits it (seed 0): the first 3,000 of the
  training part train, the 2,400 of the test part test;
- `intent`: Home Assistant intents (`intent_examples(per_intent=200)`, 42 intents) split 80/20
  the same way: the first 3,000 of the training part train, the 1,388 of the test part test.

A test split of 2,400 rather than 750: ECE over 15 bins is biased upwards by sampling noise, by
~0.02 at 750 examples (a first run measured `local-ngram` on 750 tweets at 0.054 after, and on
2,400 at 0.018, the same recipe), which is the size of the target itself.

Per model and corpus: `ece_before` (T = 1, the scores as trained), `ece_after` (the served
scores), 15 bins, top label; `macro_f1` (the same before and after: `argmax_unchanged` checks
it); the temperatures and where they were fitted; training seconds.

    nice -n 10 python -m bench.calibration                      # ~15-25 minutes on 2 cores
    python -m bench.calibration --models local-ngram            # seconds
    python -m bench.calibration --corpora intent --models local-minilm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import f1_score

from bench.harness import emit
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
from service.factory.models.registry import default_registry
from tests.support import corpora
from tests.support.factory import MISTRAL_EXAMPLE as MISTRAL_JOB
from tests.support.factory import split
from tests.support.factory_intents import intent_examples

MISTRAL_EXAMPLE = Hyperparameters.from_job(MISTRAL_JOB)  # tests/support/factory.py
Rows = list[tuple[str, str]]
CORPORA: dict[str, Callable[[], Rows]] = {
    "sentiment": corpora.sentiment_tweets,
    "intent": lambda: intent_examples(per_intent=200),
}
TRAIN_EXAMPLES = 3_000
MODELS = ("local-ngram", "local-minilm")


def head_logits(model: Any, texts: Sequence[str]) -> list[Any]:
    """Each head's logits before its temperature, whichever base model `model` is."""
    if hasattr(model, "head_logits"):
        return list(model.head_logits(texts))
    from service.factory.models.ngram import head_logits as ngram_logits

    return ngram_logits(model, texts)


def measure(base_name: str, train: Rows, test: Rows) -> dict[str, Any]:
    labels = tuple(sorted({y for _, y in train}))
    target = TargetSpec("y", labels, "single_class")
    head = Head.from_target(target)
    examples = [Example(i, t, {"y": y}) for i, (t, y) in enumerate(train)]
    spec = TrainingSpec(base_name, "text", (target,), (), (), MISTRAL_EXAMPLE, "/unused")
    base = default_registry().get(base_name)
    control = SilentControl()
    started = time.monotonic()
    model, _ = base.train(TrainingData(examples, [1.0] * len(examples)), spec, control)
    seconds = time.monotonic() - started
    texts = [t for t, _ in test]
    test_examples = [Example(i, t, {"y": y}) for i, (t, y) in enumerate(test)]
    (z,) = head_logits(model, texts)
    y, has = label_matrix(head, test_examples)
    assert has.all()
    report = dict(model.info.get("calibration") or {})
    fitted = (report.get("targets") or {}).get("y", {})
    temperature = float(fitted.get("temperature", 1.0))
    before, after = scaled(head, z), scaled(head, z, temperature)
    served = np.asarray([[s["y"][label] for label in labels] for s in model.classify(texts)])
    gold = [labels[i] for i in y.argmax(axis=1)]
    f1 = float(f1_score(gold, [labels[i] for i in after.argmax(axis=1)], average="macro"))
    return {
        "train_examples": len(train), "test_examples": len(test), "labels": len(labels),
        "ece_before": round(ece(head, before, y), 4), "ece_after": round(ece(head, after, y), 4),
        "macro_f1": round(f1, 4),
        "argmax_unchanged": bool((before.argmax(axis=1) == after.argmax(axis=1)).all()),
        # The served scores are rounded to 6 decimals.
        "served_matches": float(np.abs(served - after).max()) < 1e-5,
        "temperature": round(temperature, 4),
        "fitted_on": {"source": report.get("source"), "examples": report.get("examples"),
                      **{k: v for k, v in fitted.items() if k.startswith("ece")}},
        "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=list(CORPORA))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    result: dict[str, Any] = {"job": {"training_steps": 100, "learning_rate": 4e-5},
                              "ece_bins": 15, "corpora": {}}
    for name in args.corpora:
        train, test = split(CORPORA[name](), 0.2, seed=0)
        train = train[:TRAIN_EXAMPLES]
        result["corpora"][name] = {}
        for model in args.models:
            figures = measure(model, train, test)
            result["corpora"][name][model] = figures
            # Progress on stderr: a model trains for minutes, and a run cut short keeps these.
            print(json.dumps({"corpus": name, "model": model, **figures}), file=sys.stderr,
                  flush=True)
    emit(result)


if __name__ == "__main__":
    main()
