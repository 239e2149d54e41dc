"""How far an exported `local-minilm` model's scores are from the factory's (`service.export`).

Trains on 1,400 tweets (`sentiment_tweets`, 3 labels, 30 steps at 4e-5, `ngram_blend: false`),
exports it both ways and scores 600 held-out tweets, comparing with the factory's own
probabilities (`MiniLMModel.predict_proba`, the int8 graph, one call for all 600):
- `onnx`: the ONNX export through the scorer its KServe model server runs, in the same batch;
- `hf`: the Hugging Face export through transformers (float32), batches of 32 padded, truncated
  to `seq_len` (tweets are shorter: no chunking difference);
- `batch`: the factory itself, each text alone against all 600 in one request (the int8 graph
  quantises each onnxruntime call's activations with one scale, which is why the factory gives
  each text a call of its own: this must be 0);
- `blend`: the same model with the n-gram blend on (trained again with the default) against its
  encoder alone, what an export of a blended model serves.
Largest and mean absolute probability difference, top-label agreement, macro-F1.

    python -m bench.export_fidelity        # ~8 minutes on 2 shared cores

Measured (2 cores with AVX-512, 1 Dec 2026): onnx 0 difference; hf largest 0.176, mean 0.0142, top
label 98.0% (macro-F1 0.6644 vs the factory's 0.6563); batch 0 (before the factory gave each text
its own onnxruntime call, 30 Nov: largest 0.130, mean 0.0136); blend (weights 0.75/0.25) largest
0.254, mean 0.0375, 94.2% (0.6683 vs 0.6626). Training: 28 s a model (215 s in all on 30 Nov's
AVX2-only machine).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.factory.data import Example, TargetSpec
from service.factory.models.base import Hyperparameters, SilentControl, TrainingData, TrainingSpec
from service.factory.models.minilm import MiniLM
from service.factory.models.minilm_onnx import MiniLMModel
from service.factory.models.scoring import softmax
from tests.support import corpora
from tests.support.factory import split

F32 = npt.NDArray[np.float32]
LABELS = ("negative", "neutral", "positive")


def train(rows: list[tuple[str, str]], out: Path, blend: bool) -> float:
    examples = [Example(i, t, {"sentiment": y}) for i, (t, y) in enumerate(rows)]
    spec = TrainingSpec("local-minilm", "text",
                        (TargetSpec("sentiment", LABELS, "single_class"),), (), (),
                        Hyperparameters(training_steps=30, learning_rate=4e-5,
                                        ngram_blend=None if blend else False), str(out))
    started = time.monotonic()
    model, _ = MiniLM().train(TrainingData(examples, [1.0] * len(examples)), spec,
                              SilentControl())
    model.save(out)
    return time.monotonic() - started


def compare(a: F32, b: F32, truth: list[str]) -> dict[str, float]:
    y = np.asarray([LABELS.index(t) for t in truth])

    def f1(p: F32) -> float:
        pred = p.argmax(axis=1)
        scores = []
        for k in range(len(LABELS)):
            tp = float(((pred == k) & (y == k)).sum())
            denominator = float((pred == k).sum() + (y == k).sum())
            scores.append(2 * tp / denominator if denominator else 0.0)
        return round(float(np.mean(scores)), 4)

    return {"max_difference": round(float(np.abs(a - b).max()), 6),
            "mean_difference": round(float(np.abs(a - b).mean()), 6),
            "top_label_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4),
            "macro_f1_factory": f1(a), "macro_f1_other": f1(b)}


def main() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from service.export.kserve_model import ExportedModel
    from service.export.writer import export

    rows = corpora.sentiment_tweets(limit=2_000)
    train_rows, test_rows = split(rows, 0.3, seed=0)
    texts, truth = [t for t, _ in test_rows], [y for _, y in test_rows]
    result: dict[str, Any] = {"train": len(train_rows), "test": len(texts)}
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain"
        result["train_seconds"] = round(train(train_rows, plain, blend=False), 1)
        factory = MiniLMModel.load(plain)
        reference = factory.predict_proba(texts)[0]

        export(plain, "bench", "onnx", Path(tmp) / "onnx")
        onnx = ExportedModel(Path(tmp) / "onnx" / "sentiment").probabilities(texts)
        result["onnx"] = compare(reference, onnx, truth)

        export(plain, "bench", "hf", Path(tmp) / "hf")
        directory = Path(tmp) / "hf" / "sentiment"
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        logits = []
        with torch.inference_mode():
            for start in range(0, len(texts), 32):
                batch = tokenizer(texts[start:start + 32], padding=True, truncation=True,
                                  return_tensors="pt")
                logits.append(model(**batch).logits.numpy())
        result["hf"] = compare(reference, softmax(np.vstack(logits)), truth)

        single = np.vstack([factory.predict_proba([t])[0] for t in texts])
        result["batch"] = compare(reference, single, truth)

        blended = Path(tmp) / "blended"
        train(train_rows, blended, blend=True)
        model_b = MiniLMModel.load(blended)
        served = model_b.predict_proba(texts)[0]
        export(blended, "bench", "onnx", Path(tmp) / "onnx-b")
        alone = ExportedModel(Path(tmp) / "onnx-b" / "sentiment").probabilities(texts)
        result["blend"] = {"weights": model_b.weights, **compare(served, alone, truth)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
