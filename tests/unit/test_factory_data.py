"""The JSONL validator: every documented error, with its line number, and the statistics."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from service.factory.data import (
    TargetSpec,
    resolve_targets,
    validate_file,
    validate_lines,
)
from service.wire import render_messages


def _lines(*objects: object) -> list[str]:
    return [o if isinstance(o, str) else orjson.dumps(o).decode() for o in objects]


GOOD_TEXT = {"text": "I love it", "labels": {"sentiment": "positive"}}
GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}], "labels": {"intent": "greet"}}


def test_valid_text_file_reports_kind_targets_and_counts() -> None:
    report = validate_lines(_lines(
        GOOD_TEXT,
        {"text": "Awful", "labels": {"sentiment": "negative", "topic": ["a", "b"]}},
        {"text": "Meh", "labels": {"sentiment": "negative"}},
    ))
    assert report.ok
    assert report.kind == "text"
    assert report.valid == 3 and report.lines == 3
    assert report.targets["sentiment"].label_counts == {"negative": 2, "positive": 1}
    assert report.targets["sentiment"].loss_function == "single_class"
    assert report.targets["topic"].loss_function == "multi_class"
    assert report.targets["topic"].examples == 1
    assert [e.line for e in report.examples] == [1, 2, 3]
    assert report.examples[1].labels["topic"] == ("a", "b")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('{"labels": {"a": "b"}}', "got neither"),
        ('{"text": "x", "messages": [], "labels": {"a": "b"}}', "got both"),
        ('{"text": 3, "labels": {"a": "b"}}', "`text` must be a string"),
        ('{"text": "x"}', "missing `labels`"),
        ('{"text": "x", "labels": {}}', "`labels` is empty"),
        ('{"text": "x", "labels": ["a"]}', "`labels` must be an object"),
        ('{"text": "x", "labels": {"a": 1}}', "labels.a must be a string or a non-empty list"),
        ('{"text": "x", "labels": {"a": []}}', "labels.a must be a string or a non-empty list"),
        ('{"text": "x", "labels": {"a": ["b", 2]}}', "labels.a must be a string or a non-empty"),
        ('{"text": "x", "labels": {"a": ""}}', "labels.a is an empty string"),
    ],
)
def test_each_error_names_its_line(line: str, fragment: str) -> None:
    report = validate_lines(_lines(GOOD_TEXT, line, GOOD_TEXT))
    assert not report.ok
    assert report.error_count == 1
    assert report.errors[0].line == 2
    assert fragment in report.errors[0].message
    assert str(report.errors[0]).startswith("line 2: ")
    assert report.valid == 2


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], "messages[0] must be an object"),
        ([{"role": "robot", "content": "x"}], 'messages[0].role is "robot"'),
        ([{"content": "x"}], "messages[0].role is null"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
    ],
)
def test_bad_messages(messages: object, fragment: str) -> None:
    report = validate_lines(_lines({"messages": messages, "labels": {"a": "b"}}))
    assert report.errors[0].line == 1
    assert fragment in report.errors[0].message


def test_chat_data_accepts_sdk_extras_and_renders_roles() -> None:
    line = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello", "prefix": False}],
            "labels": {"intent": "greet"}}
    report = validate_lines(_lines(line))
    assert report.ok and report.kind == "chat"
    assert report.examples[0].text == "user: hi\nassistant: hello"
    assert render_messages(line["messages"]) == "user: hi\nassistant: hello"  # type: ignore[arg-type]


def test_mixed_kinds_name_the_first_line_of_the_other_kind() -> None:
    report = validate_lines(_lines(GOOD_TEXT, GOOD_CHAT, GOOD_TEXT))
    assert report.error_count == 1
    assert report.errors[0].line == 2
    assert "line 1" in report.errors[0].message


def test_declared_kind_rejects_the_other_kind() -> None:
    report = validate_lines(_lines(GOOD_TEXT), kind="chat")
    assert report.errors[0].line == 1
    assert "chat classifier" in report.errors[0].message
    assert validate_lines(_lines(GOOD_CHAT), kind="text").error_count == 1


def test_blank_lines_keep_numbering_and_are_not_examples() -> None:
    report = validate_lines(["", orjson.dumps(GOOD_TEXT).decode(), "   ", "oops"])
    assert report.lines == 2
    assert report.errors[0].line == 4


def test_statistics_duplicates_empty_and_long_texts() -> None:
    report = validate_lines(_lines(
        GOOD_TEXT, GOOD_TEXT,
        {"text": "I love it", "labels": {"sentiment": "negative"}},
        {"text": "  ", "labels": {"sentiment": "neutral"}},
        {"text": "x" * 50, "labels": {"sentiment": "neutral"}},
    ), long_text_chars=40)
    assert report.ok
    assert report.duplicates == 2
    assert report.conflicting_duplicates == 1
    assert report.empty_texts == 1
    assert report.long_texts == 1
    assert report.max_chars == 50
    summary = report.to_dict()
    assert summary["targets"]["sentiment"]["labels"] == {"negative": 1, "neutral": 2, "positive": 2}
    assert orjson.loads(orjson.dumps(summary)) == summary


def test_errors_are_capped_but_counted() -> None:
    report = validate_lines(["nope"] * 30, max_errors=20)
    assert report.error_count == 30
    assert len(report.errors) == 20
    assert [e.line for e in report.errors] == list(range(1, 21))


def test_skip_fraction() -> None:
    report = validate_lines(_lines(*([GOOD_TEXT] * 9), "bad"))
    assert not report.ok
    assert report.invalid_fraction == pytest.approx(0.1)
    assert report.acceptable(0.1)
    assert not report.acceptable(0.05)
    assert not validate_lines([]).acceptable(0.5)


def test_declared_targets_check_names_labels_and_kind_of_value() -> None:
    declared = [TargetSpec("sentiment", ("positive", "negative"), "single_class")]
    report = validate_lines(_lines(
        GOOD_TEXT,
        {"text": "a", "labels": {"other": "x"}},
        {"text": "b", "labels": {"sentiment": "meh"}},
        {"text": "c", "labels": {"sentiment": ["positive"]}},
    ), targets=declared)
    assert [e.line for e in report.errors] == [2, 3, 4]
    assert "not among the declared" in report.errors[0].message
    assert "'meh' is not one of the declared labels" in report.errors[1].message
    assert "single_class" in report.errors[2].message


def test_resolve_targets_infers_or_completes() -> None:
    report = validate_lines(_lines(
        GOOD_TEXT, {"text": "b", "labels": {"sentiment": "negative", "tags": ["x", "y"]}}))
    inferred = resolve_targets(report)
    assert [(t.name, t.labels, t.loss_function) for t in inferred] == [
        ("sentiment", ("negative", "positive"), "single_class"),
        ("tags", ("x", "y"), "multi_class"),
    ]
    completed = resolve_targets(report, [TargetSpec("tags", weight=2.0)])
    assert completed == [TargetSpec("tags", ("x", "y"), "multi_class", 2.0)]


def test_validate_file_reads_bytes(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(GOOD_TEXT) for _ in range(3)) + b"\n{bad\n")
    report = validate_file(path, keep_examples=False)
    assert report.valid == 3 and report.examples == []
    assert report.errors[0].line == 4


def test_merge_reports_adds_up_counts_and_labels() -> None:
    from service.factory.data import merge_reports

    a = validate_lines(_lines(GOOD_TEXT, GOOD_TEXT, "bad"))
    b = validate_lines(_lines({"text": "no", "labels": {"sentiment": "negative"}}))
    merged = merge_reports([a, b])
    assert merged.valid == 3 and merged.lines == 4 and merged.error_count == 1
    assert merged.duplicates == 1
    assert merged.targets["sentiment"].label_counts == {"positive": 2, "negative": 1}
    assert merge_reports([a]) is a


def test_bom_and_crlf_are_tolerated() -> None:
    raw = b"\xef\xbb\xbf" + orjson.dumps(GOOD_TEXT) + b"\r\n" + orjson.dumps(GOOD_TEXT) + b"\r\n"
    report = validate_lines(raw.splitlines(keepends=True))
    assert report.ok and report.valid == 2
    text = "\ufeff" + orjson.dumps(GOOD_TEXT).decode()
    assert validate_lines([text]).ok
