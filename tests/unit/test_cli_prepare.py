"""`data prepare` logic: cleaning, dropping, capping and the stratified split, and CSV reading."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from service.commands.prepare import PrepareError, example_json, plan, read_report
from service.factory.data import validate_lines


def lines(*examples: tuple[str, object]) -> list[bytes]:
    return [orjson.dumps({"text": t, "labels": {"topic": lbl}}) for t, lbl in examples]


def corpus(counts: dict[str, int]) -> list[bytes]:
    return lines(*[(f"{label} text number {i}", label)
                   for label, n in counts.items() for i in range(n)])


def test_drops_rare_labels_caps_frequent_ones_and_splits_by_label() -> None:
    report = validate_lines(corpus({"a": 50, "b": 20, "c": 3}))
    result = plan(report, min_per_label=5, max_per_label=30, validation_fraction=0.2, seed=1)
    assert [(d.label, d.examples) for d in result.dropped_labels] == [("c", 3)]
    assert result.unlabelled == 3
    assert [(d.label, d.examples) for d in result.capped_labels] == [("a", 20)]
    assert result.label_counts() == {("topic", "a"): (24, 6), ("topic", "b"): (16, 4)}
    train_texts = {e.text for e in result.train}
    assert not train_texts & {e.text for e in result.validation}


def test_the_split_is_reproducible_with_a_seed_and_changes_with_another() -> None:
    report = validate_lines(corpus({"a": 40, "b": 40}))
    first = plan(report, validation_fraction=0.25, seed=7)
    again = plan(report, validation_fraction=0.25, seed=7)
    other = plan(report, validation_fraction=0.25, seed=8)
    assert [e.line for e in first.validation] == [e.line for e in again.validation]
    assert [e.line for e in first.validation] != [e.line for e in other.validation]


def test_duplicates_and_empty_texts_are_dropped_and_counted() -> None:
    report = validate_lines(lines(("same", "a"), ("same", "b"), ("same", "a"), ("  ", "a"),
                                  *[(f"x{i}", "a") for i in range(12)]))
    result = plan(report, min_per_label=1, validation_fraction=0.0)
    assert (result.duplicates, result.conflicting_duplicates, result.empty_texts) == (2, 1, 1)
    assert len(result.train) == 13 and result.validation == []


def test_a_label_with_one_example_stays_in_training() -> None:
    report = validate_lines(lines(("only one", "a"), *[(f"t{i}", "b") for i in range(9)]))
    result = plan(report, min_per_label=1, validation_fraction=0.5)
    assert result.label_counts()[("topic", "a")] == (1, 0)


def test_multi_label_values_lose_only_the_dropped_labels() -> None:
    raw = [orjson.dumps({"text": f"t{i}", "labels": {"tags": ["common", "rare"] if i == 0
                                                     else ["common"]}}) for i in range(12)]
    result = plan(validate_lines(raw), min_per_label=2, validation_fraction=0.0)
    assert result.dropped_labels[0].label == "rare"
    first = next(e for e in result.train if e.line == 1)
    assert orjson.loads(example_json(first)) == {"text": "t0", "labels": {"tags": ["common"]}}


def test_chat_examples_keep_their_messages() -> None:
    raw = [orjson.dumps({"messages": [{"role": "user", "content": f"hi {i}"}],
                         "labels": {"intent": "greet"}}) for i in range(10)]
    result = plan(validate_lines(raw), min_per_label=1, validation_fraction=0.0)
    assert result.kind == "chat"
    first = next(e for e in result.train if e.line == 1)
    assert orjson.loads(example_json(first))["messages"] == [{"role": "user", "content": "hi 0"}]


@pytest.mark.parametrize(("options", "message"), [
    ({"min_per_label": 0}, "--min-per-label"),
    ({"min_per_label": 10, "max_per_label": 5}, "--max-per-label (5)"),
    ({"validation_fraction": 1.0}, "--validation-fraction"),
])
def test_bad_options_name_the_option(options: dict[str, float], message: str) -> None:
    with pytest.raises(PrepareError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(validate_lines(corpus({"a": 3})), **options)  # type: ignore[arg-type]


def test_csv_rows_become_examples_numbered_like_a_spreadsheet(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('review,stars\n"Great, really",good\nAwful,\n"Fine\nI guess",ok\n')
    report = read_report(path, text_column="review", label_column="stars")
    assert report.valid == 2
    assert [(e.line, str(e)) for e in report.errors] == [
        (3, "line 3: labels.stars is an empty string")]
    assert Counter(report.targets["stars"].label_counts) == {"good": 1, "ok": 1}


def test_csv_multi_label_cells_split_on_the_separator(tmp_path: Path) -> None:
    path = tmp_path / "tags.csv"
    path.write_text("text,tags\nhello,a|b\n")
    report = read_report(path, text_column="text", label_column="tags", target="topics",
                         label_separator="|")
    assert report.targets["topics"].loss_function == "multi_class"
    assert report.examples[0].labels == {"topics": ("a", "b")}


def test_a_missing_csv_column_names_the_columns_there_are(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("body,label\nx,y\n")
    with pytest.raises(PrepareError, match="no column 'text'; the header has 'body', 'label'"):
        read_report(path, text_column="text", label_column="label")


def test_a_source_grouped_by_label_is_written_shuffled_with_the_seed() -> None:
    """A CSV sorted by label used to give a train.jsonl sorted by label, so `head -300` of it was
    a one-label file that fails validation. The order is a seeded shuffle: every stretch of the
    file mixes the labels, and the same seed writes the same file."""
    report = validate_lines(corpus({"a": 100, "b": 100, "c": 100}))
    first = plan(report, validation_fraction=0.1, seed=3)
    head = [e.labels["topic"] for e in first.train[:30]]
    assert set(head) == {"a", "b", "c"}, head
    assert [e.line for e in first.train] == [e.line for e in plan(report, seed=3,
                                                                  validation_fraction=0.1).train]
    assert [e.line for e in first.train] != [e.line for e in plan(report, seed=4,
                                                                  validation_fraction=0.1).train]
    assert {e.labels["topic"] for e in first.validation[:6]} == {"a", "b", "c"}
