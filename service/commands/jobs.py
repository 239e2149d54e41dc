"""`classifier-gateway jobs list | get | cancel | wait`: fine-tuning jobs on the upstream."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TypeAlias

from service.commands.api import (
    add_gateway_arguments,
    add_upstream_arguments,
    upstream_api,
    upstream_from,
)
from service.commands.errors import UserError
from service.commands.jobwatch import (
    FINAL_STATUSES,
    duration_text,
    evaluation_lines,
    failure_reason,
    finish,
    follow_up_command,
    get_job,
    job_duration_s,
    resolve_kind,
    watch_interactively,
)
from service.commands.output import print_json, table, when
from service.commands.tasksfile import add_tasks_file_argument

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    jobs = sub.add_parser("jobs", help="list, inspect, cancel and wait for fine-tuning jobs",
                          description="Fine-tuning jobs on the upstream (--upstream local|mistral).")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("list", help="the jobs, newest first")
    p.add_argument("--status", help="only jobs with this status (e.g. RUNNING, SUCCESS)")
    p.add_argument("--limit", type=int, default=20, metavar="N",
                   help="at most N jobs (default %(default)s)")
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_list)

    p = actions.add_parser("get", help="one job: status, metrics per checkpoint, events")
    p.add_argument("job_id", metavar="JOB_ID", help="the job's id (see `jobs list`)")
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_get)

    p = actions.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id", metavar="JOB_ID", help="the job to cancel")
    add_upstream_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_cancel)

    p = actions.add_parser("wait", help="watch a job until it ends; optionally register its model",
                           description="Show a job's progress until it ends (what `finetune` "
                                       "does after `--no-wait`); with --task, register the "
                                       "fine-tuned model under that task on SUCCESS.")
    p.add_argument("job_id", metavar="JOB_ID",
                   help="the job to wait for (printed by `finetune --no-wait`)")
    p.add_argument("--task", metavar="NAME", help="register the model under this task")
    p.add_argument("--kind", choices=("text", "chat"),
                   help="the task's kind, with --task (default: the kind of data the job was "
                        "trained on)")
    p.add_argument("--poll-interval", type=float, metavar="S",
                   help="seconds between status checks (default 1 on local, 5 on mistral)")
    add_tasks_file_argument(p)
    add_upstream_arguments(p)
    add_gateway_arguments(p, "with --task, wait until this gateway serves the task")
    p.add_argument("--json", action="store_true", help="print one JSON document at the end")
    p.set_defaults(handler=cmd_wait)


def cmd_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"page": 0, "page_size": args.limit}
    if args.status:
        params["status"] = args.status.upper()
    with upstream_api(upstream_from(args)) as api:
        body = api.get("/v1/fine_tuning/jobs", params=params)
    jobs = sorted(body.get("data") or [], key=lambda j: -(j.get("created_at") or 0))[: args.limit]
    if args.json:
        print_json({"total": body.get("total", len(jobs)), "data": jobs})
        return 0
    if not jobs:
        print("no jobs")
        return 0
    print(table(["job", "status", "model", "fine-tuned model", "created (UTC)"],
                [(j.get("id"), j.get("status"), j.get("model"), j.get("fine_tuned_model"),
                  when(j.get("created_at"))) for j in jobs]))
    return 0


def describe_job(job: dict[str, Any]) -> str:
    lines = [
        f"job {job.get('id')}: {job.get('status')}",
        f"  model: {job.get('model')}",
        f"  fine-tuned model: {job.get('fine_tuned_model') or '-'}",
        f"  created: {when(job.get('created_at'))} UTC, modified: {when(job.get('modified_at'))} UTC"
        + (f", took {duration_text(took)}" if (took := job_duration_s(job)) is not None
           and job.get("status") in FINAL_STATUSES else ""),
        "  hyperparameters: " + (", ".join(
            f"{k}={v}" for k, v in sorted((job.get("hyperparameters") or {}).items())
            if v is not None) or "the upstream's defaults"),
    ]
    if job.get("status") in ("FAILED", "FAILED_VALIDATION"):
        lines.append(f"  reason: {failure_reason(job)}")
    lines.extend(f"  {line}" for line in evaluation_lines(job))
    lines.extend(f"  {line}" for line in calibration_lines(job))
    for target in job.get("classifier_targets") or []:
        labels = target.get("labels") or []
        lines.append(f"  target {target.get('name')} ({target.get('loss_function')}): "
                     + ", ".join(str(label) for label in labels))
    checkpoints = sorted(job.get("checkpoints") or [], key=lambda c: c.get("step_number") or 0)
    if checkpoints:
        rows = [(c.get("step_number"), (c.get("metrics") or {}).get("train_loss"),
                 (c.get("metrics") or {}).get("valid_loss"),
                 (c.get("metrics") or {}).get("valid_mean_token_accuracy")) for c in checkpoints]
        lines.append("  checkpoints (during training):")
        lines.extend("    " + line for line in
                     table(["step", "train loss", "valid loss", "valid accuracy"], rows).splitlines())
    events = job.get("events") or []
    if events:
        lines.append("  events:")
        for event in sorted(events, key=lambda e: e.get("created_at") or 0):
            data = event.get("data") or {}
            lines.append(f"    {when(event.get('created_at'))}  {event.get('name')}  "
                         + " ".join(f"{k}={v}" for k, v in data.items()))
    return "\n".join(lines)


def calibration_lines(job: dict[str, Any]) -> list[str]:
    """The temperature fitted per target after training and what it did to the scores (the
    local factory's `calibration` field; Mistral's API has none): whether the scores can be
    read as probabilities, which a cascade's `min_margin` and a review's `max_margin` rely on."""
    found = job.get("calibration")
    if not isinstance(found, dict):
        return []
    source = {"validation": "the validation files", "held-out": "a held-out training slice",
              "none": "no data"}.get(str(found.get("source")), str(found.get("source")))
    lines = []
    for target, data in (found.get("targets") or {}).items():
        if not isinstance(data, dict) or not isinstance(data.get("temperature"), int | float):
            continue
        line = f"calibration, target {target}: temperature {data['temperature']:.4f}"
        if isinstance(data.get("ece_before"), int | float) and isinstance(
                data.get("ece_after"), int | float):
            line += (f", ECE {data['ece_before']:.4f} -> {data['ece_after']:.4f} on "
                     f"{data.get('examples')} examples of {source}")
        elif data.get("reason"):
            line += f" (not fitted: {data['reason']})"
        lines.append(line)
    return lines


def cmd_get(args: argparse.Namespace) -> int:
    with upstream_api(upstream_from(args)) as api:
        job = get_job(api, args.job_id)
    if args.json:
        print_json(job)
    else:
        print(describe_job(job))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with upstream_api(upstream_from(args)) as api:
        job = get_job(api, args.job_id)
        if job.get("status") in FINAL_STATUSES:
            raise UserError(f"job {args.job_id} has already ended ({job.get('status')}); "
                            "nothing to cancel")
        job = api.post(f"/v1/fine_tuning/jobs/{args.job_id}/cancel")
    if args.json:
        print_json(job)
    else:
        print(f"job {args.job_id}: {job.get('status')}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    """`jobs wait`: the watching half of `finetune`, for a job started with --no-wait."""
    upstream = upstream_from(args)
    with upstream_api(upstream) as api:
        follow_up = follow_up_command(args.job_id, args, upstream.name, args.task, args.kind)
        print(f"job {args.job_id} on {upstream.label}", file=sys.stderr)
        final = watch_interactively(api, args.job_id, args, follow_up)
        if final is None:
            return 130
        kind = (resolve_kind(api, final, args.kind)
                if args.task and final.get("status") == "SUCCESS" else args.kind or "text")
    if not args.task:
        status = final.get("status")
        if args.json:
            print_json({"job": final})
        if status != "SUCCESS":
            raise UserError(f"job {args.job_id} {status}: {failure_reason(final)}")
        if not args.json:
            print(f"job {args.job_id} SUCCESS: {final.get('fine_tuned_model')}")
        return 0
    return finish(args, final, upstream, kind, [])
