"""How the command line speaks about training data: a file's summary, its line errors, and the one
line that says why a file cannot be used. `data validate`, `data prepare` and `finetune` (which
checks its files locally before uploading them) share it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from service.commands.output import plural, table
from service.factory.data import DEFAULT_LONG_TEXT_CHARS, ValidationReport


def describe_report(name: str, report: ValidationReport) -> str:
    """A readable summary of one file: what it is, its targets and labels, what looks wrong."""
    lines = []
    n_targets = len(report.targets)
    lines.append(f"{name}: {report.kind or 'no'} data, {plural(report.valid, 'valid example')} "
                 f"of {plural(report.lines, 'line')}, {plural(n_targets, 'target')}")
    for stats in report.targets.values():
        kind = "multi-label" if stats.loss_function == "multi_class" else "single-label"
        lines.append(f"  target {stats.name} ({kind}, {plural(len(stats.label_counts), 'label')}, "
                     f"{plural(stats.examples, 'example')}):")
        rows = [(label, count) for label, count in sorted(stats.label_counts.items(),
                                                          key=lambda kv: (-kv[1], kv[0]))]
        lines.extend("    " + row for row in table(["label", "examples"], rows).splitlines())
    duplicates = f"duplicates: {report.duplicates}"
    if report.conflicting_duplicates:
        duplicates += f" ({report.conflicting_duplicates} with different labels)"
    mean = round(report.total_chars / report.valid) if report.valid else 0
    lines.append(f"  {duplicates}; empty texts: {report.empty_texts}; very long texts "
                 f"(> {DEFAULT_LONG_TEXT_CHARS} chars): {report.long_texts}")
    lines.append(f"  text length: mean {plural(mean, 'char')}, max {report.max_chars}")
    return "\n".join(lines)


def errors_text(name: str, report: ValidationReport) -> list[str]:
    out = [f"{name}: {error}" for error in report.errors]
    if report.error_count > len(report.errors):
        more = report.error_count - len(report.errors)
        out.append(f"{name}: ... and {plural(more, 'more invalid line')}")
    return out


def problem(name: str, report: ValidationReport) -> str | None:
    """One line saying why the file cannot be used, or None when it can."""
    if report.error_count:
        first = report.errors[0] if report.errors else None
        return (f"{name}: {plural(report.error_count, 'invalid line')}"
                + (f" (first: {first})" if first else ""))
    if not report.valid:
        return f"{name}: no examples; each line needs {{\"text\", \"labels\"}} or " \
               "{\"messages\", \"labels\"}"
    return None


def csv_header(path: Path) -> list[str] | None:
    """The header of a CSV file, or None when `path` holds JSON lines. A CSV read as JSONL gives an
    error on every line (15,086 of them for the BBC corpus), where one sentence pointing to
    `data prepare` helps."""
    try:
        with path.open("rb") as handle:
            head = handle.read(64 * 1024)
    except OSError:
        return None
    text = head.decode("utf-8-sig", errors="replace")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith(("{", "[")):
        return None
    if path.suffix.lower() not in (".csv", ".tsv") and "," not in first and "\t" not in first:
        return None
    try:
        dialect = csv.Sniffer().sniff(first, delimiters=",;\t")
        columns = next(csv.reader(io.StringIO(first), dialect))
    except (csv.Error, StopIteration):
        columns = next(csv.reader(io.StringIO(first)), [])
    return [c.strip() for c in columns] if len(columns) >= 2 else None


def csv_problem(path: Path) -> str | None:
    """Why a CSV cannot be validated or uploaded as it is, and the command that converts it."""
    header = csv_header(path)
    if header is None:
        return None
    shown = ", ".join(header[:6]) + (", ..." if len(header) > 6 else "")
    return (f"{path} is a CSV file (columns: {shown}), not JSONL: turn it into training files with "
            f"`classifier-gateway data prepare {path} --text-column COLUMN --label-column COLUMN "
            "--out-dir DIR`")


def training_problem(name: str, report: ValidationReport) -> str | None:
    """Why a file that is valid line by line still cannot train a classifier: a single-label
    target needs at least two labels (the factory, and Mistral, fail such a job after the upload)."""
    for stats in report.targets.values():
        if stats.loss_function == "single_class" and len(stats.label_counts) < 2:
            only = ", ".join(repr(label) for label in stats.label_counts) or "none"
            return (f"{name}: target {stats.name!r} has only the label {only}: a classifier needs "
                    "at least two labels per target; add examples of the others (a file cut from "
                    "one grouped by label? `data prepare` writes it shuffled)")
    return None
