"""`classifier-gateway finetune`: from a training file to a task the gateway serves.

Validate locally (the factory's own rules, so a bad line fails in a second instead of after an
upload), upload, create the job, watch it, and on SUCCESS register the fine-tuned model under the
task in the tasks file, which a running gateway reloads by itself. Ctrl-C asks whether to cancel
the job, because leaving a paid job running by accident is the expensive mistake.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TypeAlias

from service.cli import UserError
from service.commands import tasksfile
from service.commands.api import (
    DEFAULT_MODELS,
    Api,
    TransientError,
    Upstream,
    add_upstream_arguments,
    upload_file,
    upstream_api,
    upstream_from,
)
from service.commands.data import problem
from service.commands.jobs import FINAL_STATUSES, failure_reason, get_job, last_metrics
from service.commands.output import Progress, print_json
from service.commands.tasks import add_tasks_file_argument, register_task, task_rows
from service.factory.data import ValidationReport, validate_file

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a classifier and register it under a task",
        description="Validate the data locally, upload it, fine-tune a classifier on the "
                    "upstream, show its progress, and on SUCCESS register the model under "
                    "--task in the tasks file (a running gateway picks it up without a restart). "
                    "Ctrl-C asks whether to cancel the job.")
    p.add_argument("--task", required=True, metavar="NAME", help="the task to register")
    p.add_argument("--train", required=True, type=Path, metavar="FILE", help="training JSONL")
    p.add_argument("--validation", type=Path, metavar="FILE", help="validation JSONL")
    add_upstream_arguments(p)
    p.add_argument("--model", help=f"the base model (default: {DEFAULT_MODELS['local']} on local, "
                                   f"{DEFAULT_MODELS['mistral']} on mistral)")
    p.add_argument("--training-steps", type=int, metavar="N",
                   help="optimisation steps (default: the upstream's)")
    p.add_argument("--learning-rate", type=float, metavar="X",
                   help="learning rate (default: the upstream's, 1e-4 on Mistral)")
    p.add_argument("--weight-decay", type=float, metavar="X", help="weight decay (0..1)")
    p.add_argument("--warmup-fraction", type=float, metavar="X", help="warm-up share (0..1)")
    p.add_argument("--suffix", help="a tag for the job (default: the task name)")
    p.add_argument("--no-wait", action="store_true",
                   help="start the job and return; then `jobs wait JOB_ID --task NAME`")
    p.add_argument("--poll-interval", type=float, metavar="S",
                   help="seconds between status checks (default 1 on local, 5 on mistral)")
    add_tasks_file_argument(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON document at the end (progress still goes to stderr)")
    p.set_defaults(handler=cmd_finetune)


def _validate(path: Path) -> ValidationReport:
    try:
        report = validate_file(path, keep_examples=False)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    reason = problem(str(path), report)
    if reason:
        raise UserError(f"{reason}; see all with `classifier-gateway data validate {path}`")
    return report


def suffix_for(task: str) -> str:
    """Mistral allows at most 18 characters; keep it to what is safe in a model id."""
    return re.sub(r"[^a-z0-9-]+", "-", task.lower()).strip("-")[:18] or "classifier"


def job_request(args: argparse.Namespace, upstream: Upstream, train_id: str,
                validation_id: str | None) -> dict[str, Any]:
    hyper = {key: value for key, value in {
        "training_steps": args.training_steps, "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay, "warmup_fraction": args.warmup_fraction,
    }.items() if value is not None}
    return {
        "model": args.model or DEFAULT_MODELS[upstream.name],
        "job_type": "classifier",
        "training_files": [{"file_id": train_id, "weight": 1.0}],
        "validation_files": [validation_id] if validation_id else [],
        "hyperparameters": hyper,
        "suffix": args.suffix or suffix_for(args.task),
        "auto_start": True,
    }


def total_steps(job: dict[str, Any]) -> int | None:
    """The job's number of steps: as requested, or else as the upstream planned it (Mistral's job
    metadata gives tokens per step and tokens in all, once the job is validated)."""
    steps = (job.get("hyperparameters") or {}).get("training_steps")
    if isinstance(steps, int):
        return steps
    metadata = job.get("metadata") or {}
    per_step, tokens = metadata.get("train_tokens_per_step"), metadata.get("train_tokens")
    if isinstance(per_step, int | float) and isinstance(tokens, int | float) and per_step > 0:
        return round(tokens / per_step)
    return None


def progress_line(job: dict[str, Any]) -> tuple[str, int | None, int | None]:
    metrics = last_metrics(job)
    total = total_steps(job)
    step = metrics.get("step")
    parts = [str(job.get("status"))]  # the job's id is on the line before, `job ... created`
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
    """`watch`, with Ctrl-C offering to cancel. Returns None when the user stopped watching."""
    progress = Progress()
    interval = args.poll_interval or (5.0 if args.upstream == "mistral" else 1.0)
    try:
        return watch(api, job_id, progress, interval, follow_up=follow_up)
    except KeyboardInterrupt:
        progress.close()
        if ask(f"Cancel job {job_id}? [y/N] "):
            job = api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
            print(f"job {job_id}: {job.get('status') if isinstance(job, dict) else 'cancelled'}",
                  file=sys.stderr)
        else:
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


def finish(args: argparse.Namespace, job: dict[str, Any], upstream: Upstream | str,
           kind: str, multi_label: list[str], started_at: float | None) -> int:
    """Report the outcome; on SUCCESS register the model under the task."""
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
    if isinstance(upstream, Upstream):
        warn_if_elsewhere(args.tasks, upstream)
    register_task(args.tasks, args.task, upstream, model=model, kind=kind,
                  multi_label_targets=multi_label)
    row = next(r for r in task_rows(args.tasks) if r["name"] == args.task)
    metrics = last_metrics(job)
    if args.json:
        print_json({"job": job, "metrics": metrics, "task": row, "tasks_file": str(args.tasks)})
        return 0
    took = f" in {time.monotonic() - started_at:.0f}s" if started_at else ""
    print(f"job {job_id} SUCCESS{took}")
    shown = [f"{name} {metrics[key]:.4f}" for key, name in (
        ("train_loss", "train loss"), ("valid_loss", "valid loss"),
        ("valid_mean_token_accuracy", "valid accuracy")) if isinstance(metrics.get(key), int | float)]
    if shown:
        print(f"  metrics at step {metrics.get('step')}: " + ", ".join(shown))
    evaluation = job.get("evaluation")  # the local factory's extra: held-out scores per target
    if isinstance(evaluation, dict):
        for target, scores in (evaluation.get("targets") or {}).items():
            if isinstance(scores, dict) and "accuracy" in scores:
                extra = (f", macro F1 {scores['macro_f1']:.4f}"
                         if isinstance(scores.get("macro_f1"), int | float) else "")
                print(f"  validation, target {target}: accuracy {scores['accuracy']:.4f}{extra} "
                      f"on {scores.get('examples')} examples")
    print(f"  model: {model}")
    print(f"task {args.task} -> {model} on {row['upstream']} ({row['kind']}), saved in "
          f"{args.tasks}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    upstream = upstream_from(args)
    train = _validate(args.train)
    kind = train.kind or "text"
    if args.validation is not None:
        validation = _validate(args.validation)
        if validation.kind != train.kind:
            raise UserError(f"{args.validation} is {validation.kind} data but {args.train} is "
                            f"{train.kind} data; use the same kind for both")
    if args.tasks.exists():
        tasksfile.load(args.tasks)  # a broken tasks file fails now, not after the training
    multi_label = [s.name for s in train.targets.values() if s.loss_function == "multi_class"]
    with upstream_api(upstream) as api:
        print(f"uploading {args.train} ({train.valid} {kind} examples) to {upstream.label}",
              file=sys.stderr, flush=True)
        train_file = upload_file(api, args.train)
        validation_id = None
        if args.validation is not None:
            print(f"uploading {args.validation} ({validation.valid} examples)", file=sys.stderr,
                  flush=True)
            validation_id = upload_file(api, args.validation)["id"]
        job = api.post("/v1/fine_tuning/jobs",
                       json=job_request(args, upstream, train_file["id"], validation_id))
        if not isinstance(job, dict) or not job.get("id"):
            raise UserError(f"{upstream.label} did not return a job")
        job_id = str(job["id"])
        follow_up = follow_up_command(job_id, args, upstream.name, args.task, kind)
        if args.no_wait:
            if args.json:
                print_json({"job": job, "follow_up": follow_up})
            else:
                print(f"job {job_id}: {job.get('status')}")
                print(f"when it is done, register it with: {follow_up}")
            return 0
        print(f"job {job_id} created (model {job.get('model')})", file=sys.stderr)
        started_at = time.monotonic()
        final = watch_interactively(api, job_id, args, follow_up)
    if final is None:
        return 130
    return finish(args, final, upstream, kind, multi_label, started_at)


def follow_up_command(job_id: str, args: argparse.Namespace, upstream: str, task: str | None,
                      kind: str) -> str:
    """The `jobs wait` line that finishes this job's work where this command left it: same
    upstream, same tasks file, same task."""
    parts = ["classifier-gateway", "jobs", "wait", job_id]
    if task:
        parts += ["--task", task, "--kind", kind, "--tasks", str(args.tasks)]
    if upstream == "mistral":
        parts += ["--upstream", "mistral"]
    if getattr(args, "upstream_url", None):
        parts += ["--upstream-url", args.upstream_url]
    return shlex.join(parts)


def cmd_wait(args: argparse.Namespace) -> int:
    """`jobs wait`: the watching half of `finetune`, for a job started with --no-wait."""
    upstream = upstream_from(args)
    with upstream_api(upstream) as api:
        follow_up = follow_up_command(args.job_id, args, upstream.name, args.task, args.kind)
        print(f"job {args.job_id} on {upstream.label}", file=sys.stderr)
        started_at = time.monotonic()
        final = watch_interactively(api, args.job_id, args, follow_up)
    if final is None:
        return 130
    if not args.task:
        status = final.get("status")
        if args.json:
            print_json({"job": final})
        if status != "SUCCESS":
            raise UserError(f"job {args.job_id} {status}: {failure_reason(final)}")
        if not args.json:
            print(f"job {args.job_id} SUCCESS: {final.get('fine_tuned_model')}")
        return 0
    return finish(args, final, upstream, args.kind, [], started_at)
