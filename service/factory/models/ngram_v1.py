"""Models written by the first `local-ngram` (format 1, before base models had names): they still
load and serve, unchanged.

That model hashed word uni/bigrams and character 2..4-grams of the UTF-8 bytes into `2**18`
buckets with `(1 + log tf) * idf` weights (word features x6), one L2-normalised row per text, and
one linear head per target trained by minibatch AdamW. Only its inference half lives here; new
jobs train the current `local-ngram` (`service.factory.models.ngram`). Retraining such a model
gives a better one: the old trainer lost to a TF-IDF + logistic regression baseline by up to 0.12
macro-F1 with Mistral's example job.

The hashing arithmetic is ngram_features.py's (`mix`, `span_hashes`, `bigram_hashes`, the FNV
prime `P`): the same functions, not a copy, and frozen there for the same reason (the current
format's vocabulary is made of those hashes too). What stays here is what differs and must stay
as it was for this format's features to be byte-identical: UTF-8 bytes rather than code points,
character 2..4-grams across word boundaries rather than `char_wb` 2..5-grams, words as runs of
ASCII letters and digits or non-ASCII bytes, and buckets as the top 18 bits of a hash.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from service.factory.models.base import Head, ModelFormatError, Scores
from service.factory.models.ngram_features import P, bigram_hashes, mix, span_hashes
from service.factory.models.scoring import labelled, probabilities

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

BUCKET_BITS = 18
CHAR_NGRAMS = (2, 3, 4)
WORD_WEIGHT = 6.0  # words carry topic and intent; character n-grams outnumber them 20:1
FORMAT_VERSION = 1

_CHUNK_BYTES = 1 << 20


def _mix(h: U64, bits: int) -> I64:
    """splitmix64 finaliser, then the top `bits` bits: a well-spread bucket from any 64-bit hash."""
    return (mix(h) >> np.uint64(64 - bits)).astype(np.int64)


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
                power = power * P
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
            word_hash = span_hashes(b, starts, ends)
            word_doc = doc[starts]
            keys.append(word_doc << shift | _mix(word_hash, bits) << np.int64(1) | np.int64(1))
            same = word_doc[:-1] == word_doc[1:]
            bigram = bigram_hashes(word_hash[:-1][same], word_hash[1:][same])
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


@dataclass
class LegacyNGramModel:
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
    inline: bool = True

    @property
    def kind(self) -> str:
        return str(self.info.get("kind", "text"))

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
        return probabilities(self.heads, self.logits(self.featurizer.transform(texts)))

    def classify(self, texts: Sequence[str]) -> list[Scores]:
        """Mistral's `results`: per text, per target, every label's score."""
        return labelled(self.heads, self.predict_proba(texts), len(texts))

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
    def load(cls, directory: Path) -> LegacyNGramModel:
        try:
            meta = orjson.loads((directory / "model.json").read_bytes())
            if meta.get("format") != FORMAT_VERSION:
                raise ModelFormatError(f"{directory}: model format {meta.get('format')!r} is not "
                                       f"{FORMAT_VERSION}; train the model again")
            with np.load(directory / "weights.npz") as z:
                weights = z["weights"].astype(np.float32)
                row_of = np.full(1 << int(meta["bits"]), len(weights) - 1, dtype=np.int32)
                row_of[z["buckets"]] = z["rows"]
                featurizer = Featurizer(int(meta["bits"]), z["idf"].astype(np.float32))
                bias = z["bias"].astype(np.float32)
            heads = [Head(h["name"], tuple(h["labels"]), h["loss_function"], float(h["weight"]))
                     for h in meta["heads"]]
        except ModelFormatError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as exc:
            raise ModelFormatError(f"{directory}: the model cannot be read "
                                   f"({type(exc).__name__}: {exc}); train it again") from None
        return cls(featurizer, heads, row_of, weights, bias, dict(meta.get("info", {})))
