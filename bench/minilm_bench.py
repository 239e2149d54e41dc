"""`local-minilm` benchmark: training time of Mistral's example job, serving speed against a plain
transformers PyTorch loop with the same weights, and macro-F1 against the TF-IDF baseline.

Prints one JSON object:
- `train_10k`: Mistral's example job (100 steps, learning rate 4e-5) on 10,000 tweets
  (`sentiment_tweets`, ~100 characters), everything `train` does (load, linear probe, fine-tuning,
  ONNX export, int8 quantisation, n-gram side model, blend weights), and that model's macro-F1 on
  2,000 held-out tweets next to the baseline's.
- `serving`: items/s of the ONNX predictor (`MiniLMModel.encoder_logits`, and `classify` with the
  n-gram blend) and of a plain loop (transformers BertModel + the same fine-tuned head, float32,
  `torch.inference_mode`, torch's default threads, each batch padded to its longest text) at the
  same batch size, interleaved over 5 rounds, medians (and each round's figure); and the
  single-item latency of `classify` in process.
- `http`: the same over HTTP against a factory process (`POST /v1/classifications`): single-text
  p50/p99 and items/s in batches of 32, for a `local-minilm` model trained there on 1,000 tweets.
- `device_inference`: batched inference (256 a batch, fp16 on CUDA) with the network on the device
  it trained on: with `--device cuda`, the GPU figures (time and items/s, the GPU named).
- `quantization`: the served int8 graph against a float32 export of the same network, and how far
  each moves a text's scores with its batch-mates (one text per call, as served, against the
  former one call per batch).
- `accuracy`: per corpus, the model (Mistral's example job) and the baseline on the same split.

The baseline: make_union(word 1-2 TF-IDF, char_wb 2-5 TF-IDF, sublinear) + LogisticRegression(C=10).

    python -m bench.minilm_bench                    # ~15 minutes on 2 cores
    python -m bench.minilm_bench --quick            # train_10k and serving only (~5 minutes)
    python -m bench.minilm_bench --corpora intents bbc
    python -m bench.minilm_bench --quick --device cuda   # on a GPU: its training time and items/s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.factory_bench import http_figures
from service.factory.data import Example, TargetSpec
from service.factory.models.base import (
    Hyperparameters,
    SilentControl,
    TrainingData,
    TrainingSpec,
)
from service.factory.models.minilm import BATCH_SIZE, DEFAULT_SEQ_LEN, MAX_CHUNKS
from tests.support import corpora
from tests.support.baseline import baseline_f1 as baseline
from tests.support.factory import MISTRAL_EXAMPLE as MISTRAL_JOB
from tests.support.factory import bbc_news, split
from tests.support.factory_intents import intent_examples

MISTRAL_EXAMPLE = Hyperparameters.from_job(MISTRAL_JOB)  # tests/support/factory.py
Rows = list[tuple[str, str]]

CORPORA: dict[str, Callable[[], Rows]] = {
    "tweets": lambda: corpora.sentiment_tweets(limit=3_750),
    "rotten_tomatoes": lambda: corpora.rotten_tomatoes(limit=3_750),
    "sms_spam": lambda: corpora.sms_spam(limit=3_750),
    "election": lambda: corpora.election_tweets(limit=3_750),
    "intents": lambda: [(f"user: {t}", y) for t, y in intent_examples()],
    "bbc": bbc_news,
}


def fit(train_rows: Rows, hyper: Hyperparameters = MISTRAL_EXAMPLE,
        device: str | None = None) -> tuple[Any, float]:
    """`minilm_train.run` as `MiniLM().train` calls it: (Trained, seconds)."""
    from service.factory.models import minilm_train

    labels = tuple(sorted({y for _, y in train_rows}))
    examples = [Example(i, t, {"y": y}) for i, (t, y) in enumerate(train_rows)]
    spec = TrainingSpec("local-minilm", "text", (TargetSpec("y", labels, "single_class"),),
                        (), (), hyper, "/unused")
    started = time.perf_counter()
    trained = minilm_train.run(TrainingData(examples, [1.0] * len(examples)), spec,
                               SilentControl(), seq_len=hyper.seq_len or DEFAULT_SEQ_LEN,
                               max_chunks=MAX_CHUNKS, batch_size=BATCH_SIZE, device=device)
    return trained, time.perf_counter() - started


def macro_f1(model: Any, test_rows: Rows) -> dict[str, float]:
    """The blended model's macro-F1, and each side's alone."""
    from sklearn.metrics import f1_score

    from service.factory.models.scoring import softmax

    texts, gold = [t for t, _ in test_rows], [y for _, y in test_rows]
    labels = model.heads[0].labels

    def score(p: Any) -> float:
        return round(float(f1_score(gold, [labels[i] for i in p.argmax(axis=1)],
                                    average="macro")), 4)

    (blended,) = model.predict_proba(texts)
    return {"macro_f1": score(blended),
            "encoder_only_macro_f1": score(softmax(model.encoder_logits(texts))),
            "ngram_only_macro_f1": score(model.ngram.predict_proba(texts)[0])}


def items_per_s(call: Callable[[list[str]], object], texts: Sequence[str], batch: int,
                seconds: float) -> float:
    call(list(texts[:batch]))
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for i in range(0, len(texts) - batch + 1, batch):
            call(list(texts[i:i + batch]))
            done += batch
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def plain_torch(trained: Any, seq_len: int) -> Callable[[list[str]], object]:
    """The fine-tuned weights in a plain transformers loop: tokenizer, BertModel, mean pooling,
    the head, softmax; float32, inference mode, each batch padded to its longest text."""
    import torch
    from tokenizers import Tokenizer

    network = trained.network.to("cpu").float().eval()
    tokenizer = Tokenizer.from_str(trained.model.tokenizer_json)
    tokenizer.enable_truncation(seq_len)
    tokenizer.enable_padding()

    def call(texts: list[str]) -> object:
        encodings = tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        with torch.inference_mode():
            return torch.softmax(network(ids, mask), dim=1).numpy()

    return call


def serving(trained: Any, texts: Sequence[str], seconds: float, n_latency: int,
            repetitions: int = 5) -> dict[str, Any]:
    """The three callables measured in turn, `repetitions` rounds of `seconds / repetitions`
    each (interleaved, so that a burst of load elsewhere hits all of them), medians reported."""
    model = trained.model
    calls = {"onnx_encoder": model.encoder_logits, "onnx_classify": model.classify,
             "plain_torch": plain_torch(trained, DEFAULT_SEQ_LEN)}
    runs: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repetitions):
        for name, call in calls.items():
            runs[name].append(items_per_s(call, texts, BATCH_SIZE, seconds / repetitions))
    out: dict[str, Any] = {"batch_size": BATCH_SIZE, "repetitions": repetitions}
    for name, values in runs.items():
        out[f"{name}_items_per_s"] = round(statistics.median(values), 1)
        out[f"{name}_items_per_s_runs"] = [round(v, 1) for v in values]
    out["speedup"] = round(out["onnx_classify_items_per_s"] / out["plain_torch_items_per_s"], 2)
    out["speedup_encoder"] = round(out["onnx_encoder_items_per_s"]
                                   / out["plain_torch_items_per_s"], 2)
    single = []
    for i in range(n_latency):
        started = time.perf_counter()
        model.classify([texts[i % len(texts)]])
        single.append((time.perf_counter() - started) * 1000)
    out["single_item_p50_ms"] = round(statistics.median(single), 2)
    out["single_item_p99_ms"] = round(float(np.percentile(single, 99)), 2)
    return out


def quantization(trained: Any, test_rows: Rows, seconds: float) -> dict[str, Any]:
    """The served int8 graph against a float32 export of the same network: agreement of the
    encoder's top label, largest probability difference, macro-F1 of each blend, items/s, size;
    `*_batch_max`: for 256 texts, the largest probability difference between each text scored
    alone and in its batch of 32, served one text per onnxruntime call (`MiniLMModel`) and, for
    int8, as the factory served it before (`batched_int8_batch_max`: length-sorted batches in
    one call, where dynamic quantisation scales a call's activations together)."""
    from service.factory.models.minilm_onnx import MiniLMModel, _pad, mean_by_owner
    from service.factory.models.minilm_train import export_onnx
    from service.factory.models.scoring import softmax

    int8 = trained.model
    fp32 = MiniLMModel(int8.heads, export_onnx(trained.network, quantize=False),
                       int8.tokenizer_json, int8.seq_len, int8.max_chunks, int8.weights,
                       int8.ngram, int8.kind)
    texts = [t for t, _ in test_rows]
    z8, z32 = int8.encoder_logits(texts), fp32.encoder_logits(texts)
    sample = texts[:256]

    def batch_max(logits: Any) -> float:
        batched = np.concatenate([logits(sample[i:i + BATCH_SIZE])
                                  for i in range(0, len(sample), BATCH_SIZE)])
        alone = np.concatenate([logits([t]) for t in sample])
        return round(float(np.abs(softmax(batched) - softmax(alone)).max()), 6)

    def one_call(texts: list[str]) -> Any:  # the whole batch in one call, as before
        sequences, owner = int8._chunker(texts)
        _, ids, mask = _pad(sequences, list(range(len(sequences))),
                            max(len(q) for q in sequences))
        (out,) = int8._session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        return mean_by_owner(out, owner, len(texts))

    return {
        "top_label_agreement": round(float((z8.argmax(axis=1) == z32.argmax(axis=1)).mean()), 4),
        "max_probability_difference": round(float(np.abs(softmax(z8) - softmax(z32)).max()), 4),
        "int8_macro_f1": macro_f1(int8, test_rows)["macro_f1"],
        "fp32_macro_f1": macro_f1(fp32, test_rows)["macro_f1"],
        "int8_items_per_s": round(items_per_s(int8.classify, texts, BATCH_SIZE, seconds), 1),
        "fp32_items_per_s": round(items_per_s(fp32.classify, texts, BATCH_SIZE, seconds), 1),
        "batched_int8_items_per_s": round(items_per_s(one_call, texts, BATCH_SIZE, seconds), 1),
        "int8_batch_max": batch_max(int8.encoder_logits),
        "fp32_batch_max": batch_max(fp32.encoder_logits),
        "batched_int8_batch_max": batch_max(one_call),
        "int8_bytes": len(int8.onnx_bytes), "fp32_bytes": len(fp32.onnx_bytes),
    }


def device_inference(trained: Any, texts: Sequence[str], device: str | None,
                     seconds: float, batch: int = 256) -> dict[str, Any]:
    """Batched inference with the fine-tuned network on the device it trained on (the GPU
    figure; on a CPU, torch's own): texts sorted by length, batches of `batch` padded to their
    longest, fp16 autocast on CUDA, items/s over `seconds`. The factory serves on the CPU (ONNX,
    `serving`); this is what a GPU gives the same weights."""
    import torch
    from tokenizers import Tokenizer

    from service.factory.models.minilm_train import pick_device

    dev = pick_device(device)
    network = trained.network.to(dev).eval()
    tokenizer = Tokenizer.from_str(trained.model.tokenizer_json)
    tokenizer.enable_truncation(DEFAULT_SEQ_LEN)
    tokenizer.enable_padding()
    ordered = sorted(texts, key=len)
    batches = []
    for i in range(0, len(ordered) - batch + 1, batch):
        encodings = tokenizer.encode_batch(ordered[i:i + batch])
        batches.append((torch.tensor([e.ids for e in encodings], device=dev),
                        torch.tensor([e.attention_mask for e in encodings], device=dev)))
    amp = dev.type == "cuda"

    def run(ids: Any, mask: Any) -> None:
        with torch.inference_mode(), torch.autocast(dev.type, torch.float16, enabled=amp):
            torch.softmax(network(ids, mask).float(), dim=1)

    run(*batches[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for ids, mask in batches:
            run(ids, mask)
            done += len(ids)
        if amp:
            torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - started
    trained.network.to("cpu")
    return {"device": str(dev),
            "name": torch.cuda.get_device_name(dev) if amp else "cpu",
            "batch_size": batch, "fp16": amp, "items_per_s": round(done / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--corpora", nargs="*", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--device", default=None,
                        help="where to train: cpu, cuda, cuda:N (default: CUDA when available)")
    args = parser.parse_args()
    seconds, n_latency = (10.0, 200) if args.quick else (25.0, 500)

    tweets = corpora.sentiment_tweets(limit=12_000)
    train_rows, test_rows = split(tweets, 2_000 / len(tweets), seed=0)
    train_rows = train_rows[:10_000]
    trained, train_s = fit(train_rows, device=args.device)
    result: dict[str, Any] = {
        "machine_cores": os.cpu_count(),
        "device": trained.model.info.get("device"),
        "train_10k": {
            "examples": len(train_rows),
            "mean_chars": round(sum(len(t) for t, _ in train_rows) / len(train_rows)),
            "seconds_mistral_example_100_steps": round(train_s, 1),
            "phases": {k: v for k, v in trained.model.info.items() if k.endswith("seconds")},
            "blend_weights": trained.model.weights,
            **macro_f1(trained.model, test_rows),
            "baseline_macro_f1": round(baseline(train_rows, test_rows), 4),
        },
        "device_inference": device_inference(trained, [t for t, _ in test_rows], args.device,
                                             seconds),
        "serving": serving(trained, [t for t, _ in test_rows], seconds, n_latency),
        "quantization": quantization(trained, test_rows, seconds),
        # The served path end to end: a factory process, a local-minilm job (few steps: the
        # serving cost does not depend on them), single texts and batches of 32 over HTTP.
        "http": http_figures(train_rows[:1_000], [t for t, _ in test_rows], n_latency,
                             base_model="local-minilm", batch_size=BATCH_SIZE,
                             hyperparameters={"training_steps": 10, "learning_rate": 4e-5}),
    }
    if not args.quick:
        accuracy: dict[str, Any] = {}
        for name in args.corpora:
            rows = CORPORA[name]()
            tr, te = split(rows, 0.2, seed=0)
            model, seconds_taken = fit(tr, device=args.device)
            accuracy[name] = {"train": len(tr), "test": len(te),
                              "train_seconds": round(seconds_taken, 1),
                              "blend_weights": model.model.weights,
                              **macro_f1(model.model, te),
                              "baseline_macro_f1": round(baseline(tr, te), 4)}
        result["accuracy"] = accuracy
    print(json.dumps(result))


if __name__ == "__main__":
    main()
