"""The default base model: hashed word and character n-grams, and one linear head per target.

Why this model: it needs no downloaded weights (numpy only), trains 10k examples in seconds on two
cores, answers one item in well under a millisecond, and on topic, intent and sentiment data it
matches a TF-IDF + logistic regression baseline. It is served under the names of Mistral's
fine-tunable base models too, so Mistral's examples run unchanged.

Features. A text is lower-cased; its word unigrams and bigrams and its character 2..4-grams (over
UTF-8 bytes, spaces included) are hashed with a fixed polynomial hash (never Python's `hash`, which
changes per process) into `2**18` buckets. Each feature gets `(1 + log tf) * idf` (word features
`WORD_WEIGHT` times that), the idf measured on the training data, and the row is L2-normalised.
Everything is vectorised over a whole batch of texts, so batched inference costs a few numpy calls
per batch rather than per text.

Heads. Per target a weight matrix and a bias: softmax over its labels for `single_class` (scores
sum to 1), one independent sigmoid per label for `multi_class` (each score is that label's own
probability, so they need not sum to 1). Targets are trained jointly, each example contributing
only to the targets it labels, weighted by the target's `weight`.

Optimisation (how Mistral's hyperparameters keep their meaning).
- `training_steps`: the number of optimiser updates, each on a minibatch of `BATCH_SIZE` (256)
  examples, about Mistral's 131,072 tokens per step at 512 tokens per sequence. `epochs`, when
  given instead, is turned into steps (`ceil(epochs * n / 256)`). Neither: 3 epochs, at least 100
  steps.
- `learning_rate` is relative to Mistral's default `1e-4`: the Adam step size is
  `REFERENCE_LR * learning_rate / 1e-4` (0.1 at Mistral's default). A 3B-parameter model needs
  tiny rates; a linear model on normalised sparse features needs rates near 0.1, so the ratio is
  what carries over. Mistral's
  documented example (`training_steps: 100`, `learning_rate: 4e-5`) thus trains at 0.4x the
  reference rate, which gives a good model (the tests check one made exactly like it).
- `warmup_fraction`: linear warm-up over that fraction of the steps, then cosine decay to 10%.
- `weight_decay`: decoupled (AdamW), `w -= lr_t * weight_decay * w` on the rows a step touches
  (lazy, as for sparse embeddings; untouched hashed buckets are zero anyway).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

from service.factory.data import Example, TargetSpec

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

BASE_MODEL = "local-ngram"
#: Names accepted as `model` of a job and served by the same base model (Mistral's fine-tunable
#: classifier bases), so that Mistral's examples run unchanged.
BASE_ALIASES = ("ministral-3b-latest", "ministral-8b-latest", "mistral-small-latest")
BUCKET_BITS = 18
BATCH_SIZE = 256
REFERENCE_LR = 0.1
MISTRAL_DEFAULT_LR = 1e-4
CHAR_NGRAMS = (2, 3, 4)
WORD_WEIGHT = 6.0  # words carry topic and intent; character n-grams outnumber them 20:1
FORMAT_VERSION = 1

_P = np.uint64(0x100000001B3)  # FNV prime: odd, so invertible modulo 2**64
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_WORD_SALT = np.uint64(0x9E3779B97F4A7C15)
_BIGRAM_MUL = np.uint64(0xD6E8FEB86659FD93)
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_CHUNK_BYTES = 1 << 20


def _mix(h: U64, bits: int) -> I64:
    """splitmix64 finaliser, then the top `bits` bits: a well-spread bucket from any 64-bit hash."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * _MIX1
        h = h ^ (h >> np.uint64(27))
        h = h * _MIX2
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(64 - bits)).astype(np.int64)


@dataclass
class Csr:
    """A minimal CSR matrix: rows are texts, columns hashed buckets."""

    indptr: I64
    indices: I64
    data: F32

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    def take(self, rows: I64) -> Csr:
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        pos = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
        return Csr(indptr, self.indices[pos], self.data[pos])

    def row_ids(self) -> I64:
        return np.repeat(np.arange(self.rows, dtype=np.int64), np.diff(self.indptr))


def _counts(texts: Sequence[str], bits: int) -> tuple[I64, I64, F32]:
    """Hashed n-gram counts of `texts`: (row, bucket, count) sorted by row then bucket."""
    rows_out: list[I64] = []
    cols_out: list[I64] = []
    vals_out: list[F32] = []
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (size < _CHUNK_BYTES or end == start):
            size += len(texts[end]) + 2
            end += 1
        r, c, v = _counts_chunk(texts[start:end], bits)
        rows_out.append(r + start)
        cols_out.append(c)
        vals_out.append(v)
        start = end
    if not rows_out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(rows_out), np.concatenate(cols_out), np.concatenate(vals_out)


def _counts_chunk(texts: Sequence[str], bits: int) -> tuple[I64, I64, F32]:
    encoded = [(" " + " ".join(t.lower().split()) + " ").encode() for t in texts]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    raw = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    total = len(raw)
    doc = np.repeat(np.arange(len(encoded), dtype=np.int64), lengths)
    b = raw.astype(np.uint64) + np.uint64(1)
    keys: list[I64] = []
    shift = np.int64(bits + 1)  # key = doc | bucket | is_word: one sort groups all three
    with np.errstate(over="ignore"):
        # Character n-grams: h = sum_k b[s + k] * P**k, n shifted vector operations per n.
        for n in CHAR_NGRAMS:
            m = total - n + 1
            if m <= 0:
                continue
            h = b[:m].copy()
            power = np.uint64(1)
            for k in range(1, n):
                power = power * _P
                h += b[k:k + m] * power
            h += np.uint64(n) << np.uint64(56)
            ok = doc[:m] == doc[n - 1:n - 1 + m]
            keys.append(doc[:m][ok] << shift | _mix(h[ok], bits) << np.int64(1))
        # Words: runs of ASCII letters/digits or non-ASCII bytes, hashed through prefix sums.
        is_word = ((raw >= 48) & (raw <= 57)) | ((raw >= 97) & (raw <= 122)) | (raw >= 128)
        edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        if len(starts):
            powers = np.empty(total + 1, dtype=np.uint64)
            powers[0] = 1
            powers[1:] = _P
            np.cumprod(powers, out=powers)
            inv_powers = np.empty(total + 1, dtype=np.uint64)
            inv_powers[0] = 1
            inv_powers[1:] = _P_INV
            np.cumprod(inv_powers, out=inv_powers)
            prefix = np.zeros(total + 1, dtype=np.uint64)
            np.cumsum(b * powers[:total], out=prefix[1:])
            word_hash = (prefix[ends] - prefix[starts]) * inv_powers[starts] + _WORD_SALT
            word_doc = doc[starts]
            keys.append(word_doc << shift | _mix(word_hash, bits) << np.int64(1) | np.int64(1))
            same = word_doc[:-1] == word_doc[1:]
            bigram = word_hash[:-1][same] * _BIGRAM_MUL + word_hash[1:][same]
            keys.append(word_doc[:-1][same] << shift | _mix(bigram, bits) << np.int64(1)
                        | np.int64(1))
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    sorted_keys = np.sort(np.concatenate(keys))
    first = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    unique = sorted_keys[first]
    tf = np.diff(np.append(first, len(sorted_keys))).astype(np.float32)
    weight = np.where(unique & np.int64(1), np.float32(WORD_WEIGHT), np.float32(1.0))
    mask = np.int64((1 << bits) - 1)
    # A bucket may appear twice in a row (once from characters, once from words): harmless for a
    # linear model, which sums them.
    return (unique >> shift, (unique >> np.int64(1)) & mask,
            ((1.0 + np.log(tf)) * weight).astype(np.float32))


@dataclass
class Featurizer:
    """Texts -> L2-normalised sparse rows. `idf` is fitted on training data and saved with the
    model."""

    bits: int = BUCKET_BITS
    idf: F32 = field(default_factory=lambda: np.ones(1 << BUCKET_BITS, dtype=np.float32))

    @classmethod
    def fit(cls, texts: Sequence[str], bits: int = BUCKET_BITS) -> tuple[Featurizer, Csr]:
        rows, cols, vals = _counts(texts, bits)
        df = np.bincount(cols, minlength=1 << bits).astype(np.float64)
        n = max(len(texts), 1)
        idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        featurizer = cls(bits, idf)
        return featurizer, featurizer._finish(len(texts), rows, cols, vals)

    def transform(self, texts: Sequence[str]) -> Csr:
        rows, cols, vals = _counts(texts, self.bits)
        return self._finish(len(texts), rows, cols, vals)

    def _finish(self, n: int, rows: I64, cols: I64, vals: F32) -> Csr:
        vals = vals * self.idf.take(cols)
        norms = np.sqrt(np.bincount(rows, weights=vals * vals, minlength=n)).astype(np.float32)
        norms[norms == 0] = 1.0
        vals /= norms.take(rows)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return Csr(indptr, cols, vals)


@dataclass(frozen=True)
class Head:
    name: str
    labels: tuple[str, ...]
    loss_function: Literal["single_class", "multi_class"]
    weight: float = 1.0


def _sigmoid(z: F32) -> F32:
    out: F32 = (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
    return out


def _softmax(z: F32) -> F32:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: F32 = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass
class Classifier:
    """A trained model: featurizer, heads, and one weight matrix for all heads' labels.

    Weights are kept compact: only buckets seen in training have a row (`row_of[bucket]`, or the
    all-zero last row), so a model costs memory in proportion to its data, not to `2**18`.
    """

    featurizer: Featurizer
    heads: list[Head]
    row_of: npt.NDArray[np.int32]
    weights: F32  # (rows + 1, total labels); last row zero
    bias: F32  # (total labels,)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.info.get("kind", "text"))

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for head in self.heads:
            out.append(slice(start, start + len(head.labels)))
            start += len(head.labels)
        return out

    def logits(self, x: Csr) -> F32:
        rows = self.row_of.take(x.indices)
        contrib = self.weights.take(rows, axis=0)
        contrib *= x.data[:, None]
        z = np.zeros((x.rows, self.weights.shape[1]), dtype=np.float32)
        nonempty = np.flatnonzero(np.diff(x.indptr))
        if len(nonempty):
            z[nonempty] = np.add.reduceat(contrib, x.indptr[nonempty], axis=0)
        out: F32 = z + self.bias
        return out

    def predict_proba(self, texts: Sequence[str]) -> list[F32]:
        """One (n, labels) matrix per head."""
        z = self.logits(self.featurizer.transform(texts))
        return [
            _softmax(z[:, s]) if head.loss_function == "single_class" else _sigmoid(z[:, s])
            for head, s in zip(self.heads, self._slices(), strict=True)
        ]

    def classify(self, texts: Sequence[str]) -> list[dict[str, dict[str, float]]]:
        """Mistral's `results`: per text, per target, every label's score."""
        probs = self.predict_proba(texts)
        results: list[dict[str, dict[str, float]]] = [{} for _ in texts]
        for head, p in zip(self.heads, probs, strict=True):
            values = p.astype(np.float64).round(6).tolist()
            for i, row in enumerate(values):
                results[i][head.name] = dict(zip(head.labels, row, strict=True))
        return results

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        used = np.flatnonzero(self.row_of[:] < len(self.weights) - 1)
        np.savez(
            directory / "weights.npz",
            buckets=used.astype(np.int32), rows=self.row_of[used],
            weights=self.weights, bias=self.bias, idf=self.featurizer.idf,
        )
        meta = {
            "format": FORMAT_VERSION, "bits": self.featurizer.bits,
            "heads": [{"name": h.name, "labels": list(h.labels),
                       "loss_function": h.loss_function, "weight": h.weight} for h in self.heads],
            "info": self.info,
        }
        (directory / "model.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, directory: Path) -> Classifier:
        meta = orjson.loads((directory / "model.json").read_bytes())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{directory}: model format {meta.get('format')} is not "
                             f"{FORMAT_VERSION}; retrain the model")
        with np.load(directory / "weights.npz") as z:
            weights = z["weights"].astype(np.float32)
            row_of = np.full(1 << int(meta["bits"]), len(weights) - 1, dtype=np.int32)
            row_of[z["buckets"]] = z["rows"]
            featurizer = Featurizer(int(meta["bits"]), z["idf"].astype(np.float32))
            bias = z["bias"].astype(np.float32)
        heads = [Head(h["name"], tuple(h["labels"]), h["loss_function"], float(h["weight"]))
                 for h in meta["heads"]]
        return cls(featurizer, heads, row_of, weights, bias, dict(meta.get("info", {})))


@dataclass(frozen=True)
class Hyperparameters:
    training_steps: int | None = None
    learning_rate: float = MISTRAL_DEFAULT_LR
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    epochs: float | None = None
    batch_size: int = BATCH_SIZE
    seed: int = 0

    def steps_for(self, n: int) -> int:
        per_epoch = n / min(self.batch_size, max(n, 1))
        if self.training_steps is not None:
            return max(1, self.training_steps)
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * per_epoch))
        return max(100, math.ceil(3 * per_epoch))

    def lr_at(self, step: int, steps: int) -> float:
        """Step size at `step` (0-based): warm-up, then cosine decay to 10%."""
        peak = REFERENCE_LR * self.learning_rate / MISTRAL_DEFAULT_LR
        warmup = round(self.warmup_fraction * steps)
        if step < warmup:
            return peak * (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class Checkpoint:
    step_number: int
    train_loss: float
    valid_loss: float | None
    valid_accuracy: float | None
    created_at: int


@dataclass
class Evaluation:
    loss: float
    accuracy: float  # mean over targets
    targets: dict[str, dict[str, float]]  # name -> {accuracy, macro_f1, examples}


class _Targets:
    """Label matrices for the training loop: per head a (n, labels) 0/1 matrix and a row mask."""

    def __init__(self, heads: Sequence[Head], examples: Sequence[Example]) -> None:
        self.heads = heads
        self.y: list[F32] = []
        self.mask: list[F32] = []
        for head in heads:
            index = {label: i for i, label in enumerate(head.labels)}
            y = np.zeros((len(examples), len(head.labels)), dtype=np.float32)
            m = np.zeros(len(examples), dtype=np.float32)
            for row, example in enumerate(examples):
                value = example.labels.get(head.name)
                if value is None:
                    continue
                values = (value,) if isinstance(value, str) else value
                hits = [index[v] for v in values if v in index]
                if hits:
                    y[row, hits] = 1.0
                    m[row] = 1.0
            if head.loss_function == "single_class":
                # A list given for a single_class target: share the mass (rare; validation warns).
                sums = y.sum(axis=1, keepdims=True)
                y = np.divide(y, sums, out=np.zeros_like(y), where=sums > 0)
            self.y.append(y)
            self.mask.append(m)


def _loss_and_grad(heads: Sequence[Head], slices: Sequence[slice], z: F32, y: Sequence[F32],
                   mask: Sequence[F32]) -> tuple[float, F32]:
    """Weighted mean loss over heads and the gradient w.r.t. the logits."""
    grad = np.zeros_like(z)
    total = 0.0
    for head, s, yh, mh in zip(heads, slices, y, mask, strict=True):
        count = float(mh.sum())
        if count == 0:
            continue
        zh = z[:, s]
        if head.loss_function == "single_class":
            p = _softmax(zh)
            loss = -(yh * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
        else:
            p = _sigmoid(zh)
            loss = (np.logaddexp(0, zh) - yh * zh).sum(axis=1)
        total += head.weight * float((loss * mh).sum()) / count
        grad[:, s] = head.weight * (p - yh) * (mh / count)[:, None]
    return total, grad


def _head_predictions(head: Head, p: F32) -> npt.NDArray[np.bool_]:
    if head.loss_function == "single_class":
        out = np.zeros(p.shape, dtype=bool)
        out[np.arange(len(p)), p.argmax(axis=1)] = True
        return out
    return p >= 0.5


def evaluate(model: Classifier, x: Csr, targets: _Targets) -> Evaluation:
    z = model.logits(x)
    slices = model._slices()
    loss, _ = _loss_and_grad(model.heads, slices, z, targets.y, targets.mask)
    per_target: dict[str, dict[str, float]] = {}
    for head, s, y, m in zip(model.heads, slices, targets.y, targets.mask, strict=True):
        rows = m > 0
        if not rows.any():
            continue
        zh = z[rows][:, s]
        p = _softmax(zh) if head.loss_function == "single_class" else _sigmoid(zh)
        pred = _head_predictions(head, p)
        gold = y[rows] > 0
        accuracy = float((pred == gold).all(axis=1).mean())
        f1s = []
        for j in range(len(head.labels)):
            tp = float((pred[:, j] & gold[:, j]).sum())
            fp = float((pred[:, j] & ~gold[:, j]).sum())
            fn = float((~pred[:, j] & gold[:, j]).sum())
            if tp + fp + fn:
                f1s.append(2 * tp / (2 * tp + fp + fn))
        per_target[head.name] = {
            "accuracy": round(accuracy, 6),
            "macro_f1": round(float(np.mean(f1s)) if f1s else 0.0, 6),
            "examples": int(rows.sum()),
        }
    accuracy = float(np.mean([t["accuracy"] for t in per_target.values()])) if per_target else 0.0
    return Evaluation(loss, accuracy, per_target)


ProgressFn = Callable[[Checkpoint], None]


def train(
    examples: Sequence[Example],
    targets: Sequence[TargetSpec],
    hyper: Hyperparameters,
    *,
    validation: Sequence[Example] = (),
    example_weights: Sequence[float] | None = None,
    on_checkpoint: ProgressFn | None = None,
    checkpoints: int = 10,
    kind: str = "text",
) -> tuple[Classifier, Evaluation | None]:
    """Fit a classifier. `on_checkpoint` is called about `checkpoints` times with real losses."""
    started = time.monotonic()
    heads = [Head(t.name, tuple(t.labels), t.loss_function or "single_class", t.weight)
             for t in targets]
    featurizer, x = Featurizer.fit([e.text for e in examples])
    data = _Targets(heads, examples)
    n = x.rows
    labels_total = sum(len(h.labels) for h in heads)
    buckets = 1 << featurizer.bits
    w = np.zeros((buckets, labels_total), dtype=np.float32)
    m1 = np.zeros_like(w)
    m2 = np.zeros_like(w)
    b = np.zeros(labels_total, dtype=np.float32)
    bm1 = np.zeros_like(b)
    bm2 = np.zeros_like(b)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    steps = hyper.steps_for(n)
    batch = min(hyper.batch_size, n)
    rng = np.random.default_rng(hyper.seed)
    sample_w = (np.asarray(example_weights, dtype=np.float32) if example_weights is not None
                else np.ones(n, dtype=np.float32))
    slices: list[slice] = []
    start = 0
    for head in heads:
        slices.append(slice(start, start + len(head.labels)))
        start += len(head.labels)
    # Biases start at the label priors (log-odds for sigmoids), so that few steps go to learning
    # what the features say rather than how frequent each label is.
    for head, s, y, mk in zip(heads, slices, data.y, data.mask, strict=True):
        count = max(float(mk.sum()), 1.0)
        prior = np.clip((y * mk[:, None]).sum(axis=0) / count, 1e-3, 1 - 1e-3)
        b[s] = np.log(prior) if head.loss_function == "single_class" else np.log(prior / (1 - prior))
    seen = np.zeros(buckets, dtype=bool)
    seen[x.indices] = True
    x_valid = featurizer.transform([e.text for e in validation]) if validation else None
    valid_targets = _Targets(heads, validation) if validation else None
    every = max(1, steps // max(1, checkpoints))
    order = rng.permutation(n)
    cursor = 0
    losses: list[float] = []
    final_eval: Evaluation | None = None

    def snapshot() -> Classifier:
        used = np.flatnonzero(seen)
        row_of = np.full(buckets, len(used), dtype=np.int32)
        row_of[used] = np.arange(len(used), dtype=np.int32)
        weights = np.zeros((len(used) + 1, labels_total), dtype=np.float32)
        weights[:-1] = w[used]
        info = {"kind": kind, "examples": n, "steps": steps, "batch_size": batch,
                "train_seconds": round(time.monotonic() - started, 3)}
        return Classifier(featurizer, heads, row_of, weights, b.copy(), info)

    for step in range(steps):
        if cursor + batch > n:
            order = rng.permutation(n)
            cursor = 0
        rows = order[cursor:cursor + batch]
        cursor += batch
        xb = x.take(rows)
        row_ids = xb.row_ids()
        z = w.take(xb.indices, axis=0) * xb.data[:, None]  # (nnz, labels)
        logits = np.zeros((len(rows), labels_total), dtype=np.float32)
        nonempty = np.flatnonzero(np.diff(xb.indptr))
        if len(nonempty):
            logits[nonempty] = np.add.reduceat(z, xb.indptr[nonempty], axis=0)
        logits += b
        loss, grad = _loss_and_grad(heads, slices, logits, [y[rows] for y in data.y],
                                    [mk[rows] * sample_w[rows] for mk in data.mask])
        losses.append(loss)
        touched = np.flatnonzero(np.bincount(xb.indices, minlength=buckets))
        lr = hyper.lr_at(step, steps)
        bc1 = 1 - beta1 ** (step + 1)
        bc2 = 1 - beta2 ** (step + 1)
        g_rows = grad[row_ids] * xb.data[:, None]  # (nnz, labels)
        gw = np.empty((len(touched), labels_total), dtype=np.float32)
        for j in range(labels_total):
            gw[:, j] = np.bincount(xb.indices, weights=g_rows[:, j], minlength=buckets)[touched]
        m1t = m1.take(touched, axis=0)
        m1t *= beta1
        m1t += (1 - beta1) * gw
        m2t = m2.take(touched, axis=0)
        m2t *= beta2
        gw *= gw
        gw *= 1 - beta2
        m2t += gw
        wt = w.take(touched, axis=0)
        wt *= 1 - lr * hyper.weight_decay
        denom = np.sqrt(m2t * (1 / bc2))
        denom += eps
        wt -= (lr / bc1) * m1t / denom
        w[touched], m1[touched], m2[touched] = wt, m1t, m2t
        gb = grad.sum(axis=0)
        bm1 = beta1 * bm1 + (1 - beta1) * gb
        bm2 = beta2 * bm2 + (1 - beta2) * gb * gb
        b = (b - lr * (bm1 / bc1) / (np.sqrt(bm2 / bc2) + eps)).astype(np.float32)
        if (step + 1) % every == 0 or step + 1 == steps:
            valid_loss = valid_acc = None
            if x_valid is not None and valid_targets is not None:
                final_eval = evaluate(snapshot(), x_valid, valid_targets)
                valid_loss, valid_acc = final_eval.loss, final_eval.accuracy
            if on_checkpoint is not None:
                on_checkpoint(Checkpoint(step + 1, float(np.mean(losses)), valid_loss, valid_acc,
                                         int(time.time())))
            losses = []
    model = snapshot()
    return model, final_eval


def classification_scores(model: Classifier, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Mistral's `results` entries: `{target: {"scores": {label: p}}}` per text."""
    return [{name: {"scores": scores} for name, scores in result.items()}
            for result in model.classify(texts)]


def label_targets(examples: Sequence[Example]) -> Mapping[str, list[str]]:
    """Gold labels per target (for callers computing their own metrics)."""
    out: dict[str, list[str]] = {}
    for example in examples:
        for name, value in example.labels.items():
            out.setdefault(name, []).append(value if isinstance(value, str) else value[0])
    return out
