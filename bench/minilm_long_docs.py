"""`local-minilm` on long documents against short texts (issue 23 §4): Mistral's example job
(100 steps, learning rate 4e-5) on 2,000 BBC articles (~2,400 characters, ~490 tokens: ~4
chunks of 128) and on 2,000 tweets (~100 characters, ~31 tokens: one chunk), the same seed, each
scored on a held-out test split next to the TF-IDF + logistic-regression baseline fitted on the
same split.

Prints one JSON object: per corpus the training wall time (`minilm_train.run`, everything
`MiniLM().train` does), the time of each phase, macro-F1 (the blend, the encoder alone, the
n-gram model alone), the baseline's macro-F1 and the quality floor (baseline - 0.01); then
`long_short_ratio`, BBC's training time over the tweets'. The goal: <= 1.5 at the same quality.

Phases are timed by wrapping the functions `minilm_train.run` calls, one a stage (so the same
bench times any version of the code that keeps those names): `network` (load the base model,
tokenise), `probe` (`_init_heads`), `finetune` (`_loop`: the optimiser steps), `export`
(`_export`: ONNX, fusion, int8), `blend` (`_blend`: the held-out slice scored, the n-gram
models awaited, the weights chosen), `calibration` (`_calibrate`), `figures` (`export_figures`),
`other` (the rest: seeding, the float32 state, bookkeeping). `ngram_fit_threads` is the n-gram
fits' own time, in threads alongside `export` (not added to the wall time); `*_onnx_s` is the
served graph's share of a phase (`MiniLMModel.encoder_logits`, or `sequence_logits`).

    python -m bench.minilm_long_docs                   # ~8 minutes on 2 cores (AVX2)
    python -m bench.minilm_long_docs --quick           # 600 examples, 30 steps (~2 minutes)
    python -m bench.minilm_long_docs --corpora bbc --save /tmp/after   # test probabilities

Before and after a change: run it from a copy of the code before (`git archive`) and from this
checkout, one after the other, on the same machine (docs/performance.md has the figures).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.minilm_bench import MISTRAL_EXAMPLE, fit, macro_f1
from service.factory.models.base import Hyperparameters
from tests.support import corpora
from tests.support.baseline import baseline_f1
from tests.support.factory import bbc_news, split

Rows = list[tuple[str, str]]
#: The stages of `minilm_train.run`, timed on the thread that runs it.
PHASES = {"_network": "network", "_init_heads": "probe", "_loop": "finetune",
          "_export": "export", "_blend": "blend", "_calibrate": "calibration",
          "export_figures": "figures"}
FLOOR = 0.01


class PhaseClock:
    """Wall time per stage of `minilm_train.run` (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.main = threading.get_ident()

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def stage(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            self.current = name
            try:
                return function(*args, **kwargs)
            finally:
                self.current = None
                self.add(name, time.perf_counter() - started)
        return timed

    def side(self, key: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """Time `function` wherever it runs; on the training thread, as a share of the stage."""
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                if threading.get_ident() != self.main:
                    self.add(key, elapsed)
                elif self.current is not None:
                    self.add(f"{self.current}_{key}", elapsed)
        return timed


@contextmanager
def timed_phases() -> Iterator[PhaseClock]:
    from service.factory.models import minilm_onnx, minilm_train

    clock = PhaseClock()
    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, wrapper: Any) -> None:
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper)

    for function, name in PHASES.items():
        patch(minilm_train, function, clock.stage(name, getattr(minilm_train, function)))
    patch(minilm_train, "fit_ngram", clock.side("ngram_fit_threads", minilm_train.fit_ngram))
    # the served graph's entry point: `sequence_logits` where it exists (encoder_logits calls it)
    served = ("sequence_logits" if hasattr(minilm_onnx.MiniLMModel, "sequence_logits")
              else "encoder_logits")
    patch(minilm_onnx.MiniLMModel, served,
          clock.side("onnx_s", getattr(minilm_onnx.MiniLMModel, served)))
    try:
        yield clock
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def measure(name: str, train_rows: Rows, test_rows: Rows, hyper: Hyperparameters,
            save: Path | None) -> dict[str, Any]:
    """One training run of `train_rows`, its phases, and both models on `test_rows`."""
    with timed_phases() as clock:
        trained, seconds = fit(train_rows, hyper)
    phases = {k: round(v, 2) for k, v in clock.seconds.items()}
    staged = sum(v for k, v in clock.seconds.items() if k in PHASES.values())
    phases["other"] = round(seconds - staged, 2)
    model = trained.model
    texts = [t for t, _ in test_rows]
    (probs,) = model.predict_proba(texts)
    labels = model.heads[0].labels
    predicted = "\n".join(labels[i] for i in probs.argmax(axis=1))
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        np.save(save / f"{name}.npy", probs)
    started = time.perf_counter()
    base = round(baseline_f1(train_rows, test_rows), 4)
    baseline_s = time.perf_counter() - started
    scores = macro_f1(model, test_rows)
    return {"train": len(train_rows), "test": len(test_rows),
            "mean_chars": round(sum(len(t) for t, _ in train_rows) / len(train_rows)),
            "train_seconds": round(seconds, 1), "phases": phases,
            "info_seconds": {k: v for k, v in model.info.items() if k.endswith("seconds")},
            "steps": model.info.get("steps"), "blend_weights": model.weights,
            "temperatures": [round(t, 4) for t in model.temperatures],
            **scores, "baseline_macro_f1": base, "baseline_fit_seconds": round(baseline_s, 1),
            "floor_met": scores["macro_f1"] >= base - FLOOR,
            "predictions_sha256": hashlib.sha256(predicted.encode()).hexdigest()[:16]}


def corpus(name: str, train: int, seed: int) -> tuple[Rows, Rows]:
    """`train` rows to train on and the rest (at most `train`) held out, split with `seed`."""
    rows = bbc_news() if name == "bbc" else corpora.sentiment_tweets(limit=2 * train)
    train = min(train, len(rows) - 1)
    train_rows, test_rows = split(rows, (len(rows) - train + 0.5) / len(rows), seed=seed)
    return train_rows, test_rows[:train]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="600 examples, 30 steps")
    parser.add_argument("--corpora", nargs="*", default=["bbc", "tweets"],
                        choices=["bbc", "tweets"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None,
                        help="a directory for each corpus's test probabilities (<corpus>.npy)")
    args = parser.parse_args()
    train, hyper = ((600, replace(MISTRAL_EXAMPLE, training_steps=30))
                    if args.quick else (2_000, MISTRAL_EXAMPLE))
    result: dict[str, Any] = {"machine_cores": os.cpu_count(), "quick": args.quick,
                              "job": {"training_steps": hyper.training_steps,
                                      "learning_rate": hyper.learning_rate}}
    for name in args.corpora:
        train_rows, test_rows = corpus(name, train, args.seed)
        result[name] = measure(name, train_rows, test_rows, hyper, args.save)
    if "bbc" in result and "tweets" in result:
        result["long_short_ratio"] = round(result["bbc"]["train_seconds"]
                                           / result["tweets"]["train_seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
