"""Serving a fine-tuned `local-minilm` model: onnxruntime + `tokenizers` + numpy, no torch.

A model directory holds `model.json`, `encoder.onnx` (MiniLM + mean pooling + every head's
linear layer: `(sequences, total labels)` logits), `tokenizer.json` (copied from the base model,
so a serving factory needs neither the weights package nor transformers), `ngram/`, the
`local-ngram` model fitted on the same data, and `encoder.fp32.safetensors`: the fine-tuned
network's float32 weights (91 MB; the int8 graph is 23 MB). Serving never reads them; they are what
`service.factory.export` writes a Hugging Face directory from, since the int8 graph has lost
precision that cannot be recovered. Models trained before they were kept export as ONNX only. Scores are the per-head blend

    z = encoder_weight * mean_over_chunks(encoder logits) + ngram_weight * ngram log-evidence

(log-probabilities for `single_class`, log-odds for `multi_class`), then softmax or sigmoid; the
two weights were chosen on held-out data at training time (see `minilm_train`).

Long inputs are cut into chunks of `seq_len` tokens ([CLS] ... [SEP]), at most `max_chunks` of
them; a text's encoder logits are the mean of its chunks' logits, which, the heads being linear,
is the head applied to the mean of the chunk embeddings. Sequences are sorted by length and run in
batches padded to their own longest member: on short texts of mixed lengths this alone cuts the
padded tokens by ~1.5x against padding a request's batch to its longest text. Within a request,
`run_batches` cuts the sorted sequences where one more onnxruntime call costs less than the
padding it saves (a batch of 32 tweets pads 1.71x its real tokens as one call, ~1.2x as 2-4).

Speed (2 shared cores, AVX2, tweets, batch 32, `python -m bench.minilm_bench --quick`, ONNX and
the plain transformers loop measured interleaved in the same run, medians):

| | ONNX classify items/s | torch items/s | ratio | single-item p50 |
|---|---:|---:|---:|---:|
| before: SDPA export, quantize_dynamic, default session, one call per batch | 98 | 63 | 1.56x | 12.7 ms |
| after: fused graph + reduce_range, no spinning, `run_batches` | 180 | 71 | 2.55x | 9.3 ms |

What each step gave (a side experiment, interleaved, medians; absolute figures move with the
load from other jobs, the ratios less): the transformer optimizer (`minilm_train.export_onnx`:
6 Attention, 1 EmbedLayerNormalization, 12 SkipLayerNormalization, 6 BiasGelu fused, which needs
an eager-attention export) +2-7% items/s, p50 6.8 -> 6.4 ms, still exact in float32 (2.8e-7 from
torch); `run_batches` +50% (43.6 -> 65.7 items/s, overhead 32; 0/64/128/256 gave 57/62/60/54);
under load, spin-waiting off 48 -> 54 items/s and p50 19.7 -> 11.7 ms, while one thread instead of
two was faster still (61 items/s, 9.3 ms) but would waste a core on an idle machine; parallel
execution mode 29 items/s (worse). `reduce_range` changed speed by nothing measurable and the
int8 error slightly (max logit difference from float32 0.087 -> 0.068 on 256 tweets).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from service.factory.models.base import Head, ModelFormatError, Scores
from service.factory.models.scoring import labelled, sigmoid, slices, softmax

if TYPE_CHECKING:
    from service.factory.models.ngram import NGramModel

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

NAME = "local-minilm"
FORMAT = 1
ONNX_FILE = "encoder.onnx"
FP32_FILE = "encoder.fp32.safetensors"
TOKENIZER_FILE = "tokenizer.json"
NGRAM_DIR = "ngram"
#: Sequences per onnxruntime call and padded tokens per call: bounded so that a long batch of long
#: documents does not build one huge activation tensor.
RUN_SEQUENCES = 64
RUN_TOKENS = 8192
#: The fixed cost of one onnxruntime call, in padded tokens (measured: 32 to 128 all gain about
#: the same; see the module docstring), for `run_batches`.
RUN_OVERHEAD = 32
#: The log-evidence of a probability is clipped here (log(1e-6) = -13.8): an n-gram model sure
#: of a label cannot veto the encoder with an unbounded term.
PROB_FLOOR = 1e-6
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


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


def export_scale(weights: tuple[float, float]) -> float:
    """The factor on a head's logits in an export of the encoder alone: the encoder's blend weight
    when the n-gram weight is 0 (the served scores are then exactly `softmax(a * logits)`, which
    the export reproduces), else 1 (the encoder as trained; its scores then differ from the
    blend's, see `minilm_train.export_figures`)."""
    return weights[0] if not weights[1] else 1.0


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


def _pad(sequences: Sequence[Sequence[int]], rows: list[int], width: int) -> tuple[I64, I64, I64]:
    ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, i in enumerate(rows):
        ids[r, :len(sequences[i])] = sequences[i]
        mask[r, :len(sequences[i])] = 1
    return np.asarray(rows, dtype=np.int64), ids, mask


def run_batches(sequences: Sequence[Sequence[int]], max_sequences: int = RUN_SEQUENCES,
                max_tokens: int = RUN_TOKENS,
                overhead: int = RUN_OVERHEAD) -> list[tuple[I64, I64, I64]]:
    """Like `padded_batches`, but the length-sorted sequences are cut where it pays: the cuts
    minimise `overhead * calls + padded tokens` (exact, by dynamic programming over the sorted
    lengths), so a batch of 32 tweets runs as a few calls of similar lengths rather than one
    padded to its longest member."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    lengths = [len(sequences[i]) for i in order]
    n = len(order)
    best = [0] + [-1] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        width = lengths[end - 1]
        for start in range(end - 1, max(0, end - max_sequences) - 1, -1):
            if end - start > 1 and (end - start) * width > max_tokens:
                break
            cost = best[start] + overhead + (end - start) * width
            if best[end] < 0 or cost < best[end]:
                best[end], cut[end] = cost, start
    bounds: list[tuple[int, int]] = []
    end = n
    while end > 0:
        bounds.append((cut[end], end))
        end = cut[end]
    return [_pad(sequences, order[a:b], lengths[b - 1]) for a, b in reversed(bounds)]


def mean_by_owner(values: F32, owner: I64, count: int) -> F32:
    sums = np.zeros((count, values.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, values)
    per = np.bincount(owner, minlength=count).astype(np.float64)
    out: F32 = (sums / np.maximum(per, 1)[:, None]).astype(np.float32)
    return out


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session(onnx_bytes: bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session: all graph optimisations, one intra-op thread per core, no
    inter-op parallelism (sequential execution) and no spin-waiting: on a shared machine a
    spinning thread burns the time slice another process (or the HTTP server) needs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
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
    #: Training only: the fine-tuned network's float32 state dict (`Network` names) and the
    #: encoder's transformers config, saved for export (see the module docstring).
    fp32_state: dict[str, npt.NDArray[np.float32]] | None = None
    encoder_config: dict[str, Any] | None = None
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
        for rows, ids, mask in run_batches(sequences):
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
        return labelled(self.heads, self.predict_proba(texts), len(texts))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ONNX_FILE).write_bytes(self.onnx_bytes)
        (directory / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")
        if self.ngram is not None:
            self.ngram.save(directory / NGRAM_DIR)
        if self.fp32_state is not None:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in self.fp32_state.items()},
                      str(directory / FP32_FILE))
        meta = {"format": FORMAT, "base_model": NAME, "kind": self.kind,
                "seq_len": self.seq_len, "max_chunks": self.max_chunks,
                "weights": [list(w) for w in self.weights], "ngram": self.ngram is not None,
                "heads": [{"name": h.name, "labels": list(h.labels),
                           "loss_function": h.loss_function, "weight": h.weight}
                          for h in self.heads],
                "fp32_weights": FP32_FILE if self.fp32_state is not None else None,
                "encoder_config": self.encoder_config,
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
