"""Serving a fine-tuned `local-minilm` model: onnxruntime + `tokenizers` + numpy, no torch.

A model directory holds `model.json`, `encoder.onnx` (MiniLM + mean pooling + every head's
linear layer: `(sequences, total labels)` logits), `tokenizer.json` (copied from the base model,
so a serving factory needs neither the weights package nor transformers), `ngram/`, the
`local-ngram` model fitted on the same data, and `encoder.fp32.safetensors`: the fine-tuned
network's float32 weights (91 MB; the int8 graph is 23 MB). Serving never reads them; they are what
`minilm_export` writes a Hugging Face directory from, since the int8 graph has lost
precision that cannot be recovered. Models trained before they were kept export as ONNX only. A
float32 graph (`quantize=False`, for tests and benches) loads and serves the same way. Scores are
a per-head blend (`Blend`) of parts, each

    act(a * mean_over_chunks(encoder logits) + b * ngram log-evidence)

(log-probabilities for `single_class`, log-odds for `multi_class`; `act` softmax or sigmoid),
their probabilities mixed by share, then the head's temperature on the mixture's log. Models
trained since 2026-12-07 mix the product of the two models (a, b > 0) half and half with a
mixture of each model alone, calibrated: the n-gram model's vote for a label the encoder never
learnt then survives (`minilm_train.choose_blends`, with the figures); older models have one
part, the product. All weights were chosen on held-out data at training time.

Long inputs are cut into chunks of `seq_len` tokens ([CLS] ... [SEP]), at most `max_chunks` of
them; a text's encoder logits are the mean of its chunks' logits, which, the heads being linear,
is the head applied to the mean of the chunk embeddings.

One text per onnxruntime call (its chunks together), on single-threaded calls spread over a worker
thread per core (`pool()`). Dynamic int8 quantisation scales each call's activations with one
scale for the whole padded call, so a call shared by several texts made each text's scores move
with its batch-mates: up to 0.12 in probability on tweets, a top label flipped now and then, and a
gateway micro-batching concurrent requests would answer the same input differently from one
request to the next. Alone in its call, a text's scores depend on nothing but the text (a unit
test holds alone vs in any batch to 1e-5; the bench finds 0 difference). It is also the fastest
way found: no padding at all for one-chunk texts, and two single-threaded calls use two cores
better than one two-threaded call on small matrices.

Speed (2 cores, tweets, batch 32, `python -m bench.minilm_bench --quick`, medians of interleaved
runs; this machine's cores have AVX-512 VNNI, on which int8 is ~2x float32; on an AVX2-only
machine measured on 2026-11-30 int8 and float32 were equally fast):

| serving path | items/s | vs plain torch | a text's scores vs its batch-mates |
|---|---:|---:|---:|
| plain transformers loop, same weights, each batch padded to its longest text | 178 | 1x | - |
| int8, one call per batch of 32 (padded to its longest) | 171 | 0.96x | move by up to 0.121 |
| float32 fused graph, one text per call on a thread per core | 243 | 1.4x | 0 |
| int8, one text per call on a thread per core (served; single-item p50 3.3 ms) | 589 | 3.3x | 0 |

A side experiment (a 40-step model, 512 tweets, same machine) measured the path served until
2026-12-01, int8 in length-sorted batches cut where one more call costs less than the padding it
saves (`run_batches`): ~525 items/s, scores moving by up to 0.104 with the batch; float32 the same
way ~265, and int8 one text per call ~645.

Earlier steps, still in the graph (measured on a slower day, interleaved, medians): the
transformer optimizer (`minilm_train.export_onnx`: 6 Attention, 1 EmbedLayerNormalization, 12
SkipLayerNormalization, 6 BiasGelu fused, which needs an eager-attention export) +2-7% items/s and
exact in float32 (2.8e-7 from torch); spin-waiting off: under load 48 -> 54 items/s and p50 19.7 ->
11.7 ms; `reduce_range` changed speed by nothing measurable and the int8 error slightly (max logit
difference from float32 0.087 -> 0.068 on 256 tweets), and keeps AVX2's u8 x s8 int16 sums from
saturating on CPUs without VNNI. Also tried: per-token (row-wise) int8 activations built from plain
ONNX ops, also batch-invariant and closer to float32 (max 0.066), but only 1.1x float32's speed
(the extra element-wise ops, and attention left in float32).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
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
#: The log-evidence of a probability is clipped here (log(1e-6) = -13.8): an n-gram model sure
#: of a label cannot veto the encoder with an unbounded term.
PROB_FLOOR = 1e-6
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


def evidence(head: Head, p: F32) -> F32:
    """A head's probabilities as additive evidence: log p (softmax) or log-odds (sigmoid)."""
    q = np.clip(p.astype(np.float32), PROB_FLOOR, 1.0 - PROB_FLOOR)
    out: F32 = np.log(q) if head.loss_function == "single_class" else np.log(q / (1.0 - q))
    return out


#: One head's blend: parts `(share, encoder weight, n-gram weight)`, each a log-linear pool
#: `act(a * encoder logits + b * n-gram evidence)` (`act`: softmax or sigmoid), their
#: probabilities mixed by share (the shares sum to 1). One part is the product of experts every
#: model trained before 2026-12-07 serves (`model.json`'s `weights`: `(a, b)` per head); training
#: now mixes it with a mixture of the two calibrated models (`minilm_train.choose_blends`).
Blend = tuple[tuple[float, float, float], ...]
#: A mixture's probabilities are clipped here before their log: a label no part supports keeps a
#: finite logit.
MIX_FLOOR = 1e-12


def product(weights: tuple[float, float]) -> Blend:
    """The one-part blend `act(a * encoder + b * ngram)`."""
    return ((1.0, float(weights[0]), float(weights[1])),)


def uses_ngram(parts: Blend) -> bool:
    return any(b for _, _, b in parts)


def _activation(head: Head, z: F32) -> F32:
    return softmax(z) if head.loss_function == "single_class" else sigmoid(z)


def _pooled(encoder_logits: F32, ngram_evidence: F32 | None, a: float, b: float) -> F32:
    """One part's logits: `a * encoder + b * evidence` (the evidence left out where b is 0)."""
    z = a * encoder_logits
    if ngram_evidence is not None and b:
        z = z + b * ngram_evidence
    out: F32 = z.astype(np.float32)
    return out


def blend_logits(head: Head, encoder_logits: F32, ngram_evidence: F32 | None,
                 parts: Blend) -> F32:
    """One head's logits. One part: `a * encoder + b * evidence` exactly (the product of the two
    models). Several: the log of the mixture of the parts' probabilities (`single_class`; its
    softmax is the mixture), or its log-odds (`multi_class`, per label)."""
    if len(parts) == 1:
        return _pooled(encoder_logits, ngram_evidence, parts[0][1], parts[0][2])
    p = np.zeros(encoder_logits.shape, dtype=np.float64)
    for share, a, b in parts:
        p += share * _activation(head, _pooled(encoder_logits, ngram_evidence, a, b))
    q = np.clip(p, MIX_FLOOR, 1.0 - MIX_FLOOR)
    mixed: F32 = (np.log(q) if head.loss_function == "single_class"
                  else np.log(q / (1.0 - q))).astype(np.float32)
    return mixed


def blend(head: Head, encoder_logits: F32, ngram_evidence: F32 | None, parts: Blend,
          temperature: float = 1.0) -> F32:
    """Probabilities of one head from the encoder's logits and the n-gram model's evidence, at
    the head's temperature (the blend's logits divided by it)."""
    z = blend_logits(head, encoder_logits, ngram_evidence, parts)
    return _activation(head, z / np.float32(temperature) if temperature != 1.0 else z)


def exact_alone(parts: Blend) -> bool:
    """Whether the blend is the encoder alone at a scale (an export of the encoder reproduces
    it exactly)."""
    return len(parts) == 1 and not parts[0][2]


def describe(parts: Blend) -> str:
    """A blend in words, for notes: `weights encoder 0.75, n-gram 0.25` for one part."""
    return "; ".join((f"{share:g} x " if len(parts) > 1 else "")
                     + f"weights encoder {a:g}, n-gram {b:g}" for share, a, b in parts)


def export_scale(parts: Blend, temperature: float = 1.0) -> float:
    """The factor on a head's logits in an export of the encoder alone: the encoder's weight over
    the head's temperature when the blend is the encoder alone (one part, n-gram weight 0: the
    served scores are then exactly `softmax(a / T * logits)`, which the export reproduces), else
    1 (the encoder as trained, uncalibrated: the temperature was fitted to the blend; its scores
    then differ from the blend's, see `minilm_train.export_figures`)."""
    if exact_alone(parts):
        return parts[0][1] / temperature
    return 1.0


def blends_of(meta: Mapping[str, Any], heads: int) -> list[Blend]:
    """A `model.json`'s blends: `blends` (parts per head), or `weights` (`(a, b)` per head,
    models trained before mixtures: one part each, served as they always were)."""
    if "blends" in meta:
        blends = [tuple((float(s), float(a), float(b)) for s, a, b in parts)
                  for parts in meta["blends"]]
    else:
        blends = [product((float(a), float(b))) for a, b in meta["weights"]]
    if len(blends) != heads:
        raise ValueError(f"{len(blends)} blends for {heads} heads")
    for parts in blends:
        if not parts or min(s for s, _, _ in parts) < 0 or abs(sum(s for s, _, _ in parts)
                                                                  - 1.0) > 1e-6:
            raise ValueError(f"blend {parts}: shares must be non-negative and sum to 1")
    return blends


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

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's word-piece ids (no [CLS]/[SEP]), as many as its chunks hold: all of the
        text serving reads (training draws its windows from them)."""
        encodings = self.tokenizer.encode_batch(
            [t[:self.max_chars] for t in texts], add_special_tokens=False)
        keep = (self.seq_len - 2) * self.max_chunks
        return [encoding.ids[:keep] for encoding in encodings]

    def __call__(self, texts: Sequence[str]) -> tuple[list[list[int]], I64]:
        width = self.seq_len - 2
        sequences: list[list[int]] = []
        owner: list[int] = []
        for i, ids in enumerate(self.pieces(texts)):
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


def mean_by_owner(values: F32, owner: I64, count: int) -> F32:
    sums = np.zeros((count, values.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, values)
    per = np.bincount(owner, minlength=count).astype(np.float64)
    out: F32 = (sums / np.maximum(per, 1)[:, None]).astype(np.float32)
    return out


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cores(cpu_max: Path = CPU_MAX) -> int:
    """CPU cores this process may use: the cores it may run on, capped by its cgroup's CPU quota
    (`cpu.max`, cgroup v2: a Kubernetes CPU limit). A pod limited to 2 CPUs on a 32-core node
    sees 32 cores; 32 busy serving threads would spend the quota in a few milliseconds and be
    throttled for the rest of each 100 ms period, which is latency, not throughput."""
    try:
        visible = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        visible = max(1, os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()[:2]
        if quota != "max":
            return max(1, min(visible, -(-int(quota) // int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or a format this does not know
        pass
    return visible


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's onnxruntime workers, one per core, shared by every loaded model (a factory
    holds many models; per-model pools would hold idle threads for each)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(cores(), thread_name_prefix="onnx")
        return _POOL


def session(onnx_bytes: bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session: all graph optimisations, `threads` intra-op threads (default
    1: `MiniLMModel` runs one text per call and spreads the calls over `pool()`), no inter-op
    parallelism (sequential execution) and no spin-waiting: on a shared machine a spinning thread
    burns the time slice another process (or the HTTP server) needs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or 1
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
    #: Per head: its blend of the encoder and the n-gram model (`Blend`).
    weights: list[Blend]
    ngram: NGramModel | None = None
    kind: str = "text"
    info: dict[str, Any] = field(default_factory=dict)
    #: Training only: the fine-tuned network's float32 state dict (`Network` names) and the
    #: encoder's transformers config, saved for export (see the module docstring).
    fp32_state: dict[str, npt.NDArray[np.float32]] | None = None
    encoder_config: dict[str, Any] | None = None
    #: Per head, the temperature the blend's logits are divided by (`models.calibration`); a
    #: model saved without one (before calibration) has 1.0: its scores are as trained.
    temperatures: list[float] = field(default_factory=list)
    _session: Any = None
    _chunker: Chunker | None = None

    @property
    def inline(self) -> bool:
        """Milliseconds a text: never on the event loop."""
        return False

    def __post_init__(self) -> None:
        if not self.temperatures:
            self.temperatures = [1.0] * len(self.heads)
        self._session = session(self.onnx_bytes)
        self._chunker = Chunker(self.tokenizer_json, self.seq_len, self.max_chunks)

    def encoder_logits(self, texts: Sequence[str]) -> F32:
        """(n, total labels): each text's mean chunk logits."""
        assert self._chunker is not None
        labels = sum(len(h.labels) for h in self.heads)
        if not texts:
            return np.zeros((0, labels), dtype=np.float32)
        sequences, owner = self._chunker(texts)
        return self.sequence_logits(sequences, owner, len(texts))

    def sequence_logits(self, sequences: Sequence[Sequence[int]], owner: I64,
                        count: int) -> F32:
        """(count, total labels): each text's mean logits over its sequences (`owner[i]`, in
        order: the text of sequence `i`; every text has one at least), one onnxruntime call a
        text. `encoder_logits` passes every chunk; training may pass a sample of them."""
        bounds = np.searchsorted(owner, np.arange(count + 1))
        calls = [range(int(bounds[i]), int(bounds[i + 1])) for i in range(count)]
        if len(calls) == 1:
            return self._text_logits(sequences, calls[0])[None, :]
        return np.stack(list(pool().map(partial(self._text_logits, sequences), calls)))

    def _text_logits(self, sequences: Sequence[Sequence[int]], rows: range) -> F32:
        """One text's mean chunk logits, from one onnxruntime call holding its chunks alone, so
        that its scores never depend on what else is being scored (see the module docstring)."""
        _, ids, mask = _pad(sequences, list(rows), max(len(sequences[i]) for i in rows))
        (out,) = self._session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
        mean: F32 = out.mean(axis=0, dtype=np.float32)
        return mean

    def ngram_evidence(self, texts: Sequence[str]) -> list[F32] | None:
        if self.ngram is None or not any(uses_ngram(w) for w in self.weights):
            return None
        probs = self.ngram.predict_proba(texts)
        return [evidence(h, p) for h, p in zip(self.heads, probs, strict=True)]

    def head_logits(self, texts: Sequence[str]) -> list[F32]:
        """One (n, labels) matrix of blended logits per head, before the temperature."""
        texts = list(texts)
        z = self.encoder_logits(texts)
        ev = self.ngram_evidence(texts)
        return [blend_logits(h, z[:, s], None if ev is None else ev[k], self.weights[k])
                for k, (h, s) in enumerate(zip(self.heads, slices(self.heads), strict=True))]

    def predict_proba(self, texts: Sequence[str]) -> list[F32]:
        """One (n, labels) probability matrix per head, in head order."""
        texts = list(texts)
        return self.probabilities(self.encoder_logits(texts), self.ngram_evidence(texts))

    def probabilities(self, z: F32, ev: list[F32] | None) -> list[F32]:
        """`predict_proba` from the texts' encoder logits `z` and n-gram evidence `ev`, for a
        caller that already holds them (the export figures)."""
        return [blend(h, z[:, s], None if ev is None else ev[k], self.weights[k],
                      self.temperatures[k])
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
                "blends": [[list(part) for part in w] for w in self.weights],
                "ngram": self.ngram is not None,
                "temperatures": list(self.temperatures),
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
            weights = blends_of(meta, len(heads))
            onnx_bytes = (directory / ONNX_FILE).read_bytes()
            tokenizer_json = (directory / TOKENIZER_FILE).read_text(encoding="utf-8")
            ngram: NGramModel | None = None
            if meta.get("ngram"):
                from service.factory.models.ngram import NGramModel

                ngram = NGramModel.load(directory / NGRAM_DIR)
            temperatures = temperatures_of(meta, len(heads))
            model = cls(heads, onnx_bytes, tokenizer_json, int(meta["seq_len"]),
                        int(meta["max_chunks"]), weights, ngram, str(meta.get("kind", "text")),
                        dict(meta.get("info", {})), temperatures=temperatures)
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


def temperatures_of(meta: Mapping[str, Any], heads: int) -> list[float]:
    """A `model.json`'s temperatures; none (saved before calibration): 1.0 per head, the
    scores the model was trained with."""
    temperatures = [float(t) for t in meta.get("temperatures") or [1.0] * heads]
    if len(temperatures) != heads or min(temperatures, default=1.0) <= 0:
        raise ValueError(f"temperatures {temperatures} for {heads} heads")
    return temperatures


def serving_available() -> str | None:
    """`None` when onnxruntime and tokenizers import, else what is missing."""
    missing = [m for m in ("onnxruntime", "tokenizers") if importlib.util.find_spec(m) is None]
    return ", ".join(missing) or None
