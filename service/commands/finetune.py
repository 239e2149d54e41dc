"""`classifier-gateway finetune`: from a training file to a task the gateway serves.

Validate locally (the factory's own rules, so a bad line fails in a second instead of after an
upload), upload, create the job, watch it, and on SUCCESS register the fine-tuned model under the
task in the tasks file, which a running gateway reloads by itself. Ctrl-C asks whether to cancel
the job, because leaving a paid job running by accident is the expensive mistake.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, TypeAlias

from service.commands import tasksfile
from service.commands.api import (
    DEFAULT_MODELS,
    Api,
    Upstream,
    add_gateway_arguments,
    add_upstream_arguments,
    upload_file,
    upstream_api,
    upstream_from,
)
from service.commands.datacheck import csv_problem, problem, training_problem
from service.commands.errors import UserError
from service.commands.jobwatch import finish, follow_up_command, watch_interactively
from service.commands.output import print_json
from service.commands.tasksfile import add_tasks_file_argument
from service.factory.data import ValidationReport, merge_reports, validate_file

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a classifier and register it under a task",
        description="Validate the data locally, upload it, fine-tune a classifier on the "
                    "upstream, show its progress, and on SUCCESS register the model under "
                    "--task in the tasks file (a running gateway picks it up without a restart). "
                    "Ctrl-C asks whether to cancel the job.")
    p.add_argument("--task", required=True, metavar="NAME", help="the task to register")
    p.add_argument("--train", required=True, type=Path, metavar="FILE", action="append",
                   help="training JSONL; repeat to train on several files (e.g. the old data "
                        "and `feedback export`'s corrections)")
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
    p.add_argument("--no-ngram-blend", action="store_true",
                   help="local-minilm only: score with the encoder alone, without the n-gram "
                        "model's evidence, so that `models export` gives a model that answers "
                        "on KServe as it does on the factory (the blend gained ~0.007 macro-F1 "
                        "on tweets)")
    p.add_argument("--canary", type=float, metavar="WEIGHT",
                   help="register the new model as the existing task's canary, answering this "
                        "share (0-1) of its items, instead of replacing its model; `tasks "
                        "promote` later makes it the task's model")
    p.add_argument("--suffix", help="a tag for the job (default: the task name)")
    p.add_argument("--no-wait", action="store_true",
                   help="start the job and return; then `jobs wait JOB_ID --task NAME`")
    p.add_argument("--poll-interval", type=float, metavar="S",
                   help="seconds between status checks (default 1 on local, 5 on mistral)")
    add_tasks_file_argument(p)
    add_gateway_arguments(p, "once the task is registered, wait until this gateway serves it")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document at the end (progress still goes to stderr)")
    p.set_defaults(handler=cmd_finetune)


def _validate(path: Path) -> ValidationReport:
    """The checks the upstream would make after the upload, made now: a bad file fails in a second,
    not after an upload and a queued job."""
    reason = csv_problem(path)
    if reason:
        raise UserError(reason)
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


def job_request(args: argparse.Namespace, upstream: Upstream, train_ids: list[str],
                validation_id: str | None) -> dict[str, Any]:
    hyper = {key: value for key, value in {
        "training_steps": args.training_steps, "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay, "warmup_fraction": args.warmup_fraction,
    }.items() if value is not None}
    if args.no_ngram_blend:
        if upstream.name != "local":
            raise UserError("--no-ngram-blend is an option of the local factory's local-minilm "
                            "model; Mistral's API does not take it (drop the flag)")
        hyper["ngram_blend"] = False
    return {
        "model": args.model or DEFAULT_MODELS[upstream.name],
        "job_type": "classifier",
        "training_files": [{"file_id": train_id, "weight": 1.0} for train_id in train_ids],
        "validation_files": [validation_id] if validation_id else [],
        "hyperparameters": hyper,
        "suffix": args.suffix or suffix_for(args.task),
        "auto_start": True,
    }


def fine_tunable_models(listing: Any) -> dict[str, dict[str, Any]]:
    """The base models a `GET /v1/models` answer says can be fine-tuned, by id and by alias
    (Mistral's and the factory's cards both carry `capabilities.fine_tuning`)."""
    found: dict[str, dict[str, Any]] = {}
    cards = listing.get("data") if isinstance(listing, dict) else None
    for card in cards or []:
        if not isinstance(card, dict) or (card.get("capabilities") or {}).get("fine_tuning") \
                is not True:
            continue
        for name in (card.get("id"), *(card.get("aliases") or [])):
            if isinstance(name, str) and name:
                found.setdefault(name, card)
    return found


def check_base_model(api: Api, upstream: Upstream, model: str) -> None:
    """Refuse a base model the upstream cannot fine-tune before any upload: the job's own refusal
    comes only after every training file went up (minutes, for a large file on a slow link).
    An upstream whose model list flags no model as fine-tunable is left to decide itself."""
    tunable = fine_tunable_models(api.get("/v1/models"))
    if not tunable:
        return
    card = tunable.get(model)
    if card is None:
        usable = sorted(name for name, c in tunable.items() if c.get("available") is not False)
        raise UserError(f"base model {model!r} cannot be fine-tuned on {upstream.label}; pass "
                        f"--model with one of: {', '.join(usable) or '(none available)'}")
    if card.get("available") is False:
        reason = card.get("unavailable_reason") or "the upstream does not say why"
        raise UserError(f"base model {model!r} is not available on {upstream.label}: {reason}")


def cmd_finetune(args: argparse.Namespace) -> int:
    upstream = upstream_from(args)
    reports = [_validate(path) for path in args.train]
    train = reports[0]
    kind = train.kind or "text"
    for path, report in zip(args.train[1:], reports[1:], strict=True):
        if report.kind != train.kind:
            raise UserError(f"{path} is {report.kind} data but {args.train[0]} is {train.kind} "
                            "data; train on one kind")
    named = " + ".join(str(path) for path in args.train)
    reason = training_problem(named, merge_reports(reports))  # the files train one model together
    if reason:
        raise UserError(f"{reason}; see the labels with `classifier-gateway data validate "
                        f"{' '.join(str(path) for path in args.train)}`")
    if args.validation is not None:
        validation = _validate(args.validation)
        if validation.kind != train.kind:
            raise UserError(f"{args.validation} is {validation.kind} data but {args.train[0]} is "
                            f"{train.kind} data; use the same kind for both")
    if args.canary is not None:
        if not 0.0 < args.canary <= 1.0:
            raise UserError(f"--canary {args.canary}: give the canary's share of items, "
                            "between 0 (excluded) and 1")
        existing = tasksfile.load(args.tasks).task(args.task) if args.tasks.exists() else None
        if existing is None:
            raise UserError(f"--canary needs an existing task to compare with; task "
                            f"{args.task!r} is not in {args.tasks} (drop --canary to create it)")
        if args.no_wait:
            raise UserError("--canary registers the model when the job ends: drop --no-wait")
    elif args.tasks.exists():
        tasksfile.load(args.tasks)  # a broken tasks file fails now, not after the training
    multi_label = sorted({s.name for report in reports for s in report.targets.values()
                          if s.loss_function == "multi_class"})
    with upstream_api(upstream) as api:
        check_base_model(api, upstream, args.model or DEFAULT_MODELS[upstream.name])
        train_ids = []
        for path, report in zip(args.train, reports, strict=True):
            print(f"uploading {path} ({report.valid} {kind} examples) to {upstream.label}",
                  file=sys.stderr, flush=True)
            train_ids.append(upload_file(api, path)["id"])
        validation_id = None
        if args.validation is not None:
            print(f"uploading {args.validation} ({validation.valid} examples)", file=sys.stderr,
                  flush=True)
            validation_id = upload_file(api, args.validation)["id"]
        job = api.post("/v1/fine_tuning/jobs",
                       json=job_request(args, upstream, train_ids, validation_id))
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
        final = watch_interactively(api, job_id, args, follow_up)
    if final is None:
        return 130
    return finish(args, final, upstream, kind, multi_label)
