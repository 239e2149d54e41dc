"""Pure parts of the CLI: tables, progress output, error messages, job summaries."""

from __future__ import annotations

import argparse
import io
from typing import Any

import httpx
import pytest

from service.commands.api import Upstream, error_message
from service.commands.errors import UserError
from service.commands.finetune import job_request, suffix_for
from service.commands.jobwatch import failure_reason, last_metrics, progress_line, total_steps
from service.commands.output import Progress, plural, table


def test_table_aligns_text_left_and_numbers_right() -> None:
    assert table(["label", "n", "score"], [("a", 5, 0.5), ("long label", 120, None)]).splitlines() == [
        "label         n   score",
        "a             5  0.5000",
        "long label  120       -",
    ]


def test_plural_takes_the_number_of_its_count() -> None:
    assert [plural(n, "valid example") for n in (0, 1, 2)] == [
        "0 valid examples", "1 valid example", "2 valid examples"]
    assert plural(3, "entry", "entries") == "3 entries" and plural(1, "entry", "entries") == (
        "1 entry")


def test_progress_prints_plain_lines_off_a_terminal_only_when_the_message_changes() -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=False)
    for message in ("QUEUED", "QUEUED", "RUNNING step 1/10", "RUNNING step 1/10", "SUCCESS"):
        progress.update(message, 1, 10)
    progress.close()
    assert stream.getvalue() == "QUEUED\nRUNNING step 1/10\nSUCCESS\n"


def test_progress_redraws_one_line_with_a_bar_on_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=True)
    progress.update("RUNNING", 5, 20)
    progress.update("SUCCESS", 20, 20)
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "\r[####............] RUNNING" in text
    assert "\r[################] SUCCESS" in text


def test_the_progress_bar_shows_the_elapsed_time_and_an_eta_from_the_steps_rate() -> None:
    """Issue 19: the first ETA (1:07:16) divided the minutes spent loading and probing among the
    first steps, for a job that took 23:49. The ETA is measured between steps only, from the
    second step seen on, over the recent ones."""
    now = [100.0]
    stream = io.StringIO()
    progress = Progress(stream, tty=True, clock=lambda: now[0])
    now[0] = 400.0  # five minutes queued, loading, tokenising and probing
    progress.update("RUNNING  step 1/43", 1, 43)
    assert stream.getvalue().rstrip().endswith("RUNNING  step 1/43  5:00 elapsed")  # no guess
    for step in range(2, 12):  # then 30 s a step
        now[0] += 30.0
        progress.update(f"RUNNING  step {step}/43", step, 43)
    assert stream.getvalue().rstrip().endswith("step 11/43  10:00 elapsed, ETA 16:00")
    now[0] += 10.0  # the time since the last step counts down
    progress.update("RUNNING  step 11/43", 11, 43)
    assert stream.getvalue().rstrip().endswith("step 11/43  10:10 elapsed, ETA 15:50")
    for step in range(12, 21):  # the machine gets busier: 60 s a step
        now[0] += 60.0 if step > 12 else 50.0
        progress.update(f"RUNNING  step {step}/43", step, 43)
    assert stream.getvalue().rstrip().endswith("step 20/43  19:00 elapsed, ETA 23:00")
    now[0] = 3_800.0
    progress.update("SUCCESS  step 43/43", 43, 43)
    assert stream.getvalue().rstrip().endswith("SUCCESS  step 43/43  1:01:40 elapsed")


@pytest.mark.parametrize(("body", "expected"), [
    ({"error": {"type": "unknown_task", "message": "Unknown task 'x'."}}, "Unknown task 'x'."),
    ({"object": "error", "message": "No such job", "type": "invalid_request_error"}, "No such job"),
    ({"detail": "Unauthorized"}, "Unauthorized"),
    ({"detail": [{"loc": ["body", "hyperparameters", "learning_rate"], "msg": "too big"}]},
     "hyperparameters.learning_rate: too big"),
])
def test_error_message_reads_every_error_shape(body: object, expected: str) -> None:
    assert error_message(httpx.Response(400, json=body)) == expected


def test_error_message_of_a_non_json_body() -> None:
    assert error_message(httpx.Response(502, text="<html>Bad Gateway</html>")) == \
        "<html>Bad Gateway</html>"


JOB = {
    "id": "0123456789abcdef", "status": "RUNNING", "hyperparameters": {"training_steps": 50},
    "checkpoints": [
        {"step_number": 40, "metrics": {"train_loss": 0.5, "valid_loss": 0.7}},
        {"step_number": 10, "metrics": {"train_loss": 1.5, "valid_loss": 1.7}},
    ],
}


def test_progress_line_shows_the_newest_checkpoint() -> None:
    assert last_metrics(JOB) == {"step": 40, "train_loss": 0.5, "valid_loss": 0.7}
    assert progress_line(JOB) == (
        "RUNNING  step 40/50  train loss 0.5000  valid loss 0.7000", 40, 50)
    assert progress_line({"id": "x", "status": "QUEUED", "hyperparameters": {}}) == (
        "QUEUED", None, None)


def test_progress_line_shows_the_phase_before_the_first_step_and_every_step() -> None:
    """Issue 19: 4.5 minutes of `RUNNING` with no step: the factory's `progress` says what the
    job does meanwhile, and every step, where checkpoints come a tenth of the way apart."""
    job: dict[str, Any] = {"status": "RUNNING", "hyperparameters": {}, "checkpoints": [],
           "metadata": {"train_tokens_per_step": 10, "train_tokens": 430},  # estimated: 43
           "progress": {"phase": "tokenising", "done": 0, "total": 405}}
    assert progress_line(job) == ("RUNNING  tokenising 405 texts", None, 43)
    job["progress"] = {"phase": "probing", "done": 64, "total": 405}
    assert progress_line(job) == ("RUNNING  probing 64/405", None, 43)
    # Training: the steps the model planned win over the estimate, and each step shows.
    job["progress"] = {"phase": "training", "done": 5, "total": 38, "step": 5, "total_steps": 38}
    job["checkpoints"] = [{"step_number": 4, "metrics": {"train_loss": 0.5}}]
    assert progress_line(job) == ("RUNNING  step 5/38  train loss 0.5000", 5, 38)
    job["progress"] = {"phase": "exporting", "done": None, "total": None, "step": 38,
                       "total_steps": 38}
    assert progress_line(job)[0] == "RUNNING  exporting  step 38/38  train loss 0.5000"
    job["status"], job["progress"]["phase"] = "SUCCESS", "done"
    assert progress_line(job) == ("SUCCESS  step 38/38  train loss 0.5000", 38, 38)


def test_failure_reason_from_a_message_or_the_last_event() -> None:
    assert failure_reason({"message": "out of memory"}) == "out of memory"
    assert failure_reason({"events": [
        {"name": "status-updated", "data": {"status": "RUNNING"}},
        {"name": "status-updated", "data": {"status": "FAILED", "error": "diverged"}}]}) == "diverged"
    assert failure_reason({}) == "the server gave no reason"


def test_job_request_sends_only_given_hyperparameters_and_a_safe_suffix() -> None:
    args = argparse.Namespace(training_steps=5, learning_rate=None, weight_decay=None,
                              warmup_fraction=0.1, model=None, suffix=None,
                              task="News Topics (BBC) 2025", no_ngram_blend=False)
    body = job_request(args, Upstream("local", "http://x", "FACTORY_API_KEY"), ["f1"], None)
    assert body["hyperparameters"] == {"training_steps": 5, "warmup_fraction": 0.1}
    assert body["model"] == "local-ngram" and body["job_type"] == "classifier"
    assert body["training_files"] == [{"file_id": "f1", "weight": 1.0}]
    assert body["validation_files"] == []
    assert body["suffix"] == "news-topics-bbc-20" and len(body["suffix"]) <= 18
    assert suffix_for("!!!") == "classifier"


def test_no_ngram_blend_is_a_factory_hyperparameter_that_mistral_is_never_sent() -> None:
    args = argparse.Namespace(training_steps=None, learning_rate=None, weight_decay=None,
                              warmup_fraction=None, model="local-minilm", suffix=None,
                              task="t", no_ngram_blend=True)
    body = job_request(args, Upstream("local", "http://x", "FACTORY_API_KEY"), ["f1"], None)
    assert body["hyperparameters"] == {"ngram_blend": False}
    with pytest.raises(UserError, match="Mistral's API does not take it"):
        job_request(args, Upstream("mistral", "http://x", "MISTRAL_API_KEY"), ["f1"], None)


def test_total_steps_as_requested_or_as_the_upstream_planned_them() -> None:
    assert total_steps({"hyperparameters": {"training_steps": 30}}) == 30
    assert total_steps({"hyperparameters": {"training_steps": None},
                        "metadata": {"train_tokens_per_step": 1000, "train_tokens": 100_000}}) == 100
    assert total_steps({"hyperparameters": {}, "metadata": None}) is None


def test_a_jobs_duration_is_its_own_not_the_time_it_was_watched() -> None:
    """`jobs wait` on a job that ended long ago printed "SUCCESS in 0s" (the watch took no time);
    the duration is the job's, from its creation to its final status."""
    from service.commands.jobwatch import duration_text, job_duration_s

    job = {"created_at": 1_000, "modified_at": 5_000, "events": [
        {"name": "status-updated", "data": {"status": "RUNNING"}, "created_at": 1_010},
        {"name": "status-updated", "data": {"status": "SUCCESS"}, "created_at": 1_200},
        {"name": "checkpoint", "data": {}, "created_at": 1_300}]}
    assert job_duration_s(job) == 200
    assert duration_text(200) == "3m 20s"
    assert job_duration_s({"created_at": 1_000, "modified_at": 1_019}) == 19  # no events: Mistral's list
    assert duration_text(19) == "19s" and duration_text(3_725) == "1h 02m"
    assert job_duration_s({"modified_at": 1_019}) is None


def test_the_kind_of_a_training_example() -> None:
    from service.commands.jobwatch import kind_of_example

    assert kind_of_example(b'{"messages": [{"role": "user", "content": "hi"}], "labels": {}}') == "chat"
    assert kind_of_example(b'{"text": "hi", "labels": {"a": "b"}}') == "text"
    assert kind_of_example(b"not json") is None


def test_jobs_get_shows_the_hyperparameters_duration_and_final_evaluation() -> None:
    from service.commands.jobs import describe_job

    job = {"id": "j1", "status": "SUCCESS", "model": "local-ngram", "fine_tuned_model": "ft:x",
           "created_at": 1_000, "modified_at": 1_019, "hyperparameters": {"training_steps": 100,
                                                                         "learning_rate": 0.0001},
           "evaluation": {"targets": {"topic": {"accuracy": 0.96875, "macro_f1": 0.9685,
                                                "examples": 192}}}}
    text = describe_job(job)
    assert "created: 1970-01-01 00:16:40 UTC, modified: 1970-01-01 00:16:59 UTC, took 19s" in text
    assert "  hyperparameters: learning_rate=0.0001, training_steps=100\n" in text
    assert ("  final model, target topic: accuracy 0.9688, macro F1 0.9685 on 192 validation "
            "examples" in text)
    assert "hyperparameters: the upstream's defaults" in describe_job({**job,
                                                                       "hyperparameters": {}})


def test_jobs_get_shows_the_calibration_per_target() -> None:
    from service.commands.jobs import describe_job

    job = {"id": "j1", "status": "SUCCESS", "model": "local-minilm", "hyperparameters": {},
           "calibration": {"method": "temperature", "source": "held-out", "examples": 300,
                           "ece_bins": 15, "targets": {
                               "intent": {"temperature": 0.61234, "examples": 300,
                                          "ece_before": 0.0581, "ece_after": 0.0172},
                               "tags": {"temperature": 1.0, "examples": 12,
                                        "reason": "fewer than 20 labelled examples"}}}}
    text = describe_job(job)
    assert ("  calibration, target intent: temperature 0.6123, ECE 0.0581 -> 0.0172 on 300 "
            "examples of a held-out training slice\n" in text)
    assert ("  calibration, target tags: temperature 1.0000 (not fitted: fewer than 20 "
            "labelled examples)" in text)
    assert "calibration" not in describe_job({**job, "calibration": None})


def test_one_accuracy_is_printed_for_a_run_labelled_for_what_it_measured(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19: `valid accuracy 0.9600` (the last checkpoint, measured during training) was
    printed above the final model's `accuracy 1.0000`. With a final evaluation (the local
    factory) only the final model's accuracy is printed; without one (Mistral's API), the
    checkpoint's, on the checkpoint's line."""
    from service.commands.jobwatch import evaluation_lines, print_metrics

    metrics = {"step": 38, "train_loss": 0.07, "valid_loss": 0.15,
               "valid_mean_token_accuracy": 0.96}
    final = {"evaluation": {"targets": {"topic": {"accuracy": 1.0, "macro_f1": 1.0,
                                                  "examples": 50}}}}
    print_metrics(metrics, evaluation_lines(final))
    assert capsys.readouterr().out == (
        "  last checkpoint (step 38, during training): train loss 0.0700, valid loss 0.1500\n"
        "  final model, target topic: accuracy 1.0000, macro F1 1.0000 on 50 validation "
        "examples\n")
    print_metrics(metrics, evaluation_lines({}))
    assert capsys.readouterr().out == (
        "  last checkpoint (step 38, during training): train loss 0.0700, valid loss 0.1500, "
        "valid accuracy 0.9600\n")
