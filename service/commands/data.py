"""`classifier-gateway data validate | prepare`: check training data before anything is uploaded,
and turn a raw corpus (JSONL or CSV) into balanced training and validation files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeAlias

from service.commands.datacheck import (
    csv_problem,
    describe_report,
    errors_text,
    problem,
    training_problem,
)
from service.commands.errors import UserError
from service.commands.output import plural, print_json, table
from service.commands.prepare import Plan, PrepareError, plan, read_report, write_jsonl
from service.factory.data import ValidationReport, validate_file

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    data = sub.add_parser("data", help="validate and prepare training data",
                          description="Validate and prepare classifier training data (JSONL: "
                                      '{"text"|"messages", "labels": {target: label}} per line).')
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("validate", help="check JSONL files the way the factory will",
                           description="Check JSONL files with the factory's own rules: "
                                       "line-numbered errors, then a summary per file.")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE",
                   help="JSONL training files (one example per line)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_validate)

    p = actions.add_parser(
        "prepare", help="clean, balance and split a corpus into train/validation files",
        description="Drop empty and duplicate inputs and labels with too few examples, cap "
                    "frequent labels, and split into train.jsonl and validation.jsonl, stratified "
                    "by label. Reads JSONL, or CSV with --text-column and --label-column. "
                    "(Mistral's cookbook: at least ~200 and at most ~600 examples per label.)")
    p.add_argument("input", type=Path, metavar="IN", help="a .jsonl or .csv file")
    p.add_argument("--out-dir", type=Path, required=True, metavar="DIR",
                   help="where train.jsonl and validation.jsonl are written (created if needed)")
    p.add_argument("--min-per-label", type=int, default=10, metavar="N",
                   help="drop labels with fewer examples than this (default %(default)s)")
    p.add_argument("--max-per-label", type=int, metavar="N",
                   help="keep at most this many examples of a label (default: no cap)")
    p.add_argument("--validation-fraction", type=float, default=0.1, metavar="F",
                   help="share of each label held out for validation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the split and of the order of each file (shuffled, so that "
                        "any part of it mixes the labels; default %(default)s)")
    p.add_argument("--text-column", metavar="NAME", help="CSV: the column holding the text")
    p.add_argument("--label-column", metavar="NAME", help="CSV: the column holding the label")
    p.add_argument("--target", metavar="NAME",
                   help="CSV: the target's name in the labels (default: the label column's name)")
    p.add_argument("--label-separator", metavar="SEP",
                   help="CSV: split a label cell on SEP into several labels (a multi-label target)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop invalid lines (counted) instead of stopping at them")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_prepare)


# -- validate ---------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    reports: list[tuple[str, ValidationReport]] = []
    problems: list[str] = []
    for path in args.files:
        if reason := csv_problem(path):  # one sentence, not an error on every line
            problems.append(reason)
            continue
        try:
            report = validate_file(path, keep_examples=False)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
        reports.append((str(path), report))
    problems += [p for name, report in reports
                 if (p := problem(name, report) or training_problem(name, report))]
    kinds = {report.kind for _, report in reports if report.kind}
    if len(kinds) > 1:
        problems.append("the files mix text and chat data: " + ", ".join(
            f"{name} is {report.kind}" for name, report in reports))
    if args.json:
        print_json({"ok": not problems, "problems": problems,
                    "files": [{"file": name, "ok": report.ok, **report.to_dict()}
                              for name, report in reports]})
    else:
        for name, report in reports:
            for line in errors_text(name, report):
                print(line)
            print(describe_report(name, report))
    if problems:
        raise UserError(problems[0] + (f" (and {plural(len(problems) - 1, 'more problem')})"
                                       if len(problems) > 1 else ""))
    return 0


# -- prepare ----------------------------------------------------------------------------------

def describe_plan(result: Plan, paths: dict[str, Path], sizes: dict[str, int]) -> str:
    lines = [f"read {plural(result.input_examples, f'{result.kind} example')}"]
    if result.empty_texts:
        lines.append(f"dropped {plural(result.empty_texts, 'example')} with an empty text")
    if result.duplicates:
        conflict = (f", {result.conflicting_duplicates} of them with different labels"
                    if result.conflicting_duplicates else "")
        lines.append(f"dropped {plural(result.duplicates, 'repeated input')} (kept the first"
                     f"{conflict})")
    for d in result.dropped_labels:
        lines.append(f"dropped label {d.target}={d.label}: {plural(d.examples, 'example')}, "
                     f"{d.reason}")
    if result.unlabelled:
        lines.append(f"dropped {plural(result.unlabelled, 'example')} left without any label")
    for d in result.capped_labels:
        lines.append(f"capped label {d.target}={d.label}: dropped {d.examples}, {d.reason}")
    rows = [(f"{target}={label}" if _many_targets(result) else label, t, v)
            for (target, label), (t, v) in result.label_counts().items()]
    lines.append(table(["label", "train", "validation"], rows))
    for split in ("train", "validation"):
        examples = result.train if split == "train" else result.validation
        lines.append(f"wrote {paths[split]}: {plural(len(examples), 'example')}, "
                     f"{plural(sizes[split], 'byte')}")
    return "\n".join(lines)


def _many_targets(result: Plan) -> bool:
    return len({target for target, _ in result.label_counts()}) > 1


def cmd_prepare(args: argparse.Namespace) -> int:
    try:
        report = read_report(args.input, text_column=args.text_column,
                             label_column=args.label_column, target=args.target,
                             label_separator=args.label_separator)
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    name = str(args.input)
    if report.error_count and not args.skip_invalid:
        for line in errors_text(name, report):
            print(line)
        reason = problem(name, report)
        raise UserError(f"{reason}; fix the file, or pass --skip-invalid to drop such lines")
    if not report.valid:
        raise UserError(problem(name, report) or f"{name}: no examples")
    try:
        result = plan(report, min_per_label=args.min_per_label, max_per_label=args.max_per_label,
                      validation_fraction=args.validation_fraction, seed=args.seed)
    except PrepareError as exc:
        raise UserError(str(exc)) from None
    if not result.train:
        raise UserError(f"{name}: no example left after dropping labels with fewer than "
                        f"{plural(args.min_per_label, 'example')}; lower --min-per-label")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"train": args.out_dir / "train.jsonl",
                 "validation": args.out_dir / "validation.jsonl"}
        sizes = {"train": write_jsonl(paths["train"], result.train),
                 "validation": write_jsonl(paths["validation"], result.validation)}
    except OSError as exc:
        raise UserError(f"cannot write to {args.out_dir}: {exc.strerror or exc}") from None
    if args.json:
        body: dict[str, Any] = result.to_dict()
        body["invalid_lines_dropped"] = report.error_count
        body["files"] = {split: {"path": str(p), "bytes": sizes[split]}
                         for split, p in paths.items()}
        print_json(body)
    else:
        if report.error_count:
            print(f"dropped {plural(report.error_count, 'invalid line')} (--skip-invalid)")
        print(describe_plan(result, paths, sizes))
    return 0
