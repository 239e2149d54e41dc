"""`local-ngram`: features equal to scikit-learn's TF-IDF baseline's, a solver that reaches the
baseline's optimum, heads that mean what they say, hyperparameters that do what the docs say, and
models that survive a save and load (including models of the previous format)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_union

from service.factory.data import Example, TargetSpec
from service.factory.models.base import (
    Head,
    Hyperparameters,
    ModelFormatError,
    SilentControl,
    TrainingCancelled,
    TrainingData,
    TrainingSpec,
)
from service.factory.models.ngram import MIN_ITERATIONS, NGram, NGramModel, fit, iterations
from service.factory.models.ngram_features import Featurizer
from service.factory.models.ngram_v1 import Featurizer as LegacyFeaturizer
from service.factory.models.ngram_v1 import LegacyNGramModel
from service.factory.models.registry import default_registry
from service.factory.models.scoring import probabilities
from tests.support.factory import REPO, sentiment_rows

SENTIMENT = Head("sentiment", ("negative", "positive"), "single_class")
TEXTS = ["Hello wörld, how are you?", "short", "", "The  café's menu: 12 items!"]


def _examples(n: int = 200, seed: int = 0) -> list[Example]:
    return [Example(i, row["text"], row["labels"])
            for i, row in enumerate(sentiment_rows(n, seed))]


def test_features_are_the_same_in_another_process() -> None:
    """Python's `hash` changes per process; ours must not, or a reloaded model is garbage."""
    featurizer, _ = Featurizer.fit(TEXTS)
    here = featurizer.transform(TEXTS)
    code = ("from service.factory.models.ngram_features import Featurizer;"
            f"f, _ = Featurizer.fit({TEXTS!r}); x = f.transform({TEXTS!r});"
            "print(x.indices.tolist()); print(x.indptr.tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == str(here.indices.tolist()) and out[1] == str(here.indptr.tolist())


def test_features_are_those_of_the_scikit_learn_baseline() -> None:
    """Word 1-2 + char_wb 2-5 TF-IDF, exactly: the same vocabulary size and, row by row, the same
    values (column order aside), non-ASCII text, odd whitespace and unseen n-grams included."""
    texts = ["The quick brown fox jumps over the lazy dog, twice: quick quick!",
             "Über-café naïve résumé: 12 £ items\u2018ok\u2019 a I x_y", "", "  spaced\tout\n text "]
    featurizer, _ = Featurizer.fit(texts)
    reference = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                           TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5),
                                           sublinear_tf=True))
    expected = reference.fit_transform(texts)
    assert featurizer.columns == expected.shape[1]
    probe = ["a quick fox, unseen words", "naïve"]
    ours = np.sort(featurizer.transform(probe).toarray(), axis=1)
    theirs = np.sort(reference.transform(probe).toarray(), axis=1)
    assert np.allclose(ours, theirs, atol=1e-6)


def test_each_block_of_a_row_has_unit_norm_and_empty_text_is_empty() -> None:
    featurizer, x = Featurizer.fit(TEXTS)
    half = len(featurizer.words.vocabulary)
    for i in (0, 1, 3):
        row = x.getrow(i)
        for block in (row.indices < half, row.indices >= half):
            assert float(np.linalg.norm(row.data[block])) == pytest.approx(1.0, abs=1e-5)
    assert x.getrow(2).nnz == 0


def test_same_optimum_as_scikit_learn_on_the_same_features() -> None:
    """The solver is scikit-learn's; the model's probabilities are the baseline's on identical
    features, so 'never below the baseline' holds by construction, not by luck."""
    examples = _examples(300)
    model, _ = fit(examples, [SENTIMENT], Hyperparameters())
    featurizer, x = Featurizer.fit([e.text for e in examples])
    reference = LogisticRegression(C=10, max_iter=1000, tol=1e-8).fit(
        x, [e.labels["sentiment"] for e in examples])
    probe = ["the phone was great", "awful awful service", "a hotel"]
    ours = model.predict_proba(probe)[0][:, 1]
    theirs = reference.predict_proba(featurizer.transform(probe))[:, 1]
    assert np.allclose(ours, theirs, atol=2e-3)


def test_mistral_example_job_converges_and_learning_rate_changes_nothing() -> None:
    a, _ = fit(_examples(), [SENTIMENT], Hyperparameters(training_steps=100, learning_rate=4e-5))
    b, _ = fit(_examples(), [SENTIMENT], Hyperparameters(training_steps=100, learning_rate=1e-2,
                                                         warmup_fraction=0.5))
    assert a.info["iterations"] < 100  # stopped at convergence, not at the budget
    assert a.classify(TEXTS) == b.classify(TEXTS)


def test_budget_is_training_steps_or_epochs_with_a_floor() -> None:
    assert iterations(Hyperparameters(training_steps=500)) == 500
    assert iterations(Hyperparameters(training_steps=3)) == MIN_ITERATIONS
    assert iterations(Hyperparameters(epochs=50)) == 50
    assert iterations(Hyperparameters()) == 100


def test_weight_decay_is_the_inverse_of_c() -> None:
    loose, _ = fit(_examples(), [SENTIMENT], Hyperparameters(weight_decay=0.01))
    tight, _ = fit(_examples(), [SENTIMENT], Hyperparameters(weight_decay=1.0))
    assert loose.info["C"] == pytest.approx(100.0) and tight.info["C"] == pytest.approx(1.0)
    assert np.abs(tight.weights).sum() < np.abs(loose.weights).sum()


def test_scores_are_probabilities_and_training_learns() -> None:
    control = SilentControl()
    model, evaluation = fit(_examples(), [SENTIMENT], Hyperparameters(),
                            validation=_examples(60, seed=1), control=control)
    assert evaluation is not None and evaluation.targets["sentiment"]["macro_f1"] == 1.0
    (probs,) = model.predict_proba(["the car was fantastic and perfect", "useless and broken"])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert probs[0, 1] > 0.8 and probs[1, 0] > 0.8
    losses = [c.train_loss for c in control.checkpoints]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert all(c.valid_loss is not None for c in control.checkpoints)


def test_multi_label_head_uses_independent_sigmoids_and_targets_train_jointly() -> None:
    examples = []
    for i in range(120):
        tags = tuple(t for t, on in (("a", i % 2 == 0), ("b", i % 3 == 0)) if on) or ("c",)
        text = " ".join({"a": "apple", "b": "banana", "c": "cherry"}[t] for t in tags)
        labels: dict[str, str | tuple[str, ...]] = {"tags": tags}
        if i % 4:  # the second target labels only some examples
            labels["fruity"] = "yes" if "a" in tags else "no"
        examples.append(Example(i, f"{text} {i}", labels))
    heads = [Head("tags", ("a", "b", "c"), "multi_class"),
             Head("fruity", ("no", "yes"), "single_class")]
    model, _ = fit(examples, heads, Hyperparameters())
    tag_probs, fruity = model.predict_proba(["apple banana"])
    assert model.heads[0].labels == ("a", "b", "c")
    assert tag_probs[0, 0] > 0.5 and tag_probs[0, 1] > 0.5 and tag_probs[0, 2] < 0.5
    assert tag_probs.sum() > 1.0
    assert fruity[0, 1] > 0.5 and fruity.sum() == pytest.approx(1.0, abs=1e-5)


def test_save_and_load_give_identical_scores(tmp_path: Path) -> None:
    model, _ = fit(_examples(), [SENTIMENT], Hyperparameters(), kind="chat")
    model.save(tmp_path / "m")
    loaded = default_registry().load(tmp_path / "m")
    assert isinstance(loaded, NGramModel)
    assert loaded.classify(TEXTS) == model.classify(TEXTS)
    assert list(loaded.heads) == model.heads and loaded.kind == "chat"


def test_a_model_of_the_previous_format_still_loads_and_serves(tmp_path: Path) -> None:
    """Models trained before base models had names (format 1, no `base_model`) keep serving."""
    featurizer = LegacyFeaturizer()
    labels = 2
    row_of = np.full(1 << featurizer.bits, 2, dtype=np.int32)
    x = featurizer.transform(["great"])
    row_of[x.indices[0]] = 0
    row_of[x.indices[1]] = 1
    weights = np.array([[0.0, 5.0], [0.0, 5.0], [0.0, 0.0]], dtype=np.float32)
    legacy = LegacyNGramModel(featurizer, [SENTIMENT], row_of, weights,
                              np.zeros(labels, dtype=np.float32), {"kind": "text"})
    legacy.save(tmp_path / "old")
    loaded = default_registry().load(tmp_path / "old")
    assert isinstance(loaded, LegacyNGramModel)
    assert loaded.classify(["great", "nothing"]) == legacy.classify(["great", "nothing"])
    assert loaded.classify(["great"])[0]["sentiment"]["positive"] > 0.5


@pytest.mark.parametrize("damage", ["missing", "garbage", "future", "truncated"])
def test_a_damaged_model_directory_is_a_clear_format_error(tmp_path: Path, damage: str) -> None:
    model, _ = fit(_examples(), [SENTIMENT], Hyperparameters())
    directory = tmp_path / "m"
    model.save(directory)
    if damage == "missing":
        (directory / "model.json").unlink()
    elif damage == "garbage":
        (directory / "model.json").write_bytes(b"{not json")
    elif damage == "future":
        (directory / "model.json").write_bytes(b'{"format": 99, "base_model": "local-ngram"}')
    else:
        weights = directory / "ngram.npz"
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFormatError, match="train"):
        default_registry().load(directory)


def test_cancel_stops_training_with_the_protocols_exception() -> None:
    with pytest.raises(TrainingCancelled):
        fit(_examples(), [SENTIMENT], Hyperparameters(), control=SilentControl(cancel=True))


def test_base_model_protocol_trains_from_a_spec(tmp_path: Path) -> None:
    spec = TrainingSpec(base_model="local-ngram", kind="text",
                        targets=(TargetSpec("sentiment", SENTIMENT.labels, "single_class"),),
                        training_files=(), validation_files=(), hyperparameters=Hyperparameters(),
                        output_dir=str(tmp_path / "out"), checkpoints=3)
    assert TrainingSpec.from_json(spec.to_json()) == spec
    examples = _examples()
    # File weights count: the first half weighs 10x, so its labels dominate a contradiction.
    flipped = [Example(i, "ambiguous words", {"sentiment": "positive" if i < 100 else "negative"})
               for i in range(200)]
    model, _ = NGram().train(TrainingData([*examples, *flipped],
                                          [1.0] * 200 + [10.0] * 100 + [1.0] * 100),
                             spec, SilentControl())
    assert model.classify(["ambiguous words"])[0]["sentiment"]["positive"] > 0.8


def _spec(tmp_path: Path) -> TrainingSpec:
    return TrainingSpec(base_model="local-ngram", kind="text",
                        targets=(TargetSpec("sentiment", SENTIMENT.labels, "single_class"),),
                        training_files=(), validation_files=(), hyperparameters=Hyperparameters(),
                        output_dir=str(tmp_path / "out"))


def test_training_fits_a_temperature_on_a_held_out_slice_and_says_so(tmp_path: Path) -> None:
    """No validation file: 10% of 400 examples held out, a copy of the model fitted on the rest,
    T fitted on the slice; the served model is fitted on all 400, its argmax untouched."""
    control = SilentControl()
    examples = _examples(400, seed=3)
    model, evaluation = NGram().train(TrainingData(examples, [1.0] * 400), _spec(tmp_path),
                                      control)
    assert evaluation is None
    ((_, event),) = [e for e in control.events if e[0] == "calibration"]
    assert event["source"] == "held-out" and event["examples"] == 40
    report = event["targets"]["sentiment"]
    assert report["examples"] == 40 and report["temperature"] == round(model.temperatures[0], 6)
    assert report["ece_after"] <= report["ece_before"]
    assert model.info["calibration"] == event and model.info["examples"] == 400
    assert ("calibrating", 0, 40) in control.progressed
    texts = [e.text for e in _examples(50, seed=9)]
    raw = probabilities(model.heads, model.logits(texts))
    assert (model.predict_proba(texts)[0].argmax(axis=1) == raw[0].argmax(axis=1)).all()


def test_a_validation_file_is_what_the_temperature_is_fitted_on(tmp_path: Path) -> None:
    control = SilentControl()
    validation = _examples(60, seed=4)
    _, evaluation = NGram().train(TrainingData(_examples(100), [1.0] * 100, validation),
                                  _spec(tmp_path), control)
    event = dict(control.events)["calibration"]
    assert event["source"] == "validation" and event["examples"] == 60
    # The job's evaluation is of the calibrated model: its loss is the calibrated one.
    assert evaluation is not None and evaluation.loss == pytest.approx(
        event["targets"]["sentiment"]["nll_after"], abs=1e-5)


def test_few_examples_and_no_validation_file_keep_the_scores_as_trained(tmp_path: Path) -> None:
    control = SilentControl()
    model, _ = NGram().train(TrainingData(_examples(100), [1.0] * 100), _spec(tmp_path), control)
    event = dict(control.events)["calibration"]
    assert event["source"] == "none" and model.temperatures == [1.0]
    assert "validation file" in event["targets"]["sentiment"]["reason"]


def test_a_model_saved_without_temperatures_keeps_its_scores(tmp_path: Path) -> None:
    """A model written before calibration has no `temperatures` in model.json: it loads with
    T = 1 and answers exactly what it answered before; one written now keeps its T."""
    model, _ = fit(_examples(), [SENTIMENT], Hyperparameters())
    before = model.classify(TEXTS)  # T = 1: the scores of a model trained before this change
    model.save(tmp_path / "old")
    meta_path = tmp_path / "old" / "model.json"
    meta = orjson.loads(meta_path.read_bytes())
    del meta["temperatures"]
    meta_path.write_bytes(orjson.dumps(meta))
    old = default_registry().load(tmp_path / "old")
    assert isinstance(old, NGramModel) and old.temperatures == [1.0]
    assert old.classify(TEXTS) == before

    model.temperatures = [2.5]
    model.save(tmp_path / "new")
    new = default_registry().load(tmp_path / "new")
    assert isinstance(new, NGramModel) and new.temperatures == [2.5]
    assert new.classify(TEXTS) == model.classify(TEXTS) != before
