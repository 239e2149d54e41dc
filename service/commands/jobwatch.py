"""Watching a fine-tuning job to its end, and registering its model under a task.

`finetune` does this after creating its job, `jobs wait` for a job started earlier (`finetune
--no-wait`, or after a Ctrl-C answered "no"), so that both report and register alike.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from service.commands import tasksfile
from service.commands.api import Api, Upstream, gateway_api
from service.commands.errors import TransientError, UserError
from service.commands.output import Progress, print_json
from service.commands.served import wait_until_served

FINAL_STATUSES = ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED")



def get_job(api: Any, job_id: str) -> dict[str, Any]:
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}")
    if not isinstance(job, dict) or "status" not in job:
        raise UserError(f"{api.what} returned no job for {job_id}")
    return job


def last_metrics(job: dict[str, Any]) -> dict[str, Any]:
    """The newest checkpoint's metrics, with its step (checkpoints may come in any order)."""
    checkpoints = [c for c in job.get("checkpoints") or [] if isinstance(c, dict)]
    if not checkpoints:
        return {}
    newest = max(checkpoints, key=lambda c: c.get("step_number") or 0)
    return {"step": newest.get("step_number"), **(newest.get("metrics") or {})}


def failure_reason(job: dict[str, Any]) -> str:
    """Why a job ended badly, from whatever the server tells (message field, or the last event
    that carries an error)."""
    for key in ("message", "error"):
        value = job.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and value.get("message"):
            return str(value["message"])
    for event in reversed(job.get("events") or []):
        data = event.get("data") if isinstance(event, dict) else None
        if isinstance(data, dict):
            for key in ("error", "message", "reason"):
                if data.get(key):
                    return str(data[key])
    return "the server gave no reason"


def job_progress(job: dict[str, Any]) -> dict[str, Any]:
    """The local factory's `progress` of a job (its phase, and its steps as the model planned
    them); empty from Mistral's API, which has none."""
    progress = job.get("progress")
    return progress if isinstance(progress, dict) else {}


def total_steps(job: dict[str, Any]) -> int | None:
    """The job's number of steps: as the model planned them (the local factory says so once
    training starts), else as requested, or else as the upstream estimated it (Mistral's job
    metadata gives tokens per step and tokens in all, once the job is validated)."""
    planned = job_progress(job).get("total_steps")
    if isinstance(planned, int) and planned > 0:
        return planned
    steps = (job.get("hyperparameters") or {}).get("training_steps")
    if isinstance(steps, int):
        return steps
    metadata = job.get("metadata") or {}
    per_step, tokens = metadata.get("train_tokens_per_step"), metadata.get("train_tokens")
    if isinstance(per_step, int | float) and isinstance(tokens, int | float) and per_step > 0:
        return round(tokens / per_step)
    return None


def current_step(job: dict[str, Any]) -> int | None:
    """The newest step the job reported: its progress (every step) or its newest checkpoint
    (a tenth of the way apart), whichever is further."""
    steps = [s for s in (job_progress(job).get("step"), last_metrics(job).get("step"))
             if isinstance(s, int)]
    return max(steps) if steps else None


def phase_text(job: dict[str, Any]) -> str | None:
    """What a running job does besides its steps (reading, loading, tokenising 405 texts,
    probing 64/405, exporting, ...): minutes may pass there before the first step."""
    progress = job_progress(job)
    phase = progress.get("phase")
    if job.get("status") != "RUNNING" or not isinstance(phase, str) or phase in ("training",
                                                                                 "done"):
        return None
    done, total = progress.get("done"), progress.get("total")
    if isinstance(total, int) and isinstance(done, int) and done > 0:
        return f"{phase} {done}/{total}"
    if isinstance(total, int):
        unit = "texts" if phase in ("tokenising", "featurising") else "examples"
        return f"{phase} {total} {unit}"
    return phase


def progress_line(job: dict[str, Any]) -> tuple[str, int | None, int | None]:
    metrics = last_metrics(job)
    total = total_steps(job)
    step = current_step(job)
    parts = [str(job.get("status"))]  # the job's id is on the line before, `job ... created`
    phase = phase_text(job)
    if phase:
        parts.append(phase)
    if step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    for key, name in (("train_loss", "train loss"), ("valid_loss", "valid loss")):
        if isinstance(metrics.get(key), int | float):
            parts.append(f"{name} {metrics[key]:.4f}")
    status = job.get("status")
    done = total if status == "SUCCESS" else step
    return "  ".join(parts), done if isinstance(done, int) else None, total


#: How long `watch` keeps polling through transient errors before it gives up.
TRANSIENT_PATIENCE_S = 60.0


def watch(api: Api, job_id: str, progress: Progress, poll_interval: float,
          patience_s: float = TRANSIENT_PATIENCE_S, follow_up: str | None = None
          ) -> dict[str, Any]:
    """Poll the job until it ends. Starts it if the upstream validated it but did not start it.
    A failing poll (server restarting, rate limit) is retried for `patience_s`: the job runs on
    the server either way, and giving up would leave it unregistered."""
    started = False
    failing_since: float | None = None
    while True:
        try:
            job = get_job(api, job_id)
        except TransientError as exc:
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > patience_s:
                progress.close()
                raise UserError(f"{exc} (for {patience_s:.0f}s while watching job {job_id}; it "
                                f"may still run: "
                                f"`{follow_up or f'classifier-gateway jobs wait {job_id}'}`)"
                                ) from None
            progress.update(f"{exc}; retrying")
            time.sleep(min(max(poll_interval, 0.5) * 2, 10.0))
            continue
        failing_since = None
        if job.get("status") == "VALIDATED" and not started and not job.get("auto_start"):
            job = api.post(f"/v1/fine_tuning/jobs/{job_id}/start")
            started = True
        message, done, total = progress_line(job)
        progress.update(message, done, total)
        if job.get("status") in FINAL_STATUSES:
            progress.close()
            return job
        time.sleep(poll_interval)


def ask(question: str) -> bool:
    """Yes/no on the terminal; anything but yes (or no answer at all) is no."""
    sys.stderr.write(question)
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except (KeyboardInterrupt, OSError):
        answer = ""
    if not answer:
        sys.stderr.write("\n")
    return answer.strip().lower() in ("y", "yes")


def watch_interactively(api: Api, job_id: str, args: argparse.Namespace,
                        follow_up: str) -> dict[str, Any] | None:
    """`watch`, with Ctrl-C offering to cancel. Returns the ended job, or None when the user
    stopped watching a job that goes on (or cancelled it).

    The question may stay open for minutes while the job runs on: a job that ended meanwhile is
    returned whatever the answer, so that its model is still registered (a "yes" that comes too
    late says so instead of failing on the upstream's 409)."""
    progress = Progress()
    interval = args.poll_interval or (5.0 if args.upstream == "mistral" else 1.0)
    try:
        return watch(api, job_id, progress, interval, follow_up=follow_up)
    except KeyboardInterrupt:
        progress.close()
        cancel = ask(f"Cancel job {job_id}? [y/N] ")
    try:
        job = get_job(api, job_id)
    except UserError:  # the upstream cannot say now: act on the answer alone
        job = {"id": job_id, "status": None}
    if job.get("status") not in FINAL_STATUSES and cancel:
        try:
            job = api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        except UserError:  # most likely a 409: it ended between the two requests
            job = get_job(api, job_id)
            if job.get("status") not in FINAL_STATUSES:
                raise
        else:
            print(f"job {job_id}: "
                  f"{job.get('status') if isinstance(job, dict) else 'cancelled'}",
                  file=sys.stderr)
            return None
    status = job.get("status")
    if status in FINAL_STATUSES:
        print(f"job {job_id} ended {status} while the question was open"
              + ("; too late to cancel it" if cancel else ""), file=sys.stderr)
        return job
    print(f"job {job_id} keeps running; follow it with `{follow_up}`", file=sys.stderr)
    return None


def warn_if_elsewhere(path: Path, upstream: Upstream) -> None:
    """The tasks file's upstream of that name wins (an operator may route it through a proxy),
    but if it points somewhere else than where the model was trained, the gateway may not find
    the model: say so."""
    if not path.exists():
        return
    existing = tasksfile.load(path).upstreams.get(upstream.name)
    if existing is not None and existing.base_url != upstream.base_url:
        print(f"note: upstream {upstream.name!r} in {path} is {existing.base_url}, but this model "
              f"was trained on {upstream.base_url}; change it there if the gateway should ask "
              "the latter", file=sys.stderr)


def job_duration_s(job: dict[str, Any]) -> float | None:
    """How long the job took, from its creation to its final status: its own figure, not the time
    this command watched it (a job waited for may have ended long before)."""
    created = job.get("created_at")
    if not isinstance(created, int | float):
        return None
    ended: list[float] = [e["created_at"] for e in job.get("events") or []
                          if isinstance(e, dict) and e.get("name") == "status-updated"
                          and (e.get("data") or {}).get("status") in FINAL_STATUSES
                          and isinstance(e.get("created_at"), int | float)]
    end = max(ended) if ended else job.get("modified_at")
    if not isinstance(end, int | float) or end < created:
        return None
    return float(end - created)


def duration_text(seconds: float) -> str:
    """19s, 4m 05s, 1h 02m: short, and exact enough for a training run."""
    whole = round(seconds)
    if whole < 90:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def kind_of_example(line: bytes) -> str | None:
    """text or chat, from one JSONL training example."""
    try:
        example = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(example, dict):
        if "messages" in example:
            return "chat"
        if "text" in example:
            return "text"
    return None


def job_kind(api: Api, job: dict[str, Any]) -> str | None:
    """Whether the job's model classifies texts or conversations, from what it was trained on:
    the local factory says so in the job's validation reports and on the model; Mistral's API does
    not, so the first example of the training file tells."""
    for report in (job.get("validation") or {}).values():
        if isinstance(report, dict) and report.get("kind") in ("text", "chat"):
            return str(report["kind"])
    files = [f if isinstance(f, str) else (f or {}).get("file_id")
             for f in job.get("training_files") or []]
    for file_id in files:
        if not isinstance(file_id, str):
            continue
        try:
            line = api.first_line(f"/v1/files/{file_id}/content")
        except UserError:
            continue
        kind = kind_of_example(line)
        if kind:
            return kind
    return None


def resolve_kind(api: Api, job: dict[str, Any], asked: str | None) -> str:
    """The task's kind: the job's own, which `--kind` may state but not contradict (a chat model
    registered as a text task answers every `classify-chat` with 400)."""
    found = job_kind(api, job)
    if asked and found and asked != found:
        raise UserError(f"job {job.get('id')} was trained on {found} data, not {asked}: drop "
                        f"--kind (the job's kind is used), or pass --kind {found}")
    kind = asked or found
    if kind is None:
        raise UserError(f"cannot tell whether job {job.get('id')} was trained on text or chat "
                        "data; pass --kind text or --kind chat")
    return kind


def evaluation_lines(job: dict[str, Any]) -> list[str]:
    """The final evaluation on the validation files, one line per target: the local factory's
    extra (Mistral's API reports only the checkpoints' metrics). It scores the model as it is
    served, on every validation example; a checkpoint's metrics are measured during training
    (for `local-minilm`, on the float32 encoder alone, without the n-gram blend or int8, and on
    at most 128 validation examples), so the two accuracies can differ: hence the labels."""
    evaluation = job.get("evaluation")
    lines = []
    if isinstance(evaluation, dict):
        for target, scores in (evaluation.get("targets") or {}).items():
            if isinstance(scores, dict) and "accuracy" in scores:
                extra = (f", macro F1 {scores['macro_f1']:.4f}"
                         if isinstance(scores.get("macro_f1"), int | float) else "")
                lines.append(f"final model, target {target}: accuracy "
                             f"{scores['accuracy']:.4f}{extra} on {scores.get('examples')} "
                             "validation examples")
    return lines


def print_metrics(metrics: dict[str, Any], evaluation: list[str]) -> None:
    """The last checkpoint's losses, then the final model's evaluation when the upstream made
    one. One accuracy only: the final model's when there is one (it is what the task will
    answer with), else the checkpoint's (Mistral's API), each labelled for what it measured."""
    keys = [("train_loss", "train loss"), ("valid_loss", "valid loss")]
    if not evaluation:
        keys.append(("valid_mean_token_accuracy", "valid accuracy"))
    shown = [f"{name} {metrics[key]:.4f}" for key, name in keys
             if isinstance(metrics.get(key), int | float)]
    if shown:
        print(f"  last checkpoint (step {metrics.get('step')}, during training): "
              + ", ".join(shown))
    for line in evaluation:
        print(f"  {line}")


def finish(args: argparse.Namespace, job: dict[str, Any], upstream: Upstream | str,
           kind: str, multi_label: list[str]) -> int:
    """Report the outcome; on SUCCESS register the model under the task, and return once the
    running gateway serves it (or say why it does not)."""
    job_id = job.get("id")
    status = job.get("status")
    if status != "SUCCESS":
        if args.json:
            print_json({"job": job})
        if status == "CANCELLED":
            raise UserError(f"job {job_id} was cancelled; nothing registered")
        raise UserError(f"job {job_id} {status}: {failure_reason(job)}")
    model = job.get("fine_tuned_model")
    if not model:
        raise UserError(f"job {job_id} succeeded but names no fine_tuned_model; see "
                        f"`classifier-gateway jobs get {job_id}`")
    targets = job.get("classifier_targets") or []
    if targets:
        multi_label = [t["name"] for t in targets
                       if isinstance(t, dict) and t.get("loss_function") == "multi_class"]
    tasks_path = args.tasks.absolute()
    if isinstance(upstream, Upstream):
        warn_if_elsewhere(tasks_path, upstream)
    canary = getattr(args, "canary", None)
    if canary is not None:
        tasksfile.set_canary(tasks_path, args.task, upstream, model=str(model), weight=canary)
    else:
        tasksfile.register_task(tasks_path, args.task, upstream, model=model, kind=kind,
                                multi_label_targets=multi_label)
    row = next(r for r in tasksfile.task_rows(tasks_path) if r["name"] == args.task)
    metrics = last_metrics(job)
    with gateway_api(args, timeout_s=5.0) as gateway:
        served = wait_until_served(gateway, args.task, str(model), tasks_path)
    if served.note:
        print(f"note: {served.note}", file=sys.stderr)
    if args.json:
        print_json({"job": job, "metrics": metrics, "task": row, "tasks_file": str(tasks_path),
                    "gateway": served.to_dict()})
        return 0
    took = job_duration_s(job)
    print(f"job {job_id} SUCCESS" + (f" in {duration_text(took)}" if took is not None else ""))
    stopped = job_progress(job).get("stopped")
    step, total = current_step(job), total_steps(job)
    if stopped and step is not None and total is not None and step < total:
        print(f"  stopped at step {step} of {total}: {stopped}")
    print_metrics(metrics, evaluation_lines(job))
    print(f"  model: {model}")
    if canary is not None:
        print(f"task {args.task}: canary {model} answers {canary:g} of its items (its model "
              f"stays {row['model']}); `tasks promote {args.task}` when it has proven itself; "
              f"saved in {tasks_path}")
    else:
        print(f"task {args.task} -> {model} on {row['upstream']} ({row['kind']}), saved in "
              f"{tasks_path}")
    if served.serving:
        print(f"the gateway at {served.gateway_url} serves it")
    return 0


def follow_up_command(job_id: str, args: argparse.Namespace, upstream: str, task: str | None,
                      kind: str | None) -> str:
    """The `jobs wait` line that finishes this job's work where this command left it: same
    upstream, same tasks file (absolute, so that it works from any directory), same task."""
    parts = ["classifier-gateway", "jobs", "wait", job_id]
    if task:
        parts += ["--task", task, *(["--kind", kind] if kind else []),
                  "--tasks", str(args.tasks.absolute())]
    if upstream == "mistral":
        parts += ["--upstream", "mistral"]
    if getattr(args, "upstream_url", None):
        parts += ["--upstream-url", args.upstream_url]
    return shlex.join(parts)
