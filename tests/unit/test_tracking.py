"""The tracking seam without a tracker server: the key ring, the reporter keeping a failing
tracker from the job (its key scrubbed from the reason), the job's tracking thread keeping the
calls in order off the event loop, MLflow's bearer header sent for one job's calls only, and 422s
that never echo a secret."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from service.factory.errors import without_secrets
from service.factory.models.base import Hyperparameters, TrainingSpec
from service.factory.tracking import base, mlflow_run
from service.factory.tracking.base import RunContext
from service.factory.tracking.keys import KeyRing
from service.factory.tracking.reporter import JobTracking, Reporter, numbers

KEY = "secret-key-" + "s" * 30

#: This module is also a tracker kind for the tests below ("recording"); its package is one
#: that is always there.
PACKAGE = "json"
INSTALL = "nothing to install"
CALLS: list[tuple[str, Any]] = []


class _Recording:
    takes_model = True

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

    def finish(self, summary: Mapping[str, float], model_dir: Path | None,
               outcome: str) -> None:
        self._call("finish", (dict(summary), model_dir, outcome))


def open_run(config: Mapping[str, Any], api_key: str | None,
             context: RunContext) -> _Recording:
    assert api_key == KEY
    return _Recording(config.get("fail_on"))


SPEC = TrainingSpec(base_model="local-ngram", kind="text", targets=(), training_files=(),
                    validation_files=(), hyperparameters=Hyperparameters(training_steps=5),
                    output_dir="/nowhere")


def test_the_key_is_taken_once() -> None:
    ring = KeyRing()
    ring.keep("job-1", [None])  # no key: nothing kept
    ring.keep("job-2", [KEY, None])
    assert len(ring) == 1 and ring.take("job-1") == []
    keys = ring.take("job-2")
    assert keys == [KEY, None] and ring.take("job-2") == [] and len(ring) == 0


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> None:
    CALLS.clear()
    monkeypatch.setitem(base.TRACKERS, "recording", __name__)


@pytest.mark.usefixtures("recording")
def test_a_failing_tracker_is_left_out_and_its_reason_never_holds_the_key(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    reporter = Reporter("job-3", tmp_path, (
        {"type": "recording", "fail_on": "log"}, {"type": "recording"}, {"type": "comet"}),
        (KEY, KEY, None), lambda name, data: events.append((name, dict(data))))
    assert events == [("integration", {"type": "comet", "status": "unavailable",
                                       "reason": "no tracker for integrations of type 'comet'; "
                                                 "known: mlflow, recording, wandb"})]
    reporter.start(SPEC)
    reporter.checkpoint(1, {"train_loss": 0.5, "valid_loss": None})
    reporter.checkpoint(2, {"train_loss": 0.25})
    reporter.finish("SUCCESS", {"steps": 2, "stopped": "converged", "evaluation": {
        "valid_accuracy": 0.9, "targets": {"t": {"macro_f1": 0.8, "labels": ["a"]}}}},
        lambda: contextlib.nullcontext(tmp_path))
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
          "evaluation.targets.t.macro_f1": 0.8}, tmp_path, "SUCCESS")]


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


class _Slow(_Recording):
    """A tracker whose every call takes a while, as one over HTTP does."""

    def _call(self, name: str, value: Any) -> None:
        time.sleep(0.2)
        CALLS.append((name, (value, threading.current_thread().name)))


@pytest.mark.usefixtures("recording")
def test_a_jobs_tracking_runs_in_its_own_thread_in_order_and_the_loop_never_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracker calls block (MLflow's HTTP, W&B's probe): queued from the event loop, they run in
    the job's thread in their order, while the loop goes on; `finish` waits for all of them, says
    why a STOPPED run ends, and fetches no model for it."""
    monkeypatch.setattr(sys.modules[__name__], "open_run",
                        lambda config, api_key, context: _Slow(None))
    events: list[tuple[str, dict[str, Any]]] = []
    fetched: list[bool] = []

    def model() -> contextlib.AbstractContextManager[Path]:
        fetched.append(True)
        return contextlib.nullcontext(tmp_path)

    async def supervise() -> tuple[float, int]:
        tracking = JobTracking("job-4", tmp_path, [{"type": "recording"}], [KEY],
                               lambda name, data: events.append((name, dict(data))))
        began = time.monotonic()
        tracking.start(SPEC)
        for step in (1, 2, 3):
            tracking.checkpoint(step, {"train_loss": 1.0 / step})
        queued = time.monotonic() - began
        ticks = 0
        while time.monotonic() - began < 0.5:  # the loop runs while the tracker works
            await asyncio.sleep(0.01)
            ticks += 1
        await tracking.finish("STOPPED", model=model, note="the replica stopped")
        await tracking.finish("SUCCESS", model=model)  # once only
        return queued, ticks

    queued, ticks = asyncio.run(supervise())
    assert queued < 0.1 and ticks > 20, (queued, ticks)
    names = [name for name, _ in CALLS]
    assert names == ["start", "log", "log", "log", "finish"]
    threads = {thread for _, (_, thread) in CALLS}
    assert len(threads) == 1 and threads != {threading.main_thread().name}, threads
    assert [value for name, (value, _) in CALLS if name == "log"] == [
        (1, {"train_loss": 1.0}), (2, {"train_loss": 0.5}), (3, {"train_loss": 1.0 / 3})]
    assert CALLS[-1][1][0] == ({}, None, "STOPPED") and fetched == []
    assert events == [("integration", {"type": "recording", "status": "stopped",
                                       "reason": "the replica stopped"})]


class _Headers(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        _Headers.seen.append(self.headers.get("Authorization"))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_mlflow_sends_a_jobs_key_with_that_jobs_calls_only() -> None:
    """The key rides on MLflow's own request path (`http_request`, every REST and artifact call
    goes through it) as a bearer header, for the calls made within the job's block in its
    thread: not before, not after, not in another job's thread at the same time, and never in
    the process's environment (which every job and trainer child shares)."""
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Headers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    creds = MlflowHostCreds(  # type: ignore[no-untyped-call]
        f"http://127.0.0.1:{server.server_address[1]}")

    def search() -> None:
        http_request(creds, "/api/2.0/mlflow/experiments/search", "GET")  # type: ignore[no-untyped-call]

    _Headers.seen.clear()
    inside = threading.Event()
    other_done = threading.Event()

    def other_job() -> None:
        inside.wait(10)
        search()
        other_done.set()

    try:
        thread = threading.Thread(target=other_job)
        thread.start()
        with mlflow_run._bearer(KEY):
            inside.set()
            assert other_done.wait(10)
            assert "MLFLOW_TRACKING_TOKEN" not in os.environ
            search()
        search()
        thread.join(10)
    finally:
        server.shutdown()
        server.server_close()
    assert _Headers.seen == [None, f"Bearer {KEY}", None]


class _NumbersOnly(_Recording):
    takes_model = False


@pytest.mark.usefixtures("recording")
def test_the_model_is_fetched_only_for_a_tracker_that_takes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A W&B-only job ends without the model being read from the store (with S3, a download)."""
    monkeypatch.setattr(sys.modules[__name__], "open_run",
                        lambda config, api_key, context: _NumbersOnly(None))
    fetched: list[bool] = []

    def model() -> contextlib.AbstractContextManager[Path]:
        fetched.append(True)
        return contextlib.nullcontext(tmp_path)

    reporter = Reporter("job-5", tmp_path, [{"type": "recording"}], [], lambda n, d: None)
    reporter.finish("SUCCESS", {"steps": 3}, model)
    assert fetched == [] and CALLS == [("finish", ({"steps": 3.0}, None, "SUCCESS"))]
