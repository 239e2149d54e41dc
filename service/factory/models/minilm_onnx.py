"""Serving a fine-tuned `local-minilm` model: onnxruntime + `tokenizers` + numpy, no torch.

A model directory holds `model.json`, `encoder.onnx` (MiniLM + mean pooling + every head's
linear layer: `(sequences, total labels)` logits), `tokenizer.json` (copied from the base model,
so a serving factory needs neither the weights package nor transformers) and `ngram/`, the
`local-ngram` model fitted on the same data. Scores are the per-head blend

    z = encoder_weight * mean_over_chunks(encoder logits) + ngram_weight * ngram log-evidence

(log-probabilities for `single_class`, log-odds for `multi_class`), then softmax or sigmoid; the
two weights were chosen on held-out data at training time (see `minilm_train`).

Long inputs are cut into chunks of `seq_len` tokens ([CLS] ... [SEP]), at most `max_chunks` of
them; a text's encoder logits are the mean of its chunks' logits, which, the heads being linear,
is the head applied to the mean of the chunk embeddings. Sequences are sorted by length and run in
batches padded to their own longest member: on short texts of mixed lengths this alone cuts the
padded tokens by ~1.5x against padding a request's batch to its longest text.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from service.factory.models.base import Head, ModelFormatError, Scores

if TYPE_CHECKING:
    from service.factory.models.ngram import NGramModel

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

NAME = "local-minilm"
FORMAT = 1
ONNX_FILE = "encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
NGRAM_DIR = "ngram"
#: Sequences per onnxruntime call and padded tokens per call: bounded so that a long batch of long
#: documents does not build one huge activation tensor.
RUN_SEQUENCES = 64
RUN_TOKENS = 8192
#: The log-evidence of a probability is clipped here (log(1e-6) = -13.8): an n-gram model sure
#: of a label cannot veto the encoder with an unbounded term.
PROB_FLOOR = 1e-6
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


def softmax(z: F32) -> F32:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: F32 = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def sigmoid(z: F32) -> F32:
    out: F32 = (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
    return out


def slices(heads: Sequence[Head]) -> list[slice]:
    out, start = [], 0
    for head in heads:
        out.append(slice(start, start + len(head.labels)))
        start += len(head.labels)
    return out


def evidence(head: Head, p: F32) -> F32:
    """A head's probabilities as additive evidence: log p (softmax) or log-odds (sigmoid)."""
    q = np.clip(p.astype(np.float32), PROB_FLOOR, 1.0 - PROB_FLOOR)
    out: F32 = np.log(q) if head.loss_function == "single_class" else np.log(q / (1.0 - q))
    return out


def blend(head: Head, encoder_logits: F32, ngram_evidence: F32 | None,
          weights: tuple[float, float]) -> F32:
    """Probabilities of one head from the encoder's logits and the n-gram model's evidence."""
    z = weights[0] * encoder_logits
    if ngram_evidence is not None and weights[1]:
        z = z + weights[1] * ngram_evidence
    return softmax(z) if head.loss_function == "single_class" else sigmoid(z)


class Chunker:
    """Texts -> token id sequences of at most `seq_len` ([CLS] + pieces + [SEP]), at most
    `max_chunks` per text, with `owner[i]` the text of sequence `i`."""

    def __init__(self, tokenizer_json: str, seq_len: int, max_chunks: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.seq_len = seq_len
        self.max_chunks = max_chunks
        # ~1 token per 3 characters at worst (digits, symbols): what is cut here is never read.
        self.max_chars = (seq_len - 2) * max_chunks * 6

    def __call__(self, texts: Sequence[str]) -> tuple[list[list[int]], I64]:
        encodings = self.tokenizer.encode_batch(
            [t[:self.max_chars] for t in texts], add_special_tokens=False)
        width = self.seq_len - 2
        sequences: list[list[int]] = []
        owner: list[int] = []
        for i, encoding in enumerate(encodings):
            ids = encoding.ids
            count = max(1, min(self.max_chunks, -(-len(ids) // width)))
            for c in range(count):
                sequences.append([CLS_ID, *ids[c * width:(c + 1) * width], SEP_ID])
                owner.append(i)
        return sequences, np.asarray(owner, dtype=np.int64)


def padded_batches(sequences: Sequence[Sequence[int]], max_sequences: int,
                   max_tokens: int) -> list[tuple[I64, I64, I64]]:
    """`(rows, input_ids, attention_mask)` batches over `sequences` sorted by length, each
    padded to its own longest sequence."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[tuple[I64, I64, I64]] = []
    start = 0
    while start < len(order):
        end = start + 1
        while (end < len(order) and end - start < max_sequences
               and (end - start + 1) * len(sequences[order[end]]) <= max_tokens):
            end += 1
        rows = np.asarray(order[start:end], dtype=np.int64)
        width = len(sequences[order[end - 1]])
        ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            ids[r, :len(sequences[i])] = sequences[i]
            mask[r, :len(sequences[i])] = 1
        out.append((rows, ids, mask))
        start = end
    return out


def mean_by_owner(values: F32, owner: I64, count: int) -> F32:
    sums = np.zeros((count, values.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, values)
    per = np.bincount(owner, minlength=count).astype(np.float64)
    out: F32 = (sums / np.maximum(per, 1)[:, None]).astype(np.float32)
    return out


def session(onnx_bytes: bytes, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


@dataclass
class MiniLMModel:
    """A fine-tuned `local-minilm` model, ready to serve (and to save)."""

    heads: Sequence[Head]
    onnx_bytes: bytes
    tokenizer_json: str
    seq_len: int
    max_chunks: int
    #: Per head: (encoder weight, n-gram weight).
    weights: list[tuple[float, float]]
    ngram: NGramModel | None = None
    kind: str = "text"
    info: dict[str, Any] = field(default_factory=dict)
    _session: Any = None
    _chunker: Chunker | None = None

    @property
    def inline(self) -> bool:
        """Milliseconds a text: never on the event loop."""
        return False

    def __post_init__(self) -> None:
        self._session = session(self.onnx_bytes)
        self._chunker = Chunker(self.tokenizer_json, self.seq_len, self.max_chunks)

    def encoder_logits(self, texts: Sequence[str]) -> F32:
        """(n, total labels): each text's mean chunk logits."""
        assert self._chunker is not None
        labels = sum(len(h.labels) for h in self.heads)
        if not texts:
            return np.zeros((0, labels), dtype=np.float32)
        sequences, owner = self._chunker(texts)
        logits = np.zeros((len(sequences), labels), dtype=np.float32)
        for rows, ids, mask in padded_batches(sequences, RUN_SEQUENCES, RUN_TOKENS):
            (out,) = self._session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
            logits[rows] = out
        return mean_by_owner(logits, owner, len(texts))

    def ngram_evidence(self, texts: Sequence[str]) -> list[F32] | None:
        if self.ngram is None or not any(w[1] for w in self.weights):
            return None
        probs = self.ngram.predict_proba(texts)
        return [evidence(h, p) for h, p in zip(self.heads, probs, strict=True)]

    def predict_proba(self, texts: Sequence[str]) -> list[F32]:
        """One (n, labels) probability matrix per head, in head order."""
        texts = list(texts)
        z = self.encoder_logits(texts)
        ev = self.ngram_evidence(texts)
        return [blend(h, z[:, s], None if ev is None else ev[k], self.weights[k])
                for k, (h, s) in enumerate(zip(self.heads, slices(self.heads), strict=True))]

    def classify(self, texts: Sequence[str]) -> list[Scores]:
        results: list[Scores] = [{} for _ in texts]
        for head, p in zip(self.heads, self.predict_proba(texts), strict=True):
            for i, row in enumerate(p.astype(np.float64).round(6).tolist()):
                results[i][head.name] = dict(zip(head.labels, row, strict=True))
        return results

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ONNX_FILE).write_bytes(self.onnx_bytes)
        (directory / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")
        if self.ngram is not None:
            self.ngram.save(directory / NGRAM_DIR)
        meta = {"format": FORMAT, "base_model": NAME, "kind": self.kind,
                "seq_len": self.seq_len, "max_chunks": self.max_chunks,
                "weights": [list(w) for w in self.weights], "ngram": self.ngram is not None,
                "heads": [{"name": h.name, "labels": list(h.labels),
                           "loss_function": h.loss_function, "weight": h.weight}
                          for h in self.heads],
                "info": self.info}
        (directory / "model.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, directory: Path) -> MiniLMModel:
        try:
            meta = orjson.loads((directory / "model.json").read_bytes())
            if meta.get("format") != FORMAT or meta.get("base_model") != NAME:
                raise ModelFormatError(f"{directory}: not a {NAME} model of format {FORMAT} "
                                       f"(found {meta.get('base_model')!r} format "
                                       f"{meta.get('format')!r}); train the model again")
            heads = [Head(h["name"], tuple(h["labels"]), h["loss_function"], float(h["weight"]))
                     for h in meta["heads"]]
            weights = [(float(a), float(b)) for a, b in meta["weights"]]
            onnx_bytes = (directory / ONNX_FILE).read_bytes()
            tokenizer_json = (directory / TOKENIZER_FILE).read_text(encoding="utf-8")
            ngram: NGramModel | None = None
            if meta.get("ngram"):
                from service.factory.models.ngram import NGramModel

                ngram = NGramModel.load(directory / NGRAM_DIR)
            if len(weights) != len(heads):
                raise ValueError(f"{len(weights)} blend weights for {len(heads)} heads")
            model = cls(heads, onnx_bytes, tokenizer_json, int(meta["seq_len"]),
                        int(meta["max_chunks"]), weights, ngram, str(meta.get("kind", "text")),
                        dict(meta.get("info", {})))
        except ModelFormatError:
            raise
        except Exception as exc:  # onnxruntime and tokenizers raise their own types
            raise ModelFormatError(f"{directory}: the {NAME} model cannot be read "
                                   f"({type(exc).__name__}: {exc}); train it again") from None
        outputs = model._session.get_outputs()
        labels = sum(len(h.labels) for h in heads)
        if outputs[0].shape[-1] not in (labels, None) and not isinstance(outputs[0].shape[-1],
                                                                          str):
            raise ModelFormatError(f"{directory}: {ONNX_FILE} has {outputs[0].shape[-1]} "
                                   f"outputs for {labels} labels; train the model again")
        return model


def serving_available() -> str | None:
    """`None` when onnxruntime and tokenizers import, else what is missing."""
    missing = [m for m in ("onnxruntime", "tokenizers") if importlib.util.find_spec(m) is None]
    return ", ".join(missing) or None
