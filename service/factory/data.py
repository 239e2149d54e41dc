"""Validation and statistics of classifier training data (JSONL), shared by the factory and the CLI.

One line is one example: `{"text": "...", "labels": {...}}` for a text classifier, or
`{"messages": [{"role": "user", "content": "..."}], "labels": {...}}` for a chat classifier
(Mistral's classifier training format; docs/factory.md, "Data"). `labels` maps a target name to one label (a
string) or to several (a non-empty list of strings); a target with list values is multi-label.

The module is pure (no I/O besides `validate_file`), so the factory can run it in a worker thread and
the CLI can print its report before anything is uploaded. Errors carry 1-based line numbers, because
the reader's next step is to open the file at that line.

Public API:
- `validate_lines(lines, kind=None, targets=None, ...) -> ValidationReport`
- `validate_file(path, ...) -> ValidationReport` (same, reading a file)
- `render_messages(messages) -> str`: how a conversation becomes one text for the features.
- `merge_reports(reports) -> ValidationReport`: totals over several files.
- `resolve_targets(report, declared=None) -> list[TargetSpec]`: the targets a model will have.
- `ValidationReport` (`.ok`, `.kind`, `.examples`, `.targets`, `.errors`, `.to_dict()`, ...),
  `LineError`, `TargetStats`, `Example`, `TargetSpec`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from service.wire import content_text, render_messages

Kind = Literal["text", "chat"]
LossFunction = Literal["single_class", "multi_class"]
ROLES = ("system", "user", "assistant", "tool")

#: How many error messages a report keeps (the count covers all of them).
DEFAULT_MAX_ERRORS = 100
#: A text longer than this is counted as "very long": it still trains, but it is probably a mistake
#: (a whole document pasted into one example) and it slows training down.
DEFAULT_LONG_TEXT_CHARS = 20_000


@dataclass(frozen=True)
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class Example:
    """A valid example. `text` is what the features see: the text itself, or the rendered chat."""

    line: int
    text: str
    labels: Mapping[str, str | tuple[str, ...]]
    messages: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True)
class TargetSpec:
    """A declared target (`classifier_targets` of a job). `labels` empty means "infer them"."""

    name: str
    labels: tuple[str, ...] = ()
    loss_function: LossFunction | None = None
    weight: float = 1.0


@dataclass
class TargetStats:
    """What the data says about one target."""

    name: str
    label_counts: Counter[str] = field(default_factory=Counter)
    examples: int = 0  # examples that label this target
    multi_label_examples: int = 0  # examples whose value is a list

    @property
    def loss_function(self) -> LossFunction:
        return "multi_class" if self.multi_label_examples else "single_class"

    @property
    def labels(self) -> list[str]:
        """Labels sorted by name, so that a model's label order does not depend on line order."""
        return sorted(self.label_counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "loss_function": self.loss_function,
            "examples": self.examples,
            "labels": dict(sorted(self.label_counts.items())),
        }


@dataclass
class ValidationReport:
    """The outcome of validating one JSONL file (or several, via `merge`)."""

    kind: Kind | None = None
    lines: int = 0  # non-blank lines seen
    examples: list[Example] = field(default_factory=list)
    valid: int = 0  # valid examples (== len(examples) when they are kept)
    errors: list[LineError] = field(default_factory=list)  # the first `max_errors`
    error_count: int = 0
    targets: dict[str, TargetStats] = field(default_factory=dict)
    duplicates: int = 0  # examples whose input already appeared earlier
    conflicting_duplicates: int = 0  # ... with different labels
    empty_texts: int = 0
    long_texts: int = 0
    max_chars: int = 0
    total_chars: int = 0

    @property
    def ok(self) -> bool:
        """No invalid line, and at least one valid example."""
        return self.error_count == 0 and self.valid > 0

    @property
    def invalid_fraction(self) -> float:
        return self.error_count / self.lines if self.lines else 0.0

    def acceptable(self, skip_fraction: float) -> bool:
        """Whether training may go on, skipping the invalid lines (`invalid_sample_skip_percentage`,
        a fraction 0..0.5 as in Mistral's API)."""
        return self.valid > 0 and self.invalid_fraction <= skip_fraction

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lines": self.lines,
            "valid": self.valid,
            "error_count": self.error_count,
            "errors": [{"line": e.line, "message": e.message} for e in self.errors],
            "targets": {name: stats.to_dict() for name, stats in self.targets.items()},
            "duplicates": self.duplicates,
            "conflicting_duplicates": self.conflicting_duplicates,
            "empty_texts": self.empty_texts,
            "long_texts": self.long_texts,
            "max_chars": self.max_chars,
            "mean_chars": round(self.total_chars / self.valid, 1) if self.valid else 0.0,
        }


class _Validator:
    def __init__(self, kind: Kind | None, targets: Sequence[TargetSpec] | None, keep: bool,
                 max_errors: int, long_text_chars: int) -> None:
        self.report = ValidationReport(kind=kind)
        self.kind_fixed = kind is not None
        self.kind_line = 0
        self.declared = {t.name: t for t in targets} if targets else None
        self.keep = keep
        self.max_errors = max_errors
        self.long_text_chars = long_text_chars
        self.seen: dict[bytes, bytes] = {}  # input digest -> labels digest

    def error(self, line: int, message: str) -> None:
        self.report.error_count += 1
        if len(self.report.errors) < self.max_errors:
            self.report.errors.append(LineError(line, message))

    def line(self, number: int, raw: str | bytes) -> None:
        if not raw.strip():
            return
        self.report.lines += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.error(number, f"not valid JSON ({exc.args[0].split(':')[0]})")
            return
        if not isinstance(obj, dict):
            self.error(number, f"expected a JSON object, got {_json_type(obj)}")
            return
        has_text, has_messages = "text" in obj, "messages" in obj
        if has_text == has_messages:
            self.error(number, "needs exactly one of `text` (text data) or `messages` (chat data), "
                               + ("got both" if has_text else "got neither"))
            return
        line_kind: Kind = "text" if has_text else "chat"
        if not self._check_kind(number, line_kind):
            return
        if has_text:
            text = obj["text"]
            if not isinstance(text, str):
                self.error(number, f"`text` must be a string, got {_json_type(text)}")
                return
            messages = None
        else:
            checked = self._check_messages(number, obj["messages"])
            if checked is None:
                return
            messages = checked
            text = render_messages(messages)
        labels = self._check_labels(number, obj.get("labels", _MISSING))
        if labels is None:
            return
        self._count(number, text, messages, labels)

    def _check_kind(self, number: int, line_kind: Kind) -> bool:
        report = self.report
        if report.kind is None:
            report.kind, self.kind_line = line_kind, number
            return True
        if report.kind == line_kind:
            return True
        field_name = "text" if line_kind == "text" else "messages"
        if self.kind_fixed:
            self.error(number, f"has `{field_name}` ({line_kind} data), but this is a "
                               f"{report.kind} classifier: use "
                               f"`{'messages' if report.kind == 'chat' else 'text'}`")
        else:
            self.error(number, f"has `{field_name}` ({line_kind} data), but the file is "
                               f"{report.kind} data (line {self.kind_line}); "
                               "do not mix text and chat examples")
        return False

    def _check_messages(self, number: int, messages: Any) -> tuple[Mapping[str, Any], ...] | None:
        if not isinstance(messages, list) or not messages:
            self.error(number, "`messages` must be a non-empty list of {role, content} objects")
            return None
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                self.error(number, f"messages[{i}] must be an object, got {_json_type(message)}")
                return None
            role = message.get("role")
            if role not in ROLES:
                self.error(number, f"messages[{i}].role is {orjson.dumps(role).decode()}; "
                                   f"expected one of {', '.join(ROLES)}")
                return None
            content = message.get("content")
            if not (isinstance(content, str) or content is None
                    or (isinstance(content, list) and all(isinstance(c, dict) for c in content))):
                self.error(number, f"messages[{i}].content must be a string, "
                                   f"got {_json_type(content)}")
                return None
        return tuple(messages)

    def _check_labels(self, number: int, labels: Any) -> dict[str, str | tuple[str, ...]] | None:
        if labels is _MISSING:
            self.error(number, "missing `labels` (an object mapping target name to label)")
            return None
        if not isinstance(labels, dict):
            self.error(number, f"`labels` must be an object, got {_json_type(labels)}")
            return None
        if not labels:
            self.error(number, "`labels` is empty: give at least one target, "
                               'e.g. {"sentiment": "positive"}')
            return None
        out: dict[str, str | tuple[str, ...]] = {}
        for name, value in labels.items():
            if not name.strip():
                self.error(number, "`labels` has an empty target name")
                return None
            if isinstance(value, str):
                if not value.strip():
                    self.error(number, f"labels.{name} is an empty string")
                    return None
                out[name] = value
            elif (isinstance(value, list) and value
                  and all(isinstance(v, str) and v.strip() for v in value)):
                out[name] = tuple(dict.fromkeys(value))  # drop repeats, keep order
            else:
                self.error(number, f"labels.{name} must be a string or a non-empty list of "
                                   f"non-empty strings, got {orjson.dumps(value).decode()[:80]}")
                return None
            if self.declared is not None and not self._check_declared(number, name, out[name]):
                return None
        return out

    def _check_declared(self, number: int, name: str, value: str | tuple[str, ...]) -> bool:
        assert self.declared is not None
        spec = self.declared.get(name)
        if spec is None:
            self.error(number, f"labels.{name}: target `{name}` is not among the declared "
                               f"classifier_targets ({', '.join(self.declared)})")
            return False
        if isinstance(value, tuple) and spec.loss_function == "single_class":
            self.error(number, f"labels.{name} is a list, but target `{name}` is single_class: "
                               "give one label, or declare it multi_class")
            return False
        if spec.labels:
            values = (value,) if isinstance(value, str) else value
            unknown = [v for v in values if v not in spec.labels]
            if unknown:
                self.error(number, f"labels.{name}: {unknown[0]!r} is not one of the declared "
                                   f"labels ({', '.join(spec.labels)})")
                return False
        return True

    def _count(self, number: int, text: str, messages: tuple[Mapping[str, Any], ...] | None,
               labels: dict[str, str | tuple[str, ...]]) -> None:
        report = self.report
        report.valid += 1
        for name, value in labels.items():
            stats = report.targets.get(name)
            if stats is None:
                stats = report.targets[name] = TargetStats(name)
            stats.examples += 1
            if isinstance(value, str):
                stats.label_counts[value] += 1
            else:
                stats.multi_label_examples += 1
                stats.label_counts.update(value)
        content = text if messages is None else "".join(
            content_text(m.get("content")) for m in messages)
        if not content.strip():
            report.empty_texts += 1
        chars = len(text)
        report.total_chars += chars
        report.max_chars = max(report.max_chars, chars)
        if chars > self.long_text_chars:
            report.long_texts += 1
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        label_key = hashlib.blake2b(orjson.dumps(labels, option=orjson.OPT_SORT_KEYS),
                                    digest_size=16).digest()
        previous = self.seen.get(key)
        if previous is None:
            self.seen[key] = label_key
        else:
            report.duplicates += 1
            if previous != label_key:
                report.conflicting_duplicates += 1
        if self.keep:
            report.examples.append(Example(number, text, labels, messages))


_MISSING = object()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def validate_lines(
    lines: Iterable[str | bytes],
    *,
    kind: Kind | None = None,
    targets: Sequence[TargetSpec] | None = None,
    keep_examples: bool = True,
    max_errors: int = DEFAULT_MAX_ERRORS,
    long_text_chars: int = DEFAULT_LONG_TEXT_CHARS,
    first_line: int = 1,
) -> ValidationReport:
    """Validate JSONL lines (numbered from `first_line`; blank lines are skipped but counted).

    `kind` fixes text or chat data (otherwise the first valid line decides, and later lines of the
    other kind are errors). `targets` (a job's `classifier_targets`) makes unknown target names,
    undeclared labels and lists for single_class targets errors. Valid examples are kept in
    `report.examples` unless `keep_examples` is false (statistics only).
    """
    validator = _Validator(kind, targets, keep_examples, max_errors, long_text_chars)
    for number, raw in enumerate(lines, start=first_line):
        if number == first_line:  # files saved by some Windows tools start with a BOM
            raw = raw.removeprefix(b"\xef\xbb\xbf") if isinstance(raw, bytes) \
                else raw.removeprefix("\ufeff")
        validator.line(number, raw)
    return validator.report


def validate_file(path: Path | str, **options: Any) -> ValidationReport:
    """`validate_lines` over a file, read line by line (a file of any size fits in memory only as
    far as its valid examples do; pass `keep_examples=False` for statistics alone)."""
    with Path(path).open("rb") as handle:
        return validate_lines(handle, **options)


def merge_reports(reports: Sequence[ValidationReport]) -> ValidationReport:
    """One report for several files (a job's training files): counts and targets added up; the
    examples and errors stay in the per-file reports (their line numbers are per file)."""
    if len(reports) == 1:
        return reports[0]
    merged = ValidationReport(kind=next((r.kind for r in reports if r.kind), None))
    for report in reports:
        merged.lines += report.lines
        merged.valid += report.valid
        merged.error_count += report.error_count
        merged.duplicates += report.duplicates
        merged.conflicting_duplicates += report.conflicting_duplicates
        merged.empty_texts += report.empty_texts
        merged.long_texts += report.long_texts
        merged.total_chars += report.total_chars
        merged.max_chars = max(merged.max_chars, report.max_chars)
        for name, stats in report.targets.items():
            into = merged.targets.setdefault(name, TargetStats(name))
            into.label_counts.update(stats.label_counts)
            into.examples += stats.examples
            into.multi_label_examples += stats.multi_label_examples
    return merged


def resolve_targets(report: ValidationReport,
                    declared: Sequence[TargetSpec] | None = None) -> list[TargetSpec]:
    """The targets a model will have: declared ones (labels filled in from the data when not
    given), or else every target of the data, with its loss function inferred (a target with list
    values is multi_class)."""
    if declared:
        out = []
        for spec in declared:
            stats = report.targets.get(spec.name)
            labels = spec.labels or tuple(stats.labels if stats else ())
            loss = spec.loss_function or (stats.loss_function if stats else "single_class")
            out.append(TargetSpec(spec.name, tuple(labels), loss, spec.weight))
        return out
    return [TargetSpec(s.name, tuple(s.labels), s.loss_function) for s in report.targets.values()]
