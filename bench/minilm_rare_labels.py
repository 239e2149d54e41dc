"""`local-minilm` where some labels are rare (issue 23 §4), with and without the encoder's
square-root class balancing (`minilm_train.BALANCE_POWER`), side by side on the same splits.

Mistral's example job (100 steps, learning rate 4e-5) on each corpus and seed (an 80/20 split),
once per balancing power: the served model's macro-F1 per target, the product part of its blend
alone (what models trained before 7 Dec 2026 served), the encoder alone, the n-gram model alone
and the blend chosen, next to the TF-IDF + logistic-regression baseline fitted on the same split. Corpora (tests/support/corpora.py): `ha` Home Assistant intents and domains
(80 a intent, 2,971 sentences; the domains are skewed), `hafr` the same in French (75 a intent),
`skewed1.0`/`skewed1.3` the English ones with Zipf-skewed intents (`home_assistant_skewed`),
`tweets` and `reviews` (3,750 each).

Prints one JSON object: a row per (corpus, seed, power, target), then per power the mean of the
served macro-F1 minus the baseline's, the lowest, and how many targets are below the
`local-minilm` floor (baseline - 0.01).

    python -m bench.minilm_rare_labels                 # 6 corpora x 3 seeds x 2 powers: ~70 min
    python -m bench.minilm_rare_labels --quick         # hafr, seed 0, both powers (~4 minutes)
    python -m bench.minilm_rare_labels --corpora ha tweets --seeds 0 1 --powers 0.5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench.minilm_bench import MISTRAL_EXAMPLE
from service.factory.data import Example, TargetSpec
from service.factory.models.base import SilentControl, TrainingData, TrainingSpec
from service.factory.models.minilm import BATCH_SIZE, DEFAULT_SEQ_LEN, MAX_CHUNKS
from tests.support import corpora
from tests.support.baseline import baseline_f1
from tests.support.factory import split

Row = tuple[str, ...]
FLOOR = 0.01

CORPORA: dict[str, tuple[Callable[[], list[Any]], tuple[str, ...]]] = {
    "ha": (lambda: corpora.home_assistant_two_targets(80), ("intent", "domain")),
    "hafr": (lambda: corpora.home_assistant_two_targets(75, language="fr"), ("intent", "domain")),
    "skewed1.0": (lambda: corpora.home_assistant_skewed(alpha=1.0), ("intent", "domain")),
    "skewed1.3": (lambda: corpora.home_assistant_skewed(alpha=1.3), ("intent", "domain")),
    "tweets": (lambda: corpora.sentiment_tweets(limit=3_750), ("sentiment",)),
    "reviews": (lambda: corpora.rotten_tomatoes(limit=3_750), ("sentiment",)),
}


def macro_f1(head: Any, z: Any, ev: Any, gold: list[str], parts: Any) -> float:
    """Macro-F1 of one head's blend `parts` of encoder logits `z` and n-gram evidence `ev`
    (argmax only: the temperature does not move it)."""
    from sklearn.metrics import f1_score

    from service.factory.models.minilm_onnx import blend_logits

    predicted = blend_logits(head, z, ev, parts).argmax(axis=1)
    return round(float(f1_score(gold, [head.labels[i] for i in predicted], average="macro")), 4)


def run_one(train_rows: list[Row], test_rows: list[Row], targets: tuple[str, ...], seed: int,
            power: float, baselines: list[float]) -> list[dict[str, Any]]:
    """Train once at `power` (training seed `seed`) on `train_rows`; a row per target, scored on
    `test_rows` (the test texts go through the encoder and the n-gram model once)."""
    from service.factory.models import minilm_train
    from service.factory.models.minilm_onnx import evidence, product
    from service.factory.models.scoring import slices

    examples = [Example(i, r[0], dict(zip(targets, r[1:], strict=True)))
                for i, r in enumerate(train_rows)]
    spec = TrainingSpec(
        "local-minilm", "text",
        tuple(TargetSpec(t, tuple(sorted({r[k + 1] for r in train_rows})), "single_class")
              for k, t in enumerate(targets)),
        (), (), replace(MISTRAL_EXAMPLE, seed=seed), "/unused")
    minilm_train.BALANCE_POWER = power
    started = time.perf_counter()
    trained = minilm_train.run(TrainingData(examples, [1.0] * len(examples)), spec,
                               SilentControl(), seq_len=DEFAULT_SEQ_LEN, max_chunks=MAX_CHUNKS,
                               batch_size=BATCH_SIZE)
    seconds = time.perf_counter() - started
    model = trained.model
    texts = [r[0] for r in test_rows]
    z = model.encoder_logits(texts)
    assert model.ngram is not None
    ngram = model.ngram.predict_proba(texts)
    out = []
    for k, (head, s) in enumerate(zip(model.heads, slices(model.heads), strict=True)):
        gold = [r[k + 1] for r in test_rows]
        zk, ev = z[:, s], evidence(head, ngram[k])
        parts = model.weights[k]
        served = macro_f1(head, zk, ev, gold, parts)
        out.append({"target": head.name, "power": power, "seed": seed, "served": served,
                    # the blend's first part alone: what models trained before 7 Dec served
                    "product": macro_f1(head, zk, ev, gold, parts[:1] if len(parts) == 1
                                        else product(parts[0][1:])),
                    "encoder": macro_f1(head, zk, ev, gold, product((1.0, 0.0))),
                    "ngram": macro_f1(head, zk, ev, gold, product((0.0, 1.0))),
                    "baseline": round(baselines[k], 4),
                    "served_minus_baseline": round(served - baselines[k], 4),
                    "blend": [list(part) for part in parts], "seconds": round(seconds, 1)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=list(CORPORA))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--powers", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument("--quick", action="store_true", help="hafr, seed 0, both powers")
    args = parser.parse_args()
    names, seeds = (["hafr"], [0]) if args.quick else (args.corpora, args.seeds)
    rows_out: list[dict[str, Any]] = []
    for name in names:
        load, targets = CORPORA[name]
        rows = load()
        for seed in seeds:
            train_rows, test_rows = split(rows, 0.2, seed=seed)
            baselines = [baseline_f1([(r[0], r[k + 1]) for r in train_rows],
                                     [(r[0], r[k + 1]) for r in test_rows])
                         for k in range(len(targets))]
            for power in args.powers:
                for row in run_one(train_rows, test_rows, targets, seed, power,
                                   baselines):
                    rows_out.append({"corpus": name, **row})
    summary = {}
    for power in args.powers:
        gaps = [r["served_minus_baseline"] for r in rows_out if r["power"] == power]
        summary[str(power)] = {"targets": len(gaps), "mean": round(statistics.mean(gaps), 4),
                               "lowest": min(gaps),
                               "below_floor": sum(g < -FLOOR for g in gaps)}
    print(json.dumps({"rows": rows_out, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
