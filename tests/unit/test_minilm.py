"""`local-minilm` code paths on tiny data (a few steps on CPU): what a quality test cannot see.

Skipped where the encoder extra is not installed (`MiniLM().availability()` says how to install
it). One model, two heads (a `single_class` and a `multi_class` target), is trained once for the
module (~20 s on 2 cores) with the defaults the factory uses, so the ONNX graph tested is the
one the factory serves.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.factory.data import Example, TargetSpec
from service.factory.models.base import (
    Checkpoint,
    Hyperparameters,
    ModelFormatError,
    SilentControl,
    TrainingCancelled,
    TrainingData,
    TrainingSpec,
)
from service.factory.models.minilm import INSTALL, TRAIN_TOKENS, MiniLM, holdout_size


def test_the_encoder_extra_is_installed() -> None:
    """These tests need the `encoder` extra (`make test` installs it): without it they fail,
    never skip, and this one says what to install."""
    assert MiniLM().availability() is None, MiniLM().availability()

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
TARGETS = (TargetSpec("sentiment", ("negative", "positive"), "single_class"),
           TargetSpec("topics", ("food", "price", "service"), "multi_class"))


def examples(n: int = 48) -> list[Example]:
    good, bad = ["great", "lovely", "excellent"], ["awful", "terrible", "bland"]
    topics = [("food",), ("price",), ("service",), ("food", "price"), ("price", "service")]
    out = []
    for i in range(n):
        words = good if i % 2 == 0 else bad
        tags = topics[i % len(topics)]
        text = f"the {' and the '.join(tags)} was {words[i % 3]}, {words[(i + 1) % 3]} {i}"
        out.append(Example(i + 1, text, {"sentiment": "positive" if i % 2 == 0 else "negative",
                                         "topics": tags}))
    return out


def spec(steps: int = 3, seed: int = 0, seq_len: int = SEQ_LEN) -> TrainingSpec:
    return TrainingSpec("local-minilm", "text", TARGETS, (), (),
                        Hyperparameters(training_steps=steps, learning_rate=4e-5,
                                        seq_len=seq_len, seed=seed), "/unused", checkpoints=3)


def train(steps: int = 3, seed: int = 0, control: Any = None) -> Any:
    from service.factory.models import minilm_train

    data = examples()
    return minilm_train.run(TrainingData(data, [1.0] * len(data), data[:8]), spec(steps, seed),
                            control or SilentControl(), seq_len=SEQ_LEN, max_chunks=4,
                            batch_size=8, device="cpu")


TEXTS = ["the food was great, lovely", "the price and the service was awful",
         "word " * 100]  # the last one is four chunks


@pytest.fixture(scope="module")
def trained() -> Any:
    control = SilentControl()
    result = train(control=control)
    result.control = control
    return result


def test_checkpoints_and_device_event(trained: Any) -> None:
    control = trained.control
    assert [c.step_number for c in control.checkpoints] == [1, 2, 3]
    assert all(c.train_loss > 0 and c.valid_loss is not None for c in control.checkpoints)
    (_name, data), = [e for e in control.events if e[0] == "device"]
    assert data["device"] == "cpu" and data["name"] == "cpu"
    assert trained.evaluation is not None and set(trained.evaluation.targets) == {
        "sentiment", "topics"}


def test_progress_reports_each_phase_and_every_step_up_to_the_total(trained: Any) -> None:
    """Issue 19: minutes of RUNNING with no step (loading, tokenising, probing come before the
    first checkpoint) and a job that ended at step 38/43 (the total counted the held-out
    examples). Every phase is reported, every step, and the last step is the total."""
    progressed = trained.control.progressed
    phases = list(dict.fromkeys(phase for phase, _, _ in progressed))
    assert phases == ["loading", "tokenising", "probing", "training", "exporting", "calibrating",
                      "evaluating"]
    assert ("tokenising", 0, 48) in progressed  # 48 examples: below the holdout's minimum
    probing = [(done, total) for phase, done, total in progressed if phase == "probing"]
    assert probing[0] == (0, 48) and probing[-1] == (48, 48)
    steps = [(done, total) for phase, done, total in progressed if phase == "training"]
    assert steps == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_the_planned_steps_count_only_the_examples_the_encoder_trains_on() -> None:
    """The job's metadata (and a dry run) planned 43 steps for 450 examples; training held 45
    out for the blend weights and the temperatures and made 38."""
    assert holdout_size(450) == 45
    assert holdout_size(199) == 0 and holdout_size(10_000) == 600
    assert MiniLM().steps_for(450, Hyperparameters()) == 38  # ceil(3 epochs * 405 / 32)
    # Without the blend the slice is still held out, for the temperatures.
    assert MiniLM().steps_for(450, Hyperparameters(ngram_blend=False)) == 38
    assert MiniLM().steps_for(450, Hyperparameters(training_steps=7)) == 7


def test_onnx_matches_torch(trained: Any) -> None:
    """The exported graph computes the network (float32: to 1e-4; the served int8 graph of it
    differs by quantisation, which `export_figures` measures)."""
    from service.factory.models.minilm_onnx import MiniLMModel
    from service.factory.models.minilm_train import export_onnx, torch_logits

    model = trained.model
    fp32 = MiniLMModel(model.heads, export_onnx(trained.network, quantize=False),
                       model.tokenizer_json, model.seq_len, model.max_chunks, model.weights)
    onnx = fp32.encoder_logits(TEXTS)
    torch_side = torch_logits(trained.network, model.tokenizer_json, TEXTS, SEQ_LEN, 4)
    assert np.abs(onnx - torch_side).max() < 1e-4
    served = model.encoder_logits(TEXTS)
    assert 0 < np.abs(served - torch_side).max() < 0.5  # int8: close, not equal


def test_scores_do_not_depend_on_batch_mates(trained: Any) -> None:
    """A text's scores are the same alone, in any batch and in any order: the gateway
    micro-batches concurrent requests together and caches each answer, so a score that moved
    with its batch-mates would make the same input answer differently from one request to the
    next. The int8 graph scales each onnxruntime call's activations together, so this holds
    only because each text gets a call of its own (scored in shared calls, tweets moved by up to
    0.12 in probability)."""
    model = trained.model
    texts = [*TEXTS, "bland", "the service was excellent and the price was lovely " * 3,
             "price", "the food was awful, terrible and bland, the service was slow"]
    together = model.predict_proba(texts)
    shuffled = [texts[i] for i in reversed(range(len(texts)))]
    backwards = model.predict_proba(shuffled)
    for i, text in enumerate(texts):
        alone = model.predict_proba([text])
        for head, a in enumerate(alone):
            assert np.abs(a[0] - together[head][i]).max() < 1e-5, (text, head)
            assert np.abs(a[0] - backwards[head][len(texts) - 1 - i]).max() < 1e-5, (text, head)


def test_heads_softmax_and_sigmoid(trained: Any) -> None:
    sentiment, topics = trained.model.predict_proba(TEXTS)
    assert sentiment.shape == (3, 2) and np.allclose(sentiment.sum(axis=1), 1, atol=1e-5)
    assert topics.shape == (3, 3) and ((topics > 0) & (topics < 1)).all()
    assert not np.allclose(topics.sum(axis=1), 1, atol=1e-3)  # independent sigmoids
    scores = trained.model.classify(TEXTS[:1])[0]
    assert set(scores) == {"sentiment", "topics"}
    assert set(scores["topics"]) == {"food", "price", "service"}


def test_save_load_round_trip(trained: Any, tmp_path: Path) -> None:
    from service.factory.models.registry import Registry

    trained.model.save(tmp_path)
    assert (tmp_path / "ngram" / "model.json").exists()
    loaded = Registry([MiniLM()]).load(tmp_path)
    for a, b in zip(trained.model.predict_proba(TEXTS), loaded.predict_proba(TEXTS),  # type: ignore[attr-defined]
                    strict=True):
        assert np.abs(a - b).max() < 1e-6
    assert loaded.classify(TEXTS) == trained.model.classify(TEXTS)
    assert loaded.kind == "text"


def test_serving_does_not_import_torch(trained: Any, tmp_path: Path) -> None:
    trained.model.save(tmp_path)
    code = ("import sys; from pathlib import Path; "
            "from service.factory.models.minilm import MiniLM; "
            f"m = MiniLM().load(Path({str(tmp_path)!r})); print(m.classify(['great food'])); "
            "bad = [n for n in ('torch', 'transformers') if n in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("damage", ["onnx", "json", "format", "missing"])
def test_corrupt_model_dir(trained: Any, tmp_path: Path, damage: str) -> None:
    from service.factory.models.registry import Registry

    trained.model.save(tmp_path)
    if damage == "onnx":
        (tmp_path / "encoder.onnx").write_bytes(b"not an onnx graph")
    elif damage == "json":
        (tmp_path / "model.json").write_text("{", encoding="utf-8")
    elif damage == "format":
        (tmp_path / "model.json").write_text(
            '{"base_model": "local-minilm", "format": 99}', encoding="utf-8")
    else:
        (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError):
        Registry([MiniLM()]).load(tmp_path)


def test_same_seed_same_model(trained: Any) -> None:
    again = train()
    for a, b in zip(trained.model.predict_proba(TEXTS), again.model.predict_proba(TEXTS),
                    strict=True):
        assert np.abs(a - b).max() < 1e-6


class CancelAfterFirstCheckpoint(SilentControl):
    """Turns cancelled once the first checkpoint is in, and records when."""

    def __init__(self) -> None:
        super().__init__()
        self.at: float | None = None

    def checkpoint(self, checkpoint: Checkpoint) -> None:
        super().checkpoint(checkpoint)
        if self.at is None:
            self.at = time.monotonic()
            self.cancel = True

    def event(self, name: str, data: Mapping[str, Any]) -> None:
        super().event(name, data)


def test_cancel_stops_within_a_second() -> None:
    control = CancelAfterFirstCheckpoint()
    with pytest.raises(TrainingCancelled):
        train(steps=50, control=control)
    assert control.at is not None
    assert time.monotonic() - control.at < 1.0
    assert len(control.checkpoints) == 1


def test_cancel_from_another_thread() -> None:
    """Cancellation while the model loads or probes is seen too (before any checkpoint)."""
    control = SilentControl()
    timer = threading.Timer(2.0, lambda: setattr(control, "cancel", True))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(TrainingCancelled):
            train(steps=500, control=control)
    finally:
        timer.cancel()
    # Loading the pretrained weights (~4 s, more on a busy machine) is the one step not polled.
    assert time.monotonic() - started < 2.0 + 30.0


def test_device_is_chosen_at_run_time() -> None:
    """FACTORY_DEVICE reaches the trainer as `TrainingSpec.device`; unset, CUDA when PyTorch
    sees a GPU (never on CI), else CPU: the code path is the same, only the device differs."""
    import torch

    from service.factory.models.minilm_train import pick_device

    assert pick_device("cpu").type == "cpu"
    assert str(pick_device("cuda:3")) == "cuda:3"
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_seq_len_range() -> None:
    model = MiniLM()
    assert model.check(Hyperparameters(seq_len=128)) is None
    assert model.check(Hyperparameters()) is None
    for bad in (8, 15, 513, 32_768):
        found = model.check(Hyperparameters(seq_len=bad))
        assert found is not None and found[0] == "seq_len" and "512" in found[1]


def test_availability_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name in ("torch", "onnxruntime") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    message = MiniLM().availability()
    assert message is not None
    assert "torch" in message and "onnxruntime" in message and INSTALL in message
    assert "transformers" not in message


def test_steps_and_estimate() -> None:
    model = MiniLM()
    assert model.steps_for(10_000, Hyperparameters(training_steps=100)) == 100
    # 3 epochs of 32 over the examples the encoder trains on: 320 less the blend's holdout (32)
    assert holdout_size(320) == 32
    assert model.steps_for(320, Hyperparameters()) == 27
    assert model.steps_for(320, Hyperparameters(ngram_blend=False)) == 27  # same holdout
    assert model.estimate_seconds(10_000, 1_000_000, Hyperparameters(training_steps=100)) > 0


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1),
    ("max 100000\n", None), ("garbage\n", None), (None, None)])
def test_serving_threads_follow_the_cpu_limit(tmp_path: Path, cpu_max: str | None,
                                              expected: int | None) -> None:
    """A Kubernetes CPU limit (cgroup v2 `cpu.max`) caps the serving threads; no limit, an
    unreadable file or no file: the cores the process may run on."""
    from service.factory.models.minilm_onnx import cores

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    visible = len(os.sched_getaffinity(0))
    assert cores(path) == (visible if expected is None else min(visible, expected))


def test_the_temperatures_come_from_the_validation_files_else_the_held_out_slice() -> None:
    """`minilm_train._calibrate` on logits whose best temperature is known (the model is 3x too
    sure): the validation files win over the held-out slice, and with neither T stays 1 with
    the reason."""
    from service.factory.models import minilm_train
    from service.factory.models.base import Head
    from service.factory.models.calibration import scaled

    head = Head("sentiment", ("negative", "positive"), "single_class")
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(400, 2)) * 6).astype(np.float32)
    p = scaled(head, z, 3.0)
    rows = [Example(i, "", {"sentiment": head.labels[int(rng.random() < q[1])]})
            for i, q in enumerate(p)]
    split = minilm_train._Split(rows, [1.0] * 400, list(range(300, 400)), rows[:300],
                                [1.0] * 300)
    control = SilentControl()
    valid = minilm_train._calibrate([head], split, rows[:300], [z[:300]], [z[300:]], control)
    assert valid.source == "validation" and valid.examples == 300
    assert 2.3 < valid.temperatures[0] < 3.8
    assert ("calibrating", 0, 300) in control.progressed
    held = minilm_train._calibrate([head], split, [], None, [z[300:]], control)
    assert held.source == "held-out" and held.examples == 100 and held.temperatures[0] > 1.5
    none = minilm_train._calibrate([head], minilm_train._Split(rows[:50], [1.0] * 50, [],
                                                               rows[:50], [1.0] * 50),
                                   [], None, None, control)
    assert none.source == "none" and none.temperatures == [1.0]
    assert "50 training examples" in none.targets["sentiment"]["reason"]


def test_a_step_reads_whole_short_texts_and_a_bounded_window_of_long_ones() -> None:
    """Issue 23 §4: a step of long documents cost 4x a step of tweets (a 128-token chunk each).
    A step now reads at most `TRAIN_TOKENS` tokens an example on average: short texts whole,
    without a draw (their path is what it was), long ones a random window from anywhere in the
    text serving reads, fresh at each step, the same for the same seed."""
    from service.factory.models.minilm_onnx import CLS_ID, SEP_ID
    from service.factory.models.minilm_train import window_length, windows

    assert window_length([10, 20, 30], 100) == 30  # all fit: no cut
    assert window_length([10, 60, 60], 90) == 40  # 10 whole, the two others cut to 40
    assert window_length([128] * 32, 32 * TRAIN_TOKENS) == TRAIN_TOKENS

    short = [list(range(1000 + i, 1000 + i + 30)) for i in range(32)]  # 30 pieces: 32 tokens
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert windows(short, list(range(32)), 128, TRAIN_TOKENS, rng) == [
        [CLS_ID, *p, SEP_ID] for p in short]
    assert rng.bit_generator.state == state  # nothing drawn

    long = [list(range(i * 10_000, i * 10_000 + 900)) for i in range(32)]  # 7+ chunks each
    first = windows(long, list(range(32)), 128, TRAIN_TOKENS, np.random.default_rng(1))
    assert sum(len(s) for s in first) <= 32 * TRAIN_TOKENS
    for i, sequence in enumerate(first):
        body = sequence[1:-1]
        assert sequence[0] == CLS_ID and sequence[-1] == SEP_ID and len(sequence) == TRAIN_TOKENS
        assert body == list(range(body[0], body[0] + len(body))) and body[0] // 10_000 == i
    starts = {s[1] % 10_000 for s in first}
    assert len(starts) > 16 and max(starts) > 128  # random, and past the first chunk
    assert windows(long, list(range(32)), 128, TRAIN_TOKENS, np.random.default_rng(1)) == first
    # a long text among short ones takes what they leave: whole tweets, one wider window
    mixed = windows([*short[:31], long[0]], list(range(32)), 128, TRAIN_TOKENS,
                    np.random.default_rng(2))
    assert mixed[:31] == [[CLS_ID, *p, SEP_ID] for p in short[:31]]
    assert len(mixed[31]) == 128  # 31 * 32 + 128 <= 32 * 48


def test_held_out_texts_are_scored_on_a_sample_of_their_chunks() -> None:
    """At training time a text is scored on at most `SCORE_CHUNKS` of its chunks (in order);
    a text with fewer keeps them all, exactly as served."""
    from service.factory.models.minilm_onnx import Chunker
    from service.factory.models.minilm_train import SCORE_CHUNKS, base_dir, sampled_chunks

    chunker = Chunker((base_dir() / "tokenizer.json").read_text(encoding="utf-8"), 32, 8)
    texts = ["a short text", " ".join(f"w{i}" for i in range(400)), "another short one"]
    every, owner = chunker(texts)
    assert np.bincount(owner).tolist()[1] == 8
    sequences, kept = sampled_chunks(chunker, texts, np.random.default_rng(0))
    assert np.bincount(kept).tolist() == [1, SCORE_CHUNKS, 1]
    assert sequences[0] == every[0] and sequences[-1] == every[-1]
    middle = [every.index(s) for s in sequences[1:-1]]
    assert middle == sorted(middle) and all(owner[j] == 1 for j in middle)


def test_training_on_long_texts_reads_bounded_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe and the loop feed the windows to the network: texts of ~3.5 chunks of 128
    tokens, batch 8: each step reads 8 * `TRAIN_TOKENS` tokens, the probe 48 * `TRAIN_TOKENS`."""
    from service.factory.models import minilm_onnx, minilm_train

    fed: list[int] = []
    real = minilm_onnx.padded_batches

    def recording(sequences: Any, max_sequences: int, max_tokens: int) -> Any:
        fed.append(sum(len(s) for s in sequences))
        return real(sequences, max_sequences, max_tokens)

    class StopAfterTwoSteps(SilentControl):
        def progress(self, phase: str, done: int | None = None,
                     total: int | None = None) -> None:
            super().progress(phase, done, total)
            if phase == "training" and done == 2:
                self.cancel = True

    monkeypatch.setattr(minilm_train, "padded_batches", recording)
    data = [Example(e.line, " ".join([e.text] * 40), e.labels) for e in examples()]
    with pytest.raises(TrainingCancelled):
        minilm_train.run(TrainingData(data, [1.0] * len(data)), spec(steps=5, seq_len=128),
                         StopAfterTwoSteps(), seq_len=128, max_chunks=8, batch_size=8,
                         device="cpu")
    assert fed[0] == 48 * TRAIN_TOKENS  # the probe: all 48 examples
    assert fed[1:] == [8 * TRAIN_TOKENS] * len(fed[1:]) and len(fed) >= 3


def test_the_encoder_loss_weighs_rare_labels_up_by_the_square_root_of_their_rarity() -> None:
    """`balanced`: a label with half of another's (file-weighted) examples weighs sqrt(2) as
    much an example; the total stays; unlabelled rows stay 0; multi-label heads are untouched."""
    from service.factory.models.base import Head
    from service.factory.models.minilm_train import BALANCE_POWER, Targets, balanced

    assert BALANCE_POWER == 0.5
    heads = [Head("s", ("a", "b"), "single_class"), Head("m", ("x", "y"), "multi_class")]
    rows = ([("a", ("x",))] * 5 + [("a", ("x", "y"))] + [("b", ("y",))] * 2
            + [(None, ("y",))])
    ex = [Example(i, f"t{i}", {k: v for k, v in (("s", s), ("m", m)) if v is not None})
          for i, (s, m) in enumerate(rows)]
    file_weights = [1.0] * 7 + [2.0, 1.0]  # the second "b" counts twice: 6 "a" against 3 "b"
    before = Targets.of(heads, ex, file_weights)
    after = balanced(heads, before, BALANCE_POWER)
    s_before, s_after = before.w[0], after.w[0]
    assert s_after[8] == 0.0  # unlabelled for "s"
    assert s_after.sum() == pytest.approx(s_before.sum())
    assert s_after[6] / s_after[0] == pytest.approx(2 ** 0.5)  # 6 / 3 examples: sqrt(2)
    assert s_after[7] / s_after[6] == pytest.approx(2.0)  # its file weight is kept
    np.testing.assert_array_equal(after.w[1], before.w[1])
    np.testing.assert_array_equal(balanced(heads, before, 0.0).w[0], s_before)


def test_the_network_trains_on_the_balanced_weights() -> None:
    """`_network` hands the loop (and the probe) the balanced loss weights, not the plain ones:
    three "a" to one "b", so a "b" example weighs sqrt(3) times an "a" one."""
    import torch

    from service.factory.models.base import Head
    from service.factory.models.minilm_train import _network, _Split

    heads = [Head("s", ("a", "b"), "single_class")]
    ex = [Example(i, f"text {i}", {"s": "a" if i % 4 else "b"}) for i in range(8)]
    split = _Split(ex, [1.0] * 8, [], ex, [1.0] * 8)
    *_, targets = _network(heads, split, 0, torch.device("cpu"), SEQ_LEN, 1, SilentControl())
    w = targets.w[0]
    assert w[0] / w[1] == pytest.approx(3 ** 0.5)  # ex 0 is a "b", ex 1 an "a"
    assert w.sum() == pytest.approx(8.0)


def test_one_part_is_the_product_and_a_mixture_keeps_a_label_the_encoder_vetoes() -> None:
    """A one-part blend is `act(a * z + b * ev)` as before; the temperature divides the blend's
    logits. In the product, an encoder that pushed a label far down (-12) overrules an n-gram
    model sure of it (0.9), even where the encoder hardly prefers any other label; in a mixture
    (the shares French intents chose, training seed 1) the n-gram model's share of it survives."""
    from service.factory.models.base import Head
    from service.factory.models.minilm_onnx import blend, blend_logits, evidence, product
    from service.factory.models.scoring import softmax

    head = Head("s", ("a", "b", "c"), "single_class")
    z = np.array([[0.5, 0.3, -12.0], [0.0, 3.0, 0.0]], dtype=np.float32)
    ev = evidence(head, np.array([[0.05, 0.05, 0.9], [0.1, 0.8, 0.1]], dtype=np.float32))
    one = product((0.75, 1.5))
    np.testing.assert_array_equal(blend_logits(head, z, ev, one), 0.75 * z + 1.5 * ev)
    halved = ((0.75 * z + 1.5 * ev) / 2).astype(np.float32)
    np.testing.assert_allclose(blend(head, z, ev, one, 2.0), softmax(halved), atol=1e-6)
    assert blend(head, z, ev, product((1.0, 1.0)))[0].argmax() == 0  # the veto
    mixture = ((0.5, 1.0, 1.0), (0.025, 1.0, 0.0), (0.475, 0.0, 1.0))
    p = blend(head, z, ev, mixture)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    expected = (0.5 * softmax(z + ev) + 0.025 * softmax(z) + 0.475 * softmax(ev))
    np.testing.assert_allclose(p, expected, atol=1e-6)
    assert p[0].argmax() == 2 and p[1].argmax() == 1


def test_a_multi_label_mixture_mixes_each_labels_probability() -> None:
    from service.factory.models.base import Head
    from service.factory.models.minilm_onnx import blend, evidence
    from service.factory.models.scoring import sigmoid

    head = Head("m", ("x", "y"), "multi_class")
    z = np.array([[3.0, -9.0]], dtype=np.float32)
    ev = evidence(head, np.array([[0.2, 0.95]], dtype=np.float32))
    p = blend(head, z, ev, ((0.5, 1.0, 0.0), (0.5, 0.0, 1.0)))
    np.testing.assert_allclose(p, 0.5 * sigmoid(z) + 0.5 * np.array([[0.2, 0.95]]), atol=1e-5)


def test_choose_blends_mixes_the_product_half_and_half_with_the_calibrated_models() -> None:
    """On a held-out slice where the encoder is sure and wrong on label "c" and the n-gram model
    right, the blend's second half leans on the n-gram model; each part is (share, a, b), the
    shares sum to 1 and the product keeps `PRODUCT_SHARE`. A head with no labelled held-out
    example gets the product at `DEFAULT_WEIGHTS`."""
    from service.factory.models.base import Head
    from service.factory.models.minilm_onnx import blend
    from service.factory.models.minilm_train import (
        DEFAULT_WEIGHTS,
        GRID,
        PRODUCT_SHARE,
        choose_blends,
    )

    rng = np.random.default_rng(0)
    heads = [Head("s", ("a", "b", "c"), "single_class"), Head("u", ("p", "q"), "single_class")]
    gold = rng.integers(0, 3, 90)
    z = rng.normal(0, 1, (90, 5)).astype(np.float32)
    z[np.arange(90), gold] += 3.0
    z[gold == 2, 2] = -8.0  # the encoder never learnt "c"
    ngram = np.full((90, 3), 0.15, dtype=np.float32)
    ngram[np.arange(90), gold] = 0.7
    examples = [Example(i, f"t{i}", {"s": "abc"[g]}) for i, g in enumerate(gold)]
    (s, u) = choose_blends(heads, z, [ngram, np.full((90, 2), 0.5, np.float32)], examples)
    assert u == ((1.0, *DEFAULT_WEIGHTS),)
    assert abs(sum(share for share, _, _ in s) - 1.0) < 1e-9
    assert s[0][0] == PRODUCT_SHARE and s[0][1:] in GRID
    assert [b for _, _, b in s[1:]] in ([0.0, pytest.approx(s[-1][2])], [pytest.approx(s[-1][2])])
    p = blend(heads[0], z[:, :3], np.log(ngram), s)
    assert (p.argmax(axis=1)[gold == 2] == 2).mean() > 0.9


def test_a_model_json_of_either_format_gives_its_blends() -> None:
    from service.factory.models.minilm_onnx import blends_of

    assert blends_of({"weights": [[0.75, 0.25]]}, 1) == [((1.0, 0.75, 0.25),)]
    mixed = [[[0.5, 1.0, 1.0], [0.5, 0.0, 1.2]]]
    assert blends_of({"blends": mixed, "weights": [[9, 9]]}, 1) == [((0.5, 1.0, 1.0),
                                                                       (0.5, 0.0, 1.2))]
    with pytest.raises(ValueError, match="sum to 1"):
        blends_of({"blends": [[[0.5, 1.0, 1.0]]]}, 1)
    with pytest.raises(ValueError, match="2 heads"):
        blends_of({"weights": [[1.0, 1.0]]}, 2)
