"""Turn a raw labelled corpus into the training and validation files that fine-tuning wants.

Pure logic (no printing): reading CSV into JSONL lines, dropping duplicates, empty texts and labels
with too few examples, capping frequent labels, and a stratified split. Validation itself is the
factory's (`service.factory.data`), so that a file this module accepts is one the factory accepts.
Mistral's cookbook practice is to drop labels under about 200 examples and cap each at about 600.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from service.commands.output import plural
from service.factory.data import Example, ValidationReport, validate_lines

LabelKey = tuple[str, str]  # (target, label)


class PrepareError(ValueError):
    """Input that cannot be prepared; the message says which column, row or option."""


def csv_lines(path: Path, text_column: str, label_column: str, target: str | None = None,
              label_separator: str | None = None) -> Iterator[bytes]:
    """JSONL lines from a CSV with a header row. Each row becomes
    `{"text": ..., "labels": {target: label}}`; with `label_separator` a cell holding several
    labels becomes a multi-label list. The first yielded line is for the first data row; the caller
    numbers them from 2, like a spreadsheet would (row 1 is the header)."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for column in (text_column, label_column):
            if column not in columns:
                raise PrepareError(f"{path}: no column {column!r}; the header has "
                                   f"{', '.join(repr(c) for c in columns) or 'no columns'}")
        name = target or label_column
        for row in reader:
            text = row.get(text_column) or ""
            cell = (row.get(label_column) or "").strip()
            label: str | list[str] = cell
            if label_separator:
                label = [part.strip() for part in cell.split(label_separator) if part.strip()]
            yield orjson.dumps({"text": text, "labels": {name: label}})


def read_report(path: Path, *, text_column: str | None = None, label_column: str | None = None,
                target: str | None = None, label_separator: str | None = None) -> ValidationReport:
    """Validate JSONL, or CSV converted to JSONL (when the file ends in .csv or a column is given)."""
    is_csv = path.suffix.lower() == ".csv" or text_column is not None or label_column is not None
    try:
        if is_csv:
            if not text_column or not label_column:
                raise PrepareError(f"{path}: a CSV needs --text-column and --label-column")
            return validate_lines(csv_lines(path, text_column, label_column, target,
                                            label_separator), first_line=2)
        with path.open("rb") as handle:
            return validate_lines(handle)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PrepareError(f"cannot read {path}: {reason}") from None


@dataclass
class Dropped:
    """A label taken out of the data, and why."""

    target: str
    label: str
    examples: int
    reason: str


@dataclass
class Plan:
    """What `prepare` did, for printing and for `--json`."""

    kind: str
    input_examples: int
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    duplicates: int = 0
    conflicting_duplicates: int = 0
    empty_texts: int = 0
    dropped_labels: list[Dropped] = field(default_factory=list)
    capped_labels: list[Dropped] = field(default_factory=list)
    unlabelled: int = 0  # examples left with no label at all after dropping labels

    def label_counts(self) -> dict[LabelKey, tuple[int, int]]:
        """(target, label) -> (train examples, validation examples)."""
        train, valid = _count(self.train), _count(self.validation)
        return {key: (train[key], valid[key]) for key in sorted(set(train) | set(valid))}

    def to_dict(self) -> dict[str, Any]:
        targets: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
        for (target, label), (t, v) in self.label_counts().items():
            targets[target][label] = {"train": t, "validation": v}
        return {
            "kind": self.kind,
            "input_examples": self.input_examples,
            "train_examples": len(self.train),
            "validation_examples": len(self.validation),
            "duplicates_dropped": self.duplicates,
            "conflicting_duplicates": self.conflicting_duplicates,
            "empty_texts_dropped": self.empty_texts,
            "unlabelled_dropped": self.unlabelled,
            "dropped_labels": [vars(d) for d in self.dropped_labels],
            "capped_labels": [vars(d) for d in self.capped_labels],
            "targets": dict(targets),
        }


def _pairs(example: Example) -> Iterator[LabelKey]:
    for target, value in example.labels.items():
        for label in (value,) if isinstance(value, str) else value:
            yield target, label


def _count(examples: Sequence[Example]) -> Counter[LabelKey]:
    counts: Counter[LabelKey] = Counter()
    for example in examples:
        counts.update(_pairs(example))
    return counts


def _without(example: Example, dropped: set[LabelKey]) -> Example | None:
    """The example minus dropped labels; None when no label is left."""
    labels: dict[str, str | tuple[str, ...]] = {}
    for target, value in example.labels.items():
        if isinstance(value, str):
            if (target, value) not in dropped:
                labels[target] = value
        else:
            kept = tuple(v for v in value if (target, v) not in dropped)
            if kept:
                labels[target] = kept
    if not labels:
        return None
    return Example(example.line, example.text, labels, example.messages)


def _is_empty(example: Example) -> bool:
    if example.messages is None:
        return not example.text.strip()
    return not any(isinstance(m.get("content"), str) and m["content"].strip()
                   for m in example.messages)


def plan(report: ValidationReport, *, min_per_label: int = 10, max_per_label: int | None = None,
         validation_fraction: float = 0.1, seed: int = 0) -> Plan:
    """Clean, balance and split the valid examples of `report` (which must keep its examples)."""
    if min_per_label < 1:
        raise PrepareError("--min-per-label must be at least 1")
    if max_per_label is not None and max_per_label < min_per_label:
        raise PrepareError(f"--max-per-label ({max_per_label}) must be at least --min-per-label "
                           f"({min_per_label})")
    if not 0.0 <= validation_fraction < 1.0:
        raise PrepareError("--validation-fraction must be at least 0 and below 1")
    result = Plan(kind=report.kind or "text", input_examples=report.valid)

    # 1. Empty inputs teach nothing; repeated inputs would leak from training into validation.
    seen: dict[str, str] = {}
    unique: list[Example] = []
    for example in report.examples:
        if _is_empty(example):
            result.empty_texts += 1
            continue
        labels = orjson.dumps(dict(example.labels), option=orjson.OPT_SORT_KEYS).decode()
        first = seen.get(example.text)
        if first is not None:
            result.duplicates += 1
            result.conflicting_duplicates += first != labels
            continue
        seen[example.text] = labels
        unique.append(example)

    # 2. Labels with too few examples: the model cannot learn them, and they distort validation.
    counts = _count(unique)
    rare = {key for key, n in counts.items() if n < min_per_label}
    result.dropped_labels = [
        Dropped(t, lbl, counts[(t, lbl)], f"fewer than {plural(min_per_label, 'example')}")
        for t, lbl in sorted(rare)]
    kept: list[Example] = []
    for example in unique:
        trimmed = _without(example, rare)
        if trimmed is None:
            result.unlabelled += 1
        else:
            kept.append(trimmed)

    # 3. Cap frequent labels, so that one label does not swamp the others. An example stays while
    # any of its labels still needs examples (exact for one single-label target).
    rng = random.Random(seed)
    if max_per_label is not None:
        order = list(range(len(kept)))
        rng.shuffle(order)
        taken: Counter[LabelKey] = Counter()
        keep_index: set[int] = set()
        for i in order:
            pairs = list(_pairs(kept[i]))
            if any(taken[p] < max_per_label for p in pairs):
                keep_index.add(i)
                taken.update(pairs)
        before = _count(kept)
        kept = [e for i, e in enumerate(kept) if i in keep_index]
        after = _count(kept)
        result.capped_labels = [
            Dropped(t, lbl, before[(t, lbl)] - after[(t, lbl)],
                    f"capped at {plural(max_per_label, 'example')} ({before[(t, lbl)]} before)")
            for t, lbl in sorted(before) if after[(t, lbl)] < before[(t, lbl)]]

    # 4. Stratified split on the first target's label(s), so that validation has every label in
    # the proportions of training.
    strata: dict[str, list[Example]] = defaultdict(list)
    for example in kept:
        target = next(iter(example.labels))
        value = example.labels[target]
        strata[f"{target}={value if isinstance(value, str) else '|'.join(sorted(value))}"].append(
            example)
    train: list[Example] = []
    validation: list[Example] = []
    for key in sorted(strata):
        members = strata[key]
        rng.shuffle(members)
        n_valid = min(len(members) - 1, round(len(members) * validation_fraction))
        validation.extend(members[:n_valid])
        train.extend(members[n_valid:])
    # 5. Shuffled (seeded), not in the source's order: a source grouped by label would give a
    # file grouped by label, whose first lines (`head -300 train.jsonl`) hold one label only.
    rng.shuffle(train)
    rng.shuffle(validation)
    result.train = train
    result.validation = validation
    return result


def example_json(example: Example) -> bytes:
    """The example as a training line (a CSV row becomes `{"text", "labels"}`)."""
    labels = {t: v if isinstance(v, str) else list(v) for t, v in example.labels.items()}
    if example.messages is not None:
        return orjson.dumps({"messages": list(example.messages), "labels": labels})
    return orjson.dumps({"text": example.text, "labels": labels})


def write_jsonl(path: Path, examples: Sequence[Example]) -> int:
    """Write the examples; returns the file's size in bytes."""
    data = b"".join(example_json(e) + b"\n" for e in examples)
    path.write_bytes(data)
    return len(data)
