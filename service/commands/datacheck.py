"""How the command line speaks about training data: a file's summary, its line errors, and the one
line that says why a file cannot be used. `data validate`, `data prepare` and `finetune` (which
checks its files locally before uploading them) share it."""

from __future__ import annotations

from service.commands.output import table
from service.factory.data import DEFAULT_LONG_TEXT_CHARS, ValidationReport


def describe_report(name: str, report: ValidationReport) -> str:
    """A readable summary of one file: what it is, its targets and labels, what looks wrong."""
    lines = []
    n_targets = len(report.targets)
    lines.append(f"{name}: {report.kind or 'no'} data, {report.valid} valid examples of "
                 f"{report.lines} lines, {n_targets} target{'s' * (n_targets != 1)}")
    for stats in report.targets.values():
        kind = "multi-label" if stats.loss_function == "multi_class" else "single-label"
        lines.append(f"  target {stats.name} ({kind}, {len(stats.label_counts)} labels, "
                     f"{stats.examples} examples):")
        rows = [(label, count) for label, count in sorted(stats.label_counts.items(),
                                                          key=lambda kv: (-kv[1], kv[0]))]
        lines.extend("    " + row for row in table(["label", "examples"], rows).splitlines())
    duplicates = f"duplicates: {report.duplicates}"
    if report.conflicting_duplicates:
        duplicates += f" ({report.conflicting_duplicates} with different labels)"
    mean = round(report.total_chars / report.valid) if report.valid else 0
    lines.append(f"  {duplicates}; empty texts: {report.empty_texts}; very long texts "
                 f"(> {DEFAULT_LONG_TEXT_CHARS} chars): {report.long_texts}")
    lines.append(f"  text length: mean {mean} chars, max {report.max_chars}")
    return "\n".join(lines)


def errors_text(name: str, report: ValidationReport) -> list[str]:
    out = [f"{name}: {error}" for error in report.errors]
    if report.error_count > len(report.errors):
        out.append(f"{name}: ... and {report.error_count - len(report.errors)} more invalid lines")
    return out


def problem(name: str, report: ValidationReport) -> str | None:
    """One line saying why the file cannot be used, or None when it can."""
    if report.error_count:
        first = report.errors[0] if report.errors else None
        return (f"{name}: {report.error_count} invalid line{'s' * (report.error_count != 1)}"
                + (f" (first: {first})" if first else ""))
    if not report.valid:
        return f"{name}: no examples; each line needs {{\"text\", \"labels\"}} or " \
               "{\"messages\", \"labels\"}"
    return None
