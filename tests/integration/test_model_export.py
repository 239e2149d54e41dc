"""`service.export.writer` on a real fine-tuned `local-minilm` model (trained here, 2 steps on 48
short texts, ~25 s on 2 cores): the ONNX export scores exactly as the factory does, through the
same scorer the KServe model server runs; the Hugging Face export is the float32 network, loaded
by transformers, and says how far that is from the factory's int8 graph; what cannot be exported is refused with the reason and the remedy."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from service.export.kserve_model import ExportedModel
from service.export.writer import EXPORT_FILE, BadFormat, NotExportable, export
from service.factory.data import Example, TargetSpec
from service.factory.models.base import (
    Hyperparameters,
    SilentControl,
    TrainingData,
    TrainingSpec,
)
from service.factory.models.minilm import MAX_CHUNKS, MiniLM
from service.factory.models.minilm_onnx import FP32_FILE, MiniLMModel
from service.factory.models.minilm_train import Network, torch_logits
from service.factory.models.ngram import NGram
from tests.support.factory import sentiment_rows

TARGET = TargetSpec("sentiment", ("negative", "positive"), "single_class")
#: Short texts, one of 646 tokens (6 chunks of 128: the chunk averaging) and an empty one.
TEXTS = [r["text"] for r in sentiment_rows(40, seed=7)] + [
    "the service was terrible " * 160 + "but the food was great", ""]


def _train(base: MiniLM | NGram, out: Path, rows: int, **hyper: object) -> Path:
    examples = [Example(i, r["text"], r["labels"]) for i, r in enumerate(sentiment_rows(rows))]
    spec = TrainingSpec(base.name, "text", (TARGET,), (), (),
                        Hyperparameters(learning_rate=4e-5, **hyper),  # type: ignore[arg-type]
                        str(out))
    model, _ = base.train(TrainingData(examples, [1.0] * len(examples)), spec, SilentControl())
    model.save(out)
    return out


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(MiniLM(), tmp_path_factory.mktemp("minilm") / "model", 48,
                  training_steps=2, ngram_blend=False)


def _with_weights(source: Path, target: Path, weights: list[list[float]]) -> Path:
    """A copy of the model whose factory blend weights are `weights` (what training would have
    chosen on other data)."""
    shutil.copytree(source, target)
    meta = orjson.loads((target / "model.json").read_bytes())
    meta.pop("blends")  # the format of models trained before mixtures: `weights`, one part
    meta["weights"] = weights
    (target / "model.json").write_bytes(orjson.dumps(meta))
    return target


def test_onnx_export_scores_exactly_as_the_factory_with_its_chunks_and_labels(
        minilm_dir: Path, tmp_path: Path) -> None:
    report = export(minilm_dir, "ft:classifier:local-minilm:abc", "onnx", tmp_path)
    assert report == orjson.loads((tmp_path / EXPORT_FILE).read_bytes())
    (target,) = report["targets"]
    assert target["labels"] == ["negative", "positive"] and target["matches_factory"]
    assert target["notes"] == [] and report["figures"]["targets"]["sentiment"]["blend_max"] == 0
    directory = tmp_path / target["directory"]
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
            "kserve_model.py"} <= {p.name for p in directory.iterdir()}
    config = orjson.loads((directory / "config.json").read_bytes())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["classifier_gateway"]["max_chunks"] == MAX_CHUNKS

    factory = MiniLMModel.load(minilm_dir)
    served = ExportedModel(directory)
    assert served.labels == ["negative", "positive"]
    assert len(served.chunks([TEXTS[-2]])[0]) == 6  # the long text: 646 tokens, 6 chunks
    expected = factory.predict_proba(TEXTS)[0]
    assert np.abs(served.probabilities(TEXTS) - expected).max() < 1e-6
    # One text at a time too: alone or in a batch, the same scores on both sides.
    single = np.vstack([served.probabilities([t]) for t in TEXTS[:5]])
    assert np.abs(single - np.vstack([factory.predict_proba([t])[0] for t in TEXTS[:5]])
                  ).max() < 1e-6


def test_an_encoder_weight_without_ngram_weight_is_folded_into_the_graph(
        minilm_dir: Path, tmp_path: Path) -> None:
    scaled = _with_weights(minilm_dir, tmp_path / "scaled", [[1.5, 0.0]])
    report = export(scaled, "m", "onnx", tmp_path / "out")
    assert report["targets"][0]["matches_factory"]
    expected = MiniLMModel.load(scaled).predict_proba(TEXTS)[0]
    served = ExportedModel(tmp_path / "out" / "sentiment").probabilities(TEXTS)
    assert np.abs(served - expected).max() < 1e-6


def test_the_temperature_travels_with_the_export(minilm_dir: Path, tmp_path: Path) -> None:
    """A calibrated model (T = 2.5 on an encoder weight of 1.5): the ONNX graph's factor is
    1.5 / 2.5 and answers the factory's calibrated scores, the HF head is scaled the same way,
    and a model saved before calibration (no `temperatures`) keeps its scores."""
    plain = _with_weights(minilm_dir, tmp_path / "plain", [[1.5, 0.0]])
    hot = _with_weights(minilm_dir, tmp_path / "hot", [[1.5, 0.0]])
    meta = orjson.loads((hot / "model.json").read_bytes())
    meta["temperatures"] = [2.5]
    (hot / "model.json").write_bytes(orjson.dumps(meta))
    factory = MiniLMModel.load(hot).predict_proba(TEXTS)[0]
    uncalibrated = MiniLMModel.load(plain).predict_proba(TEXTS)[0]
    assert np.abs(factory - uncalibrated).max() > 0.01  # the temperature changes the scores
    assert (factory.argmax(axis=1) == uncalibrated.argmax(axis=1)).all()  # not the answers

    (target,) = export(hot, "m", "onnx", tmp_path / "onnx")["targets"]
    assert target["matches_factory"]
    config = orjson.loads((tmp_path / "onnx" / "sentiment" / "config.json").read_bytes())
    assert config["classifier_gateway"]["temperature"] == 2.5
    assert config["classifier_gateway"]["logit_scale"] == pytest.approx(0.6)
    served = ExportedModel(tmp_path / "onnx" / "sentiment").probabilities(TEXTS)
    assert np.abs(served - factory).max() < 1e-6

    from safetensors.numpy import load_file

    export(hot, "m", "hf", tmp_path / "hf")
    head = load_file(str(tmp_path / "hf" / "sentiment" / "model.safetensors"))
    state = load_file(str(hot / FP32_FILE))
    assert np.allclose(head["classifier.weight"], state["head.weight"] * 0.6, atol=1e-6)
    assert np.allclose(head["classifier.bias"], state["head.bias"] * 0.6, atol=1e-6)

    # Saved before calibration: no key, T = 1, the same scores as ever.
    del meta["temperatures"]
    (hot / "model.json").write_bytes(orjson.dumps(meta))
    old = MiniLMModel.load(hot)
    assert old.temperatures == [1.0]
    assert np.array_equal(old.predict_proba(TEXTS)[0], uncalibrated)


def test_each_target_gets_its_own_columns_and_a_multi_label_target_its_sigmoids(
        minilm_dir: Path, tmp_path: Path) -> None:
    """The network's two logits declared as two one-label multi-label targets: each export
    directory carries its own column of the graph (a Slice) and scores it with a sigmoid, as the
    factory does."""
    two = tmp_path / "two"
    shutil.copytree(minilm_dir, two)
    meta = orjson.loads((two / "model.json").read_bytes())
    meta["heads"] = [{"name": "is negative", "labels": ["negative"],
                      "loss_function": "multi_class", "weight": 1.0},
                     {"name": "is positive", "labels": ["positive"],
                      "loss_function": "multi_class", "weight": 1.0}]
    meta["blends"] = [[[1.0, 1.0, 0.0]], [[1.0, 2.0, 0.0]]]
    meta["temperatures"] = [1.0, 0.5]
    (two / "model.json").write_bytes(orjson.dumps(meta))
    for fmt in ("onnx", "hf"):
        report = export(two, "m", fmt, tmp_path / fmt)
        assert [t["directory"] for t in report["targets"]] == ["is_negative", "is_positive"]
        config = orjson.loads((tmp_path / fmt / "is_positive" / "config.json").read_bytes())
        assert config["problem_type"] == "multi_label_classification"
        assert config["id2label"] == {"0": "positive"}
    factory = MiniLMModel.load(two).predict_proba(TEXTS)
    for k, directory in enumerate(("is_negative", "is_positive")):
        served = ExportedModel(tmp_path / "onnx" / directory).probabilities(TEXTS)
        assert served.shape == (len(TEXTS), 1)
        assert np.abs(served - factory[k]).max() < 1e-6


def test_a_blended_model_exports_its_encoder_and_says_how_far_that_is_from_the_factory(
        minilm_dir: Path, tmp_path: Path) -> None:
    blended = _with_weights(minilm_dir, tmp_path / "blended", [[0.75, 0.25]])
    meta = orjson.loads((blended / "model.json").read_bytes())
    meta["info"]["export_figures"]["targets"]["sentiment"]["blend_max"] = 0.034116
    (blended / "model.json").write_bytes(orjson.dumps(meta))
    (target,) = export(blended, "m", "onnx", tmp_path / "out")["targets"]
    assert not target["matches_factory"]
    (note,) = target["notes"]
    assert "encoder 0.75, n-gram 0.25" in note and "up to 0.034" in note
    assert "ngram_blend: false" in note and "--no-ngram-blend" in note
    # The encoder alone, unscaled: the export serves what the encoder was trained to answer.
    config = orjson.loads((tmp_path / "out" / "sentiment" / "config.json").read_bytes())
    assert config["classifier_gateway"]["logit_scale"] == 1.0


def test_hf_export_is_the_float32_network_for_transformers_with_remote_code(
        minilm_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = export(minilm_dir, "m", "hf", tmp_path)
    (target,) = report["targets"]
    (note,) = target["notes"]
    assert "float32" in note and "int8" in note and not target["matches_factory"]
    directory = tmp_path / target["directory"]
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert tokenizer.model_max_length == 128
    short = TEXTS[:40]
    batch = tokenizer(short, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.numpy()

    # The factory's own float32 network, rebuilt from the weights it kept.
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    meta = orjson.loads((minilm_dir / "model.json").read_bytes())
    network = Network(BertModel(BertConfig(**meta["encoder_config"])), 2)
    network.load_state_dict(load_file(str(minilm_dir / FP32_FILE)))
    expected = torch_logits(network, (minilm_dir / "tokenizer.json").read_text(), short,
                            128, MAX_CHUNKS)
    assert np.abs(logits - expected).max() < 1e-4

    # Against the factory's int8 answer: within what training measured, as the note says.
    factory = MiniLMModel.load(minilm_dir).predict_proba(short)[0]
    hf = torch.softmax(torch.from_numpy(logits), -1).numpy()
    figure = report["figures"]["targets"]["sentiment"]["int8_max"]
    print(f"hf float32 vs factory int8: max {np.abs(hf - factory).max():.5f}, training measured "
          f"{figure}")
    assert 0 < np.abs(hf - factory).max() < 0.05

    # Without remote code transformers refuses, instead of scoring with a random [CLS] pooler.
    with pytest.raises(ValueError):
        AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=False)


def test_what_cannot_be_exported_is_refused_with_the_reason_and_the_remedy(
        minilm_dir: Path, tmp_path: Path) -> None:
    ngram_dir = _train(NGram(), tmp_path / "ngram", 40)
    with pytest.raises(NotExportable, match=r"local-ngram model .*no inference server loads "
                                            r"that form.*fine-tune local-minilm"):
        export(ngram_dir, "ft:classifier:local-ngram:x", "onnx", tmp_path / "a")
    with pytest.raises(BadFormat, match="use one of onnx, hf"):
        export(minilm_dir, "m", "torchscript", tmp_path / "b")

    # A model from before float32 weights were kept: ONNX yes, HF no (and why).
    old = tmp_path / "old"
    shutil.copytree(minilm_dir, old)
    (old / FP32_FILE).unlink()
    with pytest.raises(NotExportable, match=r"trained before the factory kept float32 weights.*"
                                            r"--format onnx"):
        export(old, "m", "hf", tmp_path / "c")
    assert export(old, "m", "onnx", tmp_path / "d")["targets"][0]["matches_factory"]


def test_the_hf_note_follows_the_graph_the_factory_serves(minilm_dir: Path,
                                                          tmp_path: Path) -> None:
    """A model saved before `info.quantized` was recorded (all of them int8) keeps its note with
    its figure; a model served from a float32 graph (`quantize=False`) matches its HF export, so
    it gets no note."""
    def variant(name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
        target = tmp_path / name
        shutil.copytree(minilm_dir, target)
        meta = orjson.loads((target / "model.json").read_bytes())
        edit(meta)
        (target / "model.json").write_bytes(orjson.dumps(meta))
        return target

    def older(meta: dict[str, Any]) -> None:
        figures = meta["info"]["export_figures"]["targets"]["sentiment"]
        figures["int8_max"] = 0.061234
        del meta["info"]["quantized"]

    (target,) = export(variant("older", older), "m", "hf", tmp_path / "a")["targets"]
    (note,) = target["notes"]
    assert "int8" in note and "up to 0.061" in note and not target["matches_factory"]
    (target,) = export(variant("fp32", lambda m: m["info"].update(quantized=False)), "m", "hf",
                       tmp_path / "b")["targets"]
    assert target["notes"] == [] and target["matches_factory"]
