"""Texts -> sparse TF-IDF rows, the features of the `local-ngram` model, vectorised in numpy.

The features are exactly those of the usual strong linear baseline for text classification,
scikit-learn's `make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))`:
- a word block: lower-cased tokens of two or more word characters (`(?u)\\b\\w\\w+\\b`),
  unigrams and bigrams;
- a character block: 2..5-grams of code points inside each whitespace-separated word padded with
  one space on each side (`char_wb`), punctuation included;
- per block `(1 + log tf) * idf` with the smoothed idf `ln((1 + n) / (1 + df)) + 1` fitted on
  the training texts, n-grams unseen in training ignored, each block L2-normalised on its own.

Why not scikit-learn's vectorizers themselves: they tokenise in Python, one text at a time.
Measured here (2 cores, 10,000 BBC paragraphs of 480 characters) they fit in 17.9 s and transform
765 texts/s, far from the model's 5,000 items/s target. This module computes the same n-grams for
a whole batch with a handful of numpy operations over code points, each n-gram identified by a
64-bit polynomial hash (never Python's `hash`, which changes per process): the vocabulary is the
sorted array of the hashes seen in training (8 bytes per n-gram, no string dictionary), found
again with one `searchsorted`. At 64 bits, two n-grams of a training set share a hash with
probability ~1e-8: the features are the baseline's, and so is the model's optimum.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

CHAR_NGRAMS = (2, 3, 4, 5)

P = np.uint64(0x100000001B3)  # FNV prime: odd, so invertible modulo 2**64
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_WORD_SALT = np.uint64(0x9E3779B97F4A7C15)
_BIGRAM_MUL = np.uint64(0xD6E8FEB86659FD93)
_P_INV = np.uint64(pow(int(P), -1, 1 << 64))
_SPACE = 32
#: Texts are hashed in chunks of about this many characters, which bounds the temporary arrays
#: (a few dozen bytes of numpy per character) whatever the batch size.
_CHUNK_CHARS = 1 << 19
#: Document ids and vocabulary ids share one int64 sort key: `doc << _ID_BITS | id`.
_ID_BITS = 32


def mix(h: U64) -> U64:
    """splitmix64 finaliser: well-spread 64-bit keys from polynomial hashes.

    Shared with the first format's loader (ngram_v1.py), like `span_hashes` and `bigram_hashes`:
    saved models of both formats hold these hashes (this format's vocabulary is the sorted hashes
    seen in training, the first's weights are indexed by their top bits), so neither the
    constants nor the arithmetic may ever change."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * _MIX1
        h = h ^ (h >> np.uint64(27))
        h = h * _MIX2
        h = h ^ (h >> np.uint64(31))
    return h


def span_hashes(b: U64, starts: I64, ends: I64) -> U64:
    """The polynomial hash `sum_k b[s + k] * P**k` (plus a salt, so that a word never hashes as
    the character n-gram of the same symbols) of each span `b[start:end]`, from prefix sums:
    one pass over `b` for any number of words. `b` is the symbols plus one (0 never appears)."""
    total = len(b)
    with np.errstate(over="ignore"):
        powers = np.empty(total + 1, dtype=np.uint64)
        powers[0] = 1
        powers[1:] = P
        np.cumprod(powers, out=powers)
        inv_powers = np.empty(total + 1, dtype=np.uint64)
        inv_powers[0] = 1
        inv_powers[1:] = _P_INV
        np.cumprod(inv_powers, out=inv_powers)
        prefix = np.zeros(total + 1, dtype=np.uint64)
        np.cumsum(b * powers[:total], out=prefix[1:])
        out: U64 = (prefix[ends] - prefix[starts]) * inv_powers[starts] + _WORD_SALT
    return out


def bigram_hashes(first: U64, second: U64) -> U64:
    """The hash of each pair of consecutive words, from the words' `span_hashes` (unmixed)."""
    with np.errstate(over="ignore"):
        out: U64 = first * _BIGRAM_MUL + second
    return out


@functools.cache
def _bmp_word_table() -> npt.NDArray[np.bool_]:
    """`\\w` for every code point of the Basic Multilingual Plane (65,536 checks, ~10 ms once)."""
    return np.fromiter((chr(c).isalnum() or c == 95 for c in range(1 << 16)), dtype=bool,
                       count=1 << 16)


def _word_chars(codes: npt.NDArray[np.uint32]) -> npt.NDArray[np.bool_]:
    """Python's `\\w` per code point: letters, digits (any script) and '_'."""
    table = _bmp_word_table()
    out: npt.NDArray[np.bool_] = table[np.minimum(codes, 0xFFFF)]
    beyond = np.flatnonzero(codes > 0xFFFF)  # emoji and rarer scripts: ask Python
    if len(beyond):
        out[beyond] = [chr(c).isalnum() for c in codes[beyond].tolist()]
    return out


def _hashes(texts: Sequence[str]) -> tuple[tuple[I64, U64], tuple[I64, U64]]:
    """(word block, char block) n-grams of a chunk of texts, each as (doc, 64-bit hash) with
    repeats (one entry per occurrence)."""
    normalised = [" " + " ".join(t.lower().split()) + " " for t in texts]
    lengths = np.fromiter((len(t) for t in normalised), dtype=np.int64, count=len(normalised))
    codes = np.frombuffer("".join(normalised).encode("utf-32-le"), dtype=np.uint32)
    total = len(codes)
    doc = np.repeat(np.arange(len(normalised), dtype=np.int64), lengths)
    b = codes.astype(np.uint64) + np.uint64(1)
    space = codes == _SPACE
    char_docs: list[I64] = []
    char_hashes: list[U64] = []
    word_docs: list[I64] = []
    word_keys: list[U64] = []
    with np.errstate(over="ignore"):
        # Character n-grams inside " word ": a window is kept when none of its interior code
        # points is a space (texts start and end with a space and words are joined by one, so
        # such a window never spans two words). The hash of an n-gram extends the (n-1)-gram's:
        # h_n = h_{n-1} + b[s + n - 1] * P**(n-1).
        interior_space = np.zeros(total, dtype=bool)
        h = b.copy()
        power = np.uint64(1)
        for n in range(2, max(CHAR_NGRAMS) + 1):
            m = total - n + 1
            if m <= 0:
                break
            power = power * P
            h = h[:m] + b[n - 1:n - 1 + m] * power
            if n >= 3:
                interior_space[:m] |= space[n - 2:n - 2 + m]
            if n not in CHAR_NGRAMS:
                continue
            ok = ~interior_space[:m]
            if n == 2:  # "  ": where one text ends and the next begins, or an empty text
                ok &= ~(space[:m] & space[1:1 + m])
            char_docs.append(doc[:m][ok])
            char_hashes.append(mix(h[ok] + (np.uint64(n) << np.uint64(56))))
        # Words: runs of two or more word characters, hashed through prefix sums; bigrams of
        # consecutive words of one text.
        is_word = _word_chars(codes)
        edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        long_enough = ends - starts >= 2
        starts, ends = starts[long_enough], ends[long_enough]
        if len(starts):
            word_hash = span_hashes(b, starts, ends)
            word_doc = doc[starts]
            word_docs.append(word_doc)
            word_keys.append(mix(word_hash))
            same = word_doc[:-1] == word_doc[1:]
            word_docs.append(word_doc[:-1][same])
            word_keys.append(mix(bigram_hashes(word_hash[:-1][same], word_hash[1:][same])))

    def join(docs: list[I64], hashes: list[U64]) -> tuple[I64, U64]:
        if not docs:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return np.concatenate(docs), np.concatenate(hashes)

    return join(word_docs, word_keys), join(char_docs, char_hashes)


def _all_hashes(texts: Sequence[str], pool: concurrent.futures.Executor | None = None
                ) -> tuple[tuple[I64, U64], tuple[I64, U64]]:
    """`_hashes` over chunks of `texts`, on `pool`'s threads when given (numpy releases the
    GIL: 10k BBC paragraphs hash in 0.55 s on two threads against 0.71 s on one, warm)."""
    chunks: list[Sequence[str]] = []
    offsets: list[int] = []
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (size < _CHUNK_CHARS or end == start):
            size += len(texts[end]) + 2
            end += 1
        chunks.append(texts[start:end])
        offsets.append(start)
        start = end
    parts = list(pool.map(_hashes, chunks) if pool is not None and len(chunks) > 1
                 else map(_hashes, chunks))

    def block(i: int) -> tuple[I64, U64]:
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        return (np.concatenate([p[i][0] + o for p, o in zip(parts, offsets, strict=True)]),
                np.concatenate([p[i][1] for p in parts]))

    return block(0), block(1)


def _term_frequencies(docs: I64, ids: I64) -> tuple[I64, I64, F32]:
    """(doc, id) occurrences -> distinct (doc, id) with `1 + log tf`, sorted by doc then id."""
    if not len(docs):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    keys = np.sort(docs << np.int64(_ID_BITS) | ids)
    first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    unique = keys[first]
    tf = np.diff(np.append(first, len(keys))).astype(np.float32)
    sublinear: F32 = (1.0 + np.log(tf)).astype(np.float32)
    return unique >> np.int64(_ID_BITS), unique & np.int64((1 << _ID_BITS) - 1), sublinear


@dataclass
class Block:
    """One block's vocabulary: the sorted n-gram hashes seen in training, the column of each
    (columns are numbered by decreasing document frequency, so that the weights of common n-grams
    sit together in memory: the solver's sparse products read them far more often), and the idf
    of each column."""

    vocabulary: U64
    columns: I64
    idf: F32

    def __post_init__(self) -> None:
        # An open-addressing hash table over the sorted hashes (load <= 0.5, linear probing, 0
        # marks an empty slot): one random read finds most n-grams. Measured on 2,560 BBC
        # paragraphs in batches of 128 against a 400k-n-gram vocabulary: `searchsorted` 0.72 s,
        # a radix index over the top bits 0.28 s, this table 0.21 s.
        self._bits = max(1, int(np.ceil(np.log2(max(len(self.vocabulary), 1)))) + 1)
        size = 1 << self._bits
        # Key and position side by side: one cache line per probe.
        self._table = np.zeros((size, 2), dtype=np.uint64)
        # The same memory as one 16-byte item per slot: numpy gathers those in one pass.
        self._slots = self._table.view(np.complex128).reshape(size)
        shift = np.uint64(64 - self._bits)
        pending = np.flatnonzero(self.vocabulary != 0)  # a zero hash (p ~ 2**-64) is never found
        slots = (self.vocabulary[pending] >> shift).astype(np.int64)
        while len(pending):
            free = self._table[slots, 0] == 0
            taken, first = np.unique(slots[free], return_index=True)
            winners = pending[free][first]
            self._table[taken, 0] = self.vocabulary[winners]
            self._table[taken, 1] = winners
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.flatnonzero(free)[first]] = True
            pending, slots = pending[~placed], (slots[~placed] + 1) & (size - 1)

    @classmethod
    def fit(cls, docs: I64, hashes: U64, n: int) -> tuple[Block, tuple[I64, I64, F32]]:
        # A plain sort, then the radix-index lookup: 2x faster than `unique(return_inverse=True)`
        # (an argsort) on the 20M n-gram occurrences of 10k paragraphs.
        vocabulary = np.unique(hashes).astype(np.uint64)
        identity = np.arange(len(vocabulary), dtype=np.int64)
        ids = cls(vocabulary, identity, np.ones(len(vocabulary), np.float32)).find(hashes)
        rows, positions, tf = _term_frequencies(docs, ids)
        df = np.bincount(positions, minlength=len(vocabulary))
        order = np.argsort(-df, kind="stable")  # column -> position in the sorted vocabulary
        columns = np.empty(len(vocabulary), dtype=np.int64)
        columns[order] = np.arange(len(vocabulary), dtype=np.int64)
        idf = (np.log((1.0 + n) / (1.0 + df[order].astype(np.float64))) + 1.0).astype(np.float32)
        block = cls(vocabulary, columns, idf)
        return block, (rows, columns.take(positions), tf)

    def find(self, hashes: U64) -> I64:
        """Positions of `hashes` in the vocabulary, -1 for n-grams unseen in training."""
        found = np.full(len(hashes), -1, dtype=np.int64)
        if not len(self.vocabulary) or not len(hashes):
            return found
        mask = (1 << self._bits) - 1
        slots = (hashes >> np.uint64(64 - self._bits)).astype(np.int64)
        pending = np.arange(len(hashes))
        while len(pending):
            rows = self._slots[slots].view(np.uint64)
            keys = rows[0::2]
            hit = keys == hashes[pending]
            found[pending[hit]] = rows[1::2][hit].astype(np.int64)
            more = ~hit & (keys != 0)  # an occupied slot of another n-gram: probe the next
            pending, slots = pending[more], (slots[more] + 1) & mask
        return found

    def lookup(self, docs: I64, hashes: U64) -> tuple[I64, I64, F32]:
        positions = self.find(hashes)
        known = positions >= 0  # n-grams unseen in training are ignored
        return _term_frequencies(docs[known], self.columns.take(positions[known]))


@dataclass
class Featurizer:
    """The fitted vocabulary and idf of both blocks. `transform` gives an
    `(n, len(words) + len(chars))` float32 CSR matrix, word columns first, each block of a row
    of norm 1 (or empty)."""

    words: Block
    chars: Block

    @property
    def columns(self) -> int:
        return len(self.words.vocabulary) + len(self.chars.vocabulary)

    @classmethod
    def fit(cls, texts: Sequence[str], pool: concurrent.futures.Executor | None = None
            ) -> tuple[Featurizer, sp.csr_matrix]:
        (word_docs, word_hashes), (char_docs, char_hashes) = _all_hashes(texts, pool)
        n = max(len(texts), 1)
        words, word_counts = Block.fit(word_docs, word_hashes, n)
        chars, char_counts = Block.fit(char_docs, char_hashes, n)
        featurizer = cls(words, chars)
        return featurizer, featurizer._finish(len(texts), word_counts, char_counts)

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        (word_docs, word_hashes), (char_docs, char_hashes) = _all_hashes(texts)
        return self._finish(len(texts), self.words.lookup(word_docs, word_hashes),
                            self.chars.lookup(char_docs, char_hashes))

    def _finish(self, n: int, words: tuple[I64, I64, F32],
                chars: tuple[I64, I64, F32]) -> sp.csr_matrix:
        blocks = []
        for (rows, cols, tf), block in ((words, self.words), (chars, self.chars)):
            vals = tf * block.idf.take(cols)
            norms = np.sqrt(np.bincount(rows, weights=vals * vals, minlength=n)).astype(np.float32)
            norms[norms == 0] = 1.0
            vals /= norms.take(rows)
            # `rows` is sorted (term frequencies come out sorted by row): CSR directly.
            indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=n))))
            blocks.append(sp.csr_matrix((vals.astype(np.float32), cols, indptr),
                                        shape=(n, len(block.vocabulary)), dtype=np.float32))
        return sp.hstack(blocks, format="csr", dtype=np.float32)
