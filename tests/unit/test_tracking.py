"""The tracking seam without a tracker server: the key's handoff, the reporter keeping a failing
tracker from the job (its key scrubbed from the reason), and 422s that never echo a secret."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from service.factory.errors import without_secrets
from service.factory.models.base import Hyperparameters, TrainingSpec
from service.factory.tracking import base
from service.factory.tracking.base import RunContext
from service.factory.tracking.keys import HANDOFF_ENV, Handoff, KeyRing, handoff_env, take_handoff
from service.factory.tracking.reporter import Reporter, numbers

KEY = "secret-key-" + "s" * 30

#: This module is also a tracker kind for the tests below ("recording"); its package is one
#: that is always there.
PACKAGE = "json"
INSTALL = "nothing to install"
CALLS: list[tuple[str, Any]] = []


class _Recording:
    def __init__(self, fail_on: str | None) -> None:
        self.fail_on = fail_on

    def _call(self, name: str, value: Any) -> None:
        if name == self.fail_on:
            raise RuntimeError(f"the server refused key {KEY}")
        CALLS.append((name, value))

    def start(self, params: Mapping[str, Any]) -> None:
        self._call("start", dict(params))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._call("log", (step, dict(metrics)))

    def finish(self, summary: Mapping[str, float], model_dir: Path | None, ok: bool) -> None:
        self._call("finish", (dict(summary), model_dir, ok))


def open_run(config: Mapping[str, Any], api_key: str | None,
             context: RunContext) -> _Recording:
    assert api_key == KEY
    return _Recording(config.get("fail_on"))


SPEC = TrainingSpec(base_model="local-ngram", kind="text", targets=(), training_files=(),
                    validation_files=(), hyperparameters=Hyperparameters(training_steps=5),
                    output_dir="/nowhere")


def test_the_key_is_handed_over_once_and_leaves_the_environment(tmp_path: Path) -> None:
    ring = KeyRing()
    ring.keep("job-1", [None])  # no key: nothing kept
    ring.keep("job-2", [KEY, None])
    assert len(ring) == 1 and ring.take("job-1") == []
    keys = ring.take("job-2")
    assert keys == [KEY, None] and ring.take("job-2") == [] and len(ring) == 0
    assert handoff_env("job-2", [], keys, tmp_path) == {}
    env = handoff_env("job-2", [{"type": "wandb", "project": "p"}, {"type": "mlflow"}], keys,
                      tmp_path)
    handoff = take_handoff(env)
    assert handoff == Handoff("job-2", tmp_path, ({"type": "wandb", "project": "p"},
                                                  {"type": "mlflow"}), (KEY, None))
    assert HANDOFF_ENV not in env and take_handoff(env) is None


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> None:
    CALLS.clear()
    monkeypatch.setitem(base.TRACKERS, "recording", __name__)


@pytest.mark.usefixtures("recording")
def test_a_failing_tracker_is_left_out_and_its_reason_never_holds_the_key(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    reporter = Reporter(Handoff("job-3", tmp_path, (
        {"type": "recording", "fail_on": "log"}, {"type": "recording"}, {"type": "comet"}),
        (KEY, KEY, None)), lambda name, data: events.append((name, dict(data))))
    assert events == [("integration", {"type": "comet", "status": "unavailable",
                                       "reason": "no tracker for integrations of type 'comet'; "
                                                 "known: mlflow, recording, wandb"})]
    reporter.start(SPEC)
    reporter.checkpoint(1, {"train_loss": 0.5, "valid_loss": None})
    reporter.checkpoint(2, {"train_loss": 0.25})
    reporter.finish({"steps": 2, "stopped": "converged", "evaluation": {
        "valid_accuracy": 0.9, "targets": {"t": {"macro_f1": 0.8, "labels": ["a"]}}}},
        tmp_path)
    failed = events[1]
    assert failed == ("integration", {"type": "recording", "status": "failed",
                                      "reason": "RuntimeError: the server refused key [key]"})
    assert len(events) == 2  # the failing tracker was not called again
    # The other tracker saw the whole run; each of them was opened and started.
    starts = [value for name, value in CALLS if name == "start"]
    assert len(starts) == 2 and starts[0]["hyperparameters.training_steps"] == 5
    assert starts[0]["base_model"] == "local-ngram"
    assert [value for name, value in CALLS if name == "log"] == [
        (1, {"train_loss": 0.5}), (2, {"train_loss": 0.25})]
    assert [value for name, value in CALLS if name == "finish"] == [
        ({"steps": 2.0, "evaluation.valid_accuracy": 0.9,
          "evaluation.targets.t.macro_f1": 0.8}, tmp_path, True)]


def test_numbers_flatten_a_nested_evaluation() -> None:
    assert numbers({"a": 1, "b": {"c": 0.5, "d": "text", "e": True}, "f": None}) == \
        {"a": 1.0, "b.c": 0.5}


def test_a_422_never_echoes_a_key_nor_a_urls_password() -> None:
    errors = [
        {"type": "missing", "loc": ("body", "integrations", 0, "wandb", "project"),
         "input": {"type": "wandb", "api_key": KEY}},
        {"type": "string_too_long", "loc": ("body", "integrations", 0, "wandb", "api_key"),
         "input": KEY, "ctx": {"max_length": 512}},
        {"type": "string_pattern_mismatch",
         "loc": ("body", "integrations", 0, "mlflow", "tracking_uri"),
         "input": "http://user:pw@host/x"},
    ]
    cleaned = without_secrets(errors)
    assert KEY not in repr(cleaned) and "pw@" not in repr(cleaned)
    assert cleaned[0]["input"] == {"type": "wandb", "api_key": "[hidden]"}
    assert cleaned[1]["input"] == "[hidden]" and "ctx" not in cleaned[1]
    assert cleaned[2]["input"] == "http://[hidden]@host/x"
