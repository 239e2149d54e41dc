"""`classifier-gateway feedback export`, `review export` and `predictions export`: the gateway's
corrected labels, review queue and sampled prediction log (kept in Redis by the gateway, paged
through its `GET /feedback/{task}`, `GET /review/{task}` and `GET /predictions/{task}`) as files:
factory JSONL ready for `finetune` (after labelling, for the log), or Label Studio tasks with the
model's answers as predictions for pre-annotation."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

from service.commands import parquet
from service.commands.api import Api, add_gateway_arguments, gateway_api
from service.commands.errors import UserError
from service.commands.output import plural, print_json
from service.wire import render_messages

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    feedback = sub.add_parser("feedback", help="corrected labels sent to the gateway",
                              description="Corrected labels sent to the gateway's POST /feedback.")
    actions = feedback.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("export", help="write a task's corrections as training JSONL",
                           description="Write a task's corrected labels (the latest per item) as "
                                       "factory JSONL, ready for `finetune --train`.")
    p.add_argument("--task", required=True, metavar="NAME", help="the task whose corrections")
    p.add_argument("--tenant", metavar="NAME", help="only the corrections sent with this "
                                                     "tenant's keys")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="JSONL to write")
    add_gateway_arguments(p, "the gateway that keeps the feedback")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_feedback_export)

    review = sub.add_parser("review", help="the gateway's review queue of unsure answers",
                            description="Answers the gateway queued for review (a task's "
                                        "`review:` setting).")
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("export", help="write a task's review queue",
                           description="Write a task's review queue: JSONL (the model's labels "
                                       "as `labels`, with its scores; correct and train on it) "
                                       "or Label Studio tasks with the model's answers as "
                                       "predictions.")
    p.add_argument("--task", required=True, metavar="NAME", help="the task whose queue")
    p.add_argument("--tenant", metavar="NAME", help="only the answers given to this tenant's "
                                                     "keys")
    p.add_argument("--format", choices=("jsonl", "label-studio"), default="jsonl",
                   help="jsonl (factory JSONL plus scores) or label-studio (a JSON list of "
                        "tasks with predictions); default jsonl")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write")
    add_gateway_arguments(p, "the gateway that keeps the review queue")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_review_export)

    predictions = sub.add_parser("predictions", help="the gateway's sampled prediction log",
                                 description="Answers the gateway logged (a task's `log:` "
                                             "setting).")
    actions = predictions.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("export", help="write a task's prediction log as JSONL or Parquet",
                           description="Write a task's logged predictions as factory JSONL (the "
                                       "model's labels as `labels`, with its scores, model, "
                                       "margin and response id): correct the labels and train "
                                       "on it. Entries without their input (the task's log "
                                       "keeps `inputs: false`) carry `input_sha256` instead. "
                                       "--format parquet writes the same fields as Parquet "
                                       f"(needs pyarrow: the {parquet.EXTRA} extra).")
    p.add_argument("--task", required=True, metavar="NAME", help="the task whose log")
    p.add_argument("--since", metavar="AGE", help="only entries younger than AGE (90s, 30m, "
                                                   "2h, 7d); default: all the log keeps")
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                   help="jsonl (factory JSONL plus the log's fields) or parquet (the same "
                        "fields, one column each); default jsonl")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write")
    add_gateway_arguments(p, "the gateway that keeps the log")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_predictions_export)


def entries(api: Api, what: str, task: str, tenant: str | None = None,
            since: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(task kind, entry) for every entry of the stream (of one tenant's keys), page by page
    (from `since` ago)."""
    after = "0"
    while True:
        params: dict[str, Any] = {"after": after, "limit": 1000}
        if tenant:
            params["tenant"] = tenant
        if since and after == "0":
            params["since"] = since
        page = api.get(f"/{what}/{task}", params=params)
        if not isinstance(page, dict):
            raise UserError(f"the gateway answered GET /{what}/{task} with something unexpected")
        for entry in page.get("entries") or []:
            yield str(page.get("kind", "text")), entry
        after = page.get("next") or ""
        if not after:
            return


def example(kind: str, item: Any, labels: Any) -> dict[str, Any]:
    """One line of factory JSONL."""
    if kind == "chat":
        return {"messages": item.get("messages", []) if isinstance(item, dict) else [],
                "labels": labels}
    return {"text": item, "labels": labels}


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    try:
        with path.open("w", encoding="utf-8") as out:
            for line in lines:
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def cmd_feedback_export(args: argparse.Namespace) -> int:
    with gateway_api(args) as api:
        lines = [example(kind, e["input"], e["labels"]) for kind, e in
                 entries(api, "feedback", args.task, args.tenant)]
    _write_lines(args.out, lines)
    if args.json:
        print_json({"task": args.task, "out": str(args.out.absolute()), "examples": len(lines)})
    else:
        print(f"{plural(len(lines), 'corrected example')} of task {args.task} written to "
              f"{args.out.absolute()}")
        if lines:
            print(f"train on them with: classifier-gateway finetune --task {args.task} "
                  f"--train OLD.jsonl --train {args.out} --canary 0.1", file=sys.stderr)
    return 0


def label_studio_task(kind: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A Label Studio task: the text (a conversation rendered as `role: content` lines), and the
    model's answer as a prediction, one `choices` result per target (labelling config:
    `<Choices name="TARGET" toName="text">` per target).

    A result's `score` is the model's own score of its answer on that target (for a multi-label
    target, of its weakest chosen label), and the prediction's the lowest of them: how sure the
    model was. The top-two margin that queued it stays `data.margin`, named as what it is."""
    item = entry["input"]
    text = (render_messages(item.get("messages", [])) if kind == "chat" and isinstance(item, dict)
            else str(item))
    all_scores = entry.get("scores") or {}
    results: list[dict[str, Any]] = []
    for target, labels in (entry.get("predicted") or {}).items():
        choices = labels if isinstance(labels, list) else [labels]
        result: dict[str, Any] = {"from_name": target, "to_name": "text", "type": "choices",
                                  "value": {"choices": choices}}
        scores = all_scores.get(target) or {}
        if choices and all(choice in scores for choice in choices):
            result["score"] = round(min(float(scores[choice]) for choice in choices), 6)
        results.append(result)
    prediction: dict[str, Any] = {"model_version": entry.get("model"), "result": results}
    if results and all("score" in result for result in results):
        prediction["score"] = min(result["score"] for result in results)
    return {"data": {"text": text, "gateway_id": entry.get("id"),
                     "reason": entry.get("reason"), "margin": entry.get("margin"),
                     "scores": entry.get("scores")},
            "predictions": [prediction]}


def cmd_review_export(args: argparse.Namespace) -> int:
    with gateway_api(args) as api:
        found = list(entries(api, "review", args.task, args.tenant))
    if args.format == "label-studio":
        try:
            args.out.write_text(json.dumps([label_studio_task(kind, e) for kind, e in found],
                                           ensure_ascii=False, indent=1), encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    else:
        _write_lines(args.out, [{**example(kind, e["input"], e.get("predicted") or {}),
                                 "scores": e.get("scores"), "model": e.get("model"),
                                 "margin": e.get("margin"), "reason": e.get("reason")}
                                for kind, e in found])
    if args.json:
        print_json({"task": args.task, "out": str(args.out.absolute()), "items": len(found),
                    "format": args.format})
    else:
        print(f"{plural(len(found), 'queued answer')} of task {args.task} written to "
              f"{args.out.absolute()} ({args.format})")
    return 0


def cmd_predictions_export(args: argparse.Namespace) -> int:
    if args.since and not re.fullmatch(r"\d+(\.\d+)?[smhd]", args.since):
        raise UserError(f"--since {args.since!r}: give an age such as 90s, 30m, 2h or 7d")
    if args.format == "parquet":
        parquet.require()  # before anything is fetched
    with gateway_api(args) as api:
        found = list(entries(api, "predictions", args.task, since=args.since))
    lines = []
    for kind, e in found:
        line = example(kind, e["input"], e.get("labels") or {}) if "input" in e else \
            {"input_sha256": e.get("input_sha256"), "labels": e.get("labels") or {}}
        lines.append({**line, **{k: e.get(k) for k in (
            "scores", "model", "margin", "response_id", "index", "time", "cache")}})
    if args.format == "parquet":
        parquet.write_parquet(args.out, lines)
    else:
        _write_lines(args.out, lines)
    if args.json:
        print_json({"task": args.task, "out": str(args.out.absolute()), "items": len(lines),
                    "format": args.format})
    else:
        print(f"{plural(len(lines), 'logged prediction')} of task {args.task} written to "
              f"{args.out.absolute()} ({args.format})")
    return 0
