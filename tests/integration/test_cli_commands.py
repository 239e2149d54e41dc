"""The CLI's local commands in-process (`main([...])`): data, tasks, exit codes, help, output."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest
import yaml

from service.cli import build_parser, main
from service.commands import tasksfile
from service.gateway import task_edits
from service.gateway.registry import load_registry
from tests.support.factory import running_factory
from tests.support.fake_upstream import running_fake_upstream
from tests.support.processes import REPO


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def all_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                 ) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.append((*prefix, name))
                found.extend(all_commands(child, (*prefix, name)))
    return found


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = all_commands(build_parser())
    assert {("data", "prepare"), ("finetune",), ("jobs", "cancel"), ("models", "delete"),
            ("tasks", "set"), ("classify",), ("classify-chat",)} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: classifier-gateway " + " ".join(command) in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--train", "x.jsonl"])
    assert exit_info.value.code == 2
    assert "--task" in capsys.readouterr().err


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def test_data_validate_summarises_a_good_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[object] = [{"text": f"t{i}", "labels": {"mood": "up" if i % 3 else "down",
                                                      "tags": ["x", "y"] if i % 2 else ["x"]}}
                          for i in range(9)]
    rows.append({"text": "t1", "labels": {"mood": "down", "tags": ["x"]}})
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    code, out, _ = run(capsys, "data", "validate", str(path))
    assert code == 0
    assert f"{path}: text data, 10 valid examples of 10 lines, 2 targets" in out
    assert "target mood (single-label, 2 labels, 10 examples)" in out
    assert "target tags (multi-label, 2 labels, 10 examples)" in out
    assert "duplicates: 1 (1 with different labels)" in out
    code, out, _ = run(capsys, "data", "validate", str(path), "--json")
    body = orjson.loads(out)
    assert body["ok"] is True
    assert body["files"][0]["targets"]["mood"]["labels"] == {"down": 4, "up": 6}


def test_counts_of_one_read_in_the_singular(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "t", "labels": {"mood": "up"}}])
    code, out, _ = run(capsys, "data", "validate", str(path))
    assert f"{path}: text data, 1 valid example of 1 line, 1 target" in out
    assert "target mood (single-label, 1 label, 1 example)" in out
    assert "text length: mean 1 char, max 1" in out
    path.write_text('{"text": "ok", "labels": {"a": "b"}}\nnot json\n')
    code, _, err = run(capsys, "data", "validate", str(path))
    assert code == 1 and err.startswith(f"classifier-gateway: {path}: 1 invalid line (first: ")


def test_data_validate_lists_line_errors_and_exits_1_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "labels": {"a": "b"}}\n{"text": 1, "labels": {"a": "b"}}\n'
                    "not json\n")
    code, out, err = run(capsys, "data", "validate", str(path))
    assert code == 1
    assert f"{path}: line 2: `text` must be a string, got a number" in out
    assert f"{path}: line 3: not valid JSON" in out
    assert err.count("\n") == 1
    assert err.startswith(f"classifier-gateway: {path}: 2 invalid lines (first: line 2: ")


def test_data_validate_rejects_text_and_chat_files_together(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": t, "labels": {"x": t}} for t in "yz"])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": t}],
                                               "labels": {"x": t}} for t in "yz"])
    code, _, err = run(capsys, "data", "validate", str(text), str(chat))
    assert code == 1 and "mix text and chat data" in err


def test_data_validate_of_a_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "data", "validate", "/nonexistent/train.jsonl")
    assert (code, err) == (1, "classifier-gateway: cannot read /nonexistent/train.jsonl: "
                              "No such file or directory\n")


def test_data_prepare_writes_both_files_and_says_what_it_dropped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows: list[object] = [{"text": f"{label} {i}", "labels": {"topic": label}}
                          for label, n in (("big", 30), ("small", 12), ("tiny", 2))
                          for i in range(n)]
    source = write_jsonl(tmp_path / "all.jsonl", rows)
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "data", "prepare", str(source), "--out-dir", str(out_dir),
                       "--max-per-label", "20", "--validation-fraction", "0.25")
    assert code == 0
    assert "dropped label topic=tiny: 2 examples, fewer than 10 examples" in out
    assert "capped label topic=big: dropped 10, capped at 20 examples (30 before)" in out
    train = (out_dir / "train.jsonl").read_bytes().splitlines()
    validation = (out_dir / "validation.jsonl").read_bytes().splitlines()
    assert (len(train), len(validation)) == (24, 8)
    code, _, _ = run(capsys, "data", "validate", str(out_dir / "train.jsonl"),
                     str(out_dir / "validation.jsonl"))
    assert code == 0


def test_data_prepare_stops_at_invalid_lines_unless_told_to_skip(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "data.csv"
    source.write_text("text,label\n" + "".join(f"t{i},a\n" for i in range(12)) + "t,\n")
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "data", "prepare", str(source), "--out-dir", str(out_dir),
                         "--text-column", "text", "--label-column", "label")
    assert code == 1 and "line 14: labels.label is an empty string" in out
    assert "pass --skip-invalid" in err and not out_dir.exists()
    code, out, _ = run(capsys, "data", "prepare", str(source), "--out-dir", str(out_dir),
                       "--text-column", "text", "--label-column", "label", "--skip-invalid",
                       "--json")
    body = orjson.loads(out)
    assert code == 0 and body["invalid_lines_dropped"] == 1
    assert body["targets"]["label"]["a"] == {"train": 11, "validation": 1}


def test_data_prepare_says_when_nothing_is_left(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "few.jsonl", [{"text": "a", "labels": {"t": "x"}}])
    code, _, err = run(capsys, "data", "prepare", str(source), "--out-dir", str(tmp_path / "o"))
    assert code == 1 and "lower --min-per-label" in err


# -- tasks ------------------------------------------------------------------------------------

def test_tasks_set_creates_the_file_with_its_upstream_and_list_shows_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.setenv("FACTORY_URL", "http://127.0.0.1:9999")
    tasks = tmp_path / "tasks.yaml"
    code, out, _ = run(capsys, "tasks", "set", "news", "--model", "ft:classifier:a", "--force",
                       "--tasks", str(tasks))
    assert code == 0 and "task news -> ft:classifier:a on local (text)" in out
    registry = load_registry(tasks)
    assert registry.upstreams["local"].base_url == "http://127.0.0.1:9999"
    assert registry.upstreams["local"].api_key_env == "FACTORY_API_KEY"
    code, out, _ = run(capsys, "tasks", "set", "news", "--cache-ttl-s", "60", "--tasks", str(tasks))
    assert code == 0
    assert load_registry(tasks).tasks["news"].cache_ttl_s == 60
    assert load_registry(tasks).tasks["news"].model == "ft:classifier:a"  # kept
    assert load_registry(tasks).tasks["news"].cache_scope == "tenant"  # the default
    code, out, _ = run(capsys, "tasks", "set", "news", "--cache-scope", "shared", "--tasks",
                       str(tasks))
    assert code == 0 and "cache_scope" in out
    assert load_registry(tasks).tasks["news"].cache_scope == "shared"
    assert load_registry(tasks).tasks["news"].cache_ttl_s == 60  # kept
    code, out, _ = run(capsys, "tasks", "list", "--tasks", str(tasks))
    assert out.splitlines() == ["task  kind  upstream  model",
                                "news  text  local     ft:classifier:a"]
    code, out, _ = run(capsys, "tasks", "list", "--tasks", str(tasks), "--json")
    assert orjson.loads(out)["tasks"][0]["base_url"] == "http://127.0.0.1:9999"


def test_tasks_set_refuses_an_invalid_result_and_leaves_the_file_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.yaml"
    run(capsys, "tasks", "set", "news", "--model", "m1", "--force", "--tasks", str(tasks))
    before = tasks.read_bytes()
    code, _, err = run(capsys, "tasks", "set", "news", "--upstream", "nowhere", "--tasks",
                       str(tasks))
    assert code == 1 and "unknown upstream 'nowhere'" in err and err.count("\n") == 1
    code, _, err = run(capsys, "tasks", "set", "news", "--threshold", "2", "--tasks", str(tasks))
    assert code == 1 and "tasks.news.threshold" in err
    code, _, err = run(capsys, "tasks", "set", "other", "--tasks", str(tasks))
    assert code == 1 and "task 'other' is new: give its --model" in err
    assert tasks.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".tasks.yaml.lock")] == [
        "tasks.yaml"]  # no temporary file left behind


def test_tasks_set_rolls_out_a_canary_and_a_shadow_and_sets_review_feedback_and_labels(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What used to need a hand edit of the tasks file: each flag lands in the task, settings not
    given are kept, the `--no-*` flags remove, and the gateway's parser still guards the ranges."""
    tasks = tmp_path / "tasks.yaml"
    run(capsys, "tasks", "set", "news", "--model", "m1", "--force", "--tasks", str(tasks))
    code, _, err = run(capsys, "tasks", "set", "news", "--canary", "m2", "--shadow", "m3",
                       "--shadow-sample", "0.25", "--review-margin", "0.1", "--feedback",
                       "--target", "topic", "--labels", "a, b,c", "--force", "--tasks",
                       str(tasks))
    assert code == 0, err
    task = load_registry(tasks).tasks["news"]
    assert task.model == "m1" and task.canary is not None and task.shadow is not None
    assert (task.canary.model, task.canary.weight, task.canary.upstream) == ("m2", 0.1, None)
    assert (task.shadow.model, task.shadow.sample) == ("m3", 0.25)
    assert task.review is not None and (task.review.max_margin, task.review.sample) == (0.1, 0.0)
    assert task.feedback and task.target == "topic" and task.labels == ("a", "b", "c")

    # A weight alone changes the canary it has; a new canary model starts from the default.
    run(capsys, "tasks", "set", "news", "--canary-weight", "0.5", "--review-sample", "0.02",
        "--tasks", str(tasks))
    task = load_registry(tasks).tasks["news"]
    assert task.canary is not None and (task.canary.model, task.canary.weight) == ("m2", 0.5)
    assert task.review is not None and (task.review.max_margin, task.review.sample) == (0.1, 0.02)
    before = tasks.read_bytes()
    code, _, err = run(capsys, "tasks", "set", "news", "--canary-weight", "1.5", "--tasks",
                       str(tasks))
    assert code == 1 and "tasks.news.canary.weight" in err and tasks.read_bytes() == before
    code, _, err = run(capsys, "tasks", "set", "news", "--no-shadow", "--shadow", "m4",
                       "--tasks", str(tasks))
    assert code == 1 and "--no-shadow removes the shadow: give it alone" in err

    # The shadow on another upstream: a well-known one is added to the file, as for a task; the
    # task's own upstream is the default, so naming it leaves the entry without one.
    run(capsys, "tasks", "set", "news", "--shadow-upstream", "mistral", "--force", "--tasks",
        str(tasks))
    task = load_registry(tasks).tasks["news"]
    assert task.shadow is not None and task.shadow.upstream == "mistral"
    assert "mistral" in load_registry(tasks).upstreams
    run(capsys, "tasks", "set", "news", "--shadow-upstream", "local", "--force", "--tasks",
        str(tasks))
    task = load_registry(tasks).tasks["news"]
    assert task.shadow is not None and task.shadow.upstream is None
    assert task.shadow.sample == 0.25

    # `tasks promote` finishes the rollout the flags started.
    code, _, _ = run(capsys, "tasks", "promote", "news", "--from", "canary", "--tasks", str(tasks))
    assert code == 0 and load_registry(tasks).tasks["news"].model == "m2"
    run(capsys, "tasks", "set", "news", "--no-shadow", "--no-review", "--no-feedback",
        "--tasks", str(tasks))
    task = load_registry(tasks).tasks["news"]
    assert (task.shadow, task.review, task.feedback, task.canary) == (None, None, False, None)
    code, _, err = run(capsys, "tasks", "set", "news", "--shadow-sample", "0.5", "--tasks",
                       str(tasks))
    assert code == 1 and "task 'news' has no shadow to change: give --shadow MODEL" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main(["tasks", "set", "news", "--labels", "a,,b", "--tasks", str(tasks)])
    assert exit_info.value.code == 2 and "none empty" in capsys.readouterr().err


def test_tasks_set_confirms_what_changed_and_show_reads_as_words(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tasks set --shadow` used to confirm `task news -> m1 on local`, the model it kept, and
    `tasks show` printed Python's `True`."""
    tasks = tmp_path / "tasks.yaml"
    code, out, _ = run(capsys, "tasks", "set", "news", "--model", "m1", "--canary", "m2",
                       "--force", "--tasks", str(tasks))
    assert code == 0 and out == f"task news -> m1 on local (text); canary m2 (weight 0.1), saved in {tasks}\n"
    code, out, _ = run(capsys, "tasks", "set", "news", "--shadow", "m3", "--shadow-sample",
                       "0.25", "--feedback", "--force", "--tasks", str(tasks))
    assert code == 0 and out == (f"task news: shadow m3 (sample 0.25); feedback off -> on; saved in "
                   f"{tasks}\n")
    code, out, _ = run(capsys, "tasks", "set", "news", "--canary-weight", "0.5", "--no-shadow",
                       "--cache-ttl-s", "60", "--tasks", str(tasks))
    assert code == 0 and out == (f"task news: canary weight 0.1 -> 0.5; shadow removed; cache_ttl_s default "
                   f"-> 60; saved in {tasks}\n")
    code, out, _ = run(capsys, "tasks", "set", "news", "--cache-ttl-s", "60", "--tasks",
                       str(tasks))
    assert code == 0 and out == f"task news unchanged in {tasks}\n"
    code, out, _ = run(capsys, "tasks", "set", "news", "--no-feedback", "--json", "--tasks",
                       str(tasks))
    assert code == 0 and orjson.loads(out)["changes"] == ["feedback on -> off"]
    run(capsys, "tasks", "set", "news", "--feedback", "--tasks", str(tasks))
    code, out, _ = run(capsys, "tasks", "show", "news", "--tasks", str(tasks))
    rows = dict(line.split(None, 1) for line in out.splitlines()[1:])
    assert code == 0 and rows["feedback"] == "on" and rows["canary"] == "model=m2, weight=0.5"


def test_models_delete_names_the_tasks_that_use_the_model_in_words(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({
        "upstreams": {"local": {"base_url": "http://127.0.0.1:8100"}},
        "tasks": {"a": {"upstream": "local", "model": "ft:x"},
                  "b": {"upstream": "local", "model": "ft:y",
                        "canary": {"model": "ft:x", "weight": 0.1}}}}))
    code, _, err = run(capsys, "models", "delete", "ft:y", "--tasks", str(tasks))
    assert code == 1 and f"task b in {tasks} still uses this model" in err
    assert "point it at another model" in err
    code, _, err = run(capsys, "models", "delete", "ft:x", "--tasks", str(tasks))
    assert code == 1 and f"tasks a, b (canary) in {tasks} still use this model" in err
    assert "point them at another model" in err


def test_tasks_remove_and_an_unknown_task(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.yaml"
    run(capsys, "tasks", "set", "a", "--model", "m1", "--force", "--tasks", str(tasks))
    run(capsys, "tasks", "set", "b", "--model", "m2", "--kind", "chat", "--force", "--tasks",
        str(tasks))
    code, out, _ = run(capsys, "tasks", "remove", "a", "--tasks", str(tasks))
    assert out == f"task a removed from {tasks}\n"
    assert code == 0 and sorted(load_registry(tasks).tasks) == ["b"]
    code, _, err = run(capsys, "tasks", "remove", "a", "--tasks", str(tasks))
    assert (code, err) == (1, "classifier-gateway: no task named 'a' in the tasks file "
                              "(tasks: b)\n")


def test_edits_keep_the_operators_comments_order_and_quoting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(
        "# Tasks of the support team; ask #ml-platform before changing upstreams.\n"
        "upstreams:\n"
        "  local: {base_url: \"http://127.0.0.1:8100\"}  # the factory\n"
        "tasks:\n"
        "  intent:   # routes tickets\n"
        "    upstream: local\n"
        "    model: \"ft:old\"   # retrain monthly\n"
        "    kind: chat\n"
        "  sentiment:\n"
        "    upstream: local\n"
        "    model: 'ft:s'\n")
    code, _, _ = run(capsys, "tasks", "set", "intent", "--model", "ft:new", "--force", "--tasks",
                     str(tasks))
    assert code == 0
    code, _, _ = run(capsys, "tasks", "set", "news", "--model", "ft:n", "--upstream", "local",
                     "--force", "--tasks", str(tasks))
    assert code == 0
    text = tasks.read_text()
    for kept in ("# Tasks of the support team; ask #ml-platform before changing upstreams.",
                 "# the factory", "intent:   # routes tickets", "# retrain monthly",
                 "model: 'ft:s'"):
        assert kept in text, text
    assert text.index("intent:") < text.index("sentiment:") < text.index("news:")
    registry = load_registry(tasks)
    assert registry.tasks["intent"].model == "ft:new"
    assert registry.tasks["news"].model == "ft:n"


def test_a_broken_tasks_file_is_reported_not_overwritten(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks: [unclosed\n")
    for argv in (["tasks", "list"], ["tasks", "set", "x", "--model", "m"]):
        code, _, err = run(capsys, *argv, "--tasks", str(tasks))
        assert code == 1 and "is not valid YAML" in err
    assert tasks.read_text() == "tasks: [unclosed\n"


def test_edits_keep_the_file_mode_and_replace_it_atomically(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"upstreams": {"u": {"base_url": "http://x"}}, "tasks": {}}))
    os.chmod(tasks, 0o640)
    inode = tasks.stat().st_ino
    tasksfile.edit(tasks, lambda d: task_edits.set_task(d, "t", {"upstream": "u", "model": "m"}))
    assert tasks.stat().st_mode & 0o777 == 0o640
    assert tasks.stat().st_ino != inode  # renamed over, never written in place


def test_concurrent_edits_lose_nothing(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"upstreams": {"u": {"base_url": "http://x"}}, "tasks": {}}))

    def add(i: int) -> None:
        tasksfile.edit(tasks, lambda d: task_edits.set_task(d, f"t{i}", {"upstream": "u",
                                                                         "model": f"m{i}"}))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(load_registry(tasks).tasks) == [f"t{i}" for i in range(8)]


def test_watching_gives_up_after_its_patience_when_the_server_stays_down() -> None:
    import io
    import socket

    from service.commands.api import Api
    from service.commands.errors import UserError
    from service.commands.jobwatch import watch
    from service.commands.output import Progress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        stream = io.StringIO()
        with Api(url, what="the local factory", key=None, key_env="FACTORY_API_KEY",
                 start_hint="start it") as api, pytest.raises(UserError) as error:
            watch(api, "job-1", Progress(stream, tty=False), 0.01, patience_s=0.2)
    assert str(error.value) == (f"cannot reach the local factory at {url}: start it (for 0s while "
                                "watching job job-1; it may still run: `classifier-gateway jobs "
                                "wait job-1`)")
    assert stream.getvalue() == f"cannot reach the local factory at {url}: start it; retrying\n"


def test_finetune_notes_when_the_tasks_file_points_the_upstream_elsewhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.commands.api import Upstream
    from service.commands.jobwatch import warn_if_elsewhere

    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"upstreams": {"local": {"base_url": "http://proxy:9000"}},
                                     "tasks": {}}))
    warn_if_elsewhere(tasks, Upstream("local", "http://proxy:9000", "FACTORY_API_KEY"))
    assert capsys.readouterr().err == ""
    warn_if_elsewhere(tasks, Upstream("local", "http://127.0.0.1:8100", "FACTORY_API_KEY"))
    assert capsys.readouterr().err == (
        f"note: upstream 'local' in {tasks} is http://proxy:9000, but this model was trained on "
        "http://127.0.0.1:8100; change it there if the gateway should ask the latter\n")


def test_tasks_promote_keeps_previous_and_rollback_puts_it_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({
        "upstreams": {"local": {"base_url": "http://127.0.0.1:8100"},
                      "tei": {"base_url": "http://tei:80", "protocol": "tei"}},
        "tasks": {"s": {"upstream": "local", "model": "ft:v3",
                        "canary": {"model": "ft:v4", "weight": 0.1},
                        "shadow": {"model": "tei-v5", "upstream": "tei", "sample": 0.2}}}}))
    # With both, the canary is promoted, as documented; the shadow stays.
    code, out, _ = run(capsys, "tasks", "promote", "s", "--tasks", str(tasks))
    assert code == 0 and "canary ft:v4 promoted; previous model ft:v3 kept" in out
    task = load_registry(tasks).tasks["s"]
    assert (task.upstream, task.model, task.canary) == ("local", "ft:v4", None)
    assert task.shadow is not None and task.shadow.model == "tei-v5"
    code, out, _ = run(capsys, "tasks", "rollback", "s", "--tasks", str(tasks), "--json")
    assert code == 0 and orjson.loads(out)["model"] == "ft:v3"
    task = load_registry(tasks).tasks["s"]
    assert task.previous is not None and task.previous.model == "ft:v4"  # undoable
    code, _, err = run(capsys, "tasks", "promote", "s", "--from", "canary", "--tasks", str(tasks))
    assert code == 1 and ("task 's' has no canary to promote; it has a shadow: drop --from, or "
                          "give --from shadow") in err
    code, out, _ = run(capsys, "tasks", "promote", "s", "--from", "shadow", "--tasks", str(tasks))
    assert code == 0 and "shadow tei-v5 promoted; previous model ft:v3 kept" in out
    task = load_registry(tasks).tasks["s"]
    assert (task.upstream, task.model, task.shadow) == ("tei", "tei-v5", None)
    assert task.previous is not None and (task.previous.upstream, task.previous.model) == (
        "local", "ft:v3")
    code, out, _ = run(capsys, "tasks", "rollback", "s", "--tasks", str(tasks))
    task = load_registry(tasks).tasks["s"]
    assert (code, task.upstream, task.model) == (0, "local", "ft:v3")
    assert task.previous is not None and task.previous.model == "tei-v5"
    code, _, err = run(capsys, "tasks", "promote", "s", "--tasks", str(tasks))
    assert code == 1 and "has no canary or shadow model to promote" in err


def test_tasks_set_refuses_a_shadow_that_is_the_canary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Such a shadow was accepted, then blocked `tasks promote` (the gateway refuses a shadow of
    the task's own model); it only repeats the canary's answers."""
    tasks = tmp_path / "tasks.yaml"
    run(capsys, "tasks", "set", "s", "--model", "ft:v3", "--canary", "ft:v4", "--force",
        "--tasks", str(tasks))
    before = tasks.read_bytes()
    code, _, err = run(capsys, "tasks", "set", "s", "--shadow", "ft:v4", "--force", "--tasks",
                       str(tasks))
    assert code == 1 and "the shadow 'ft:v4' is the task's canary too" in err
    assert "remove it with --no-shadow" in err and tasks.read_bytes() == before
    run(capsys, "tasks", "set", "s", "--no-canary", "--shadow", "ft:v4", "--force", "--tasks",
        str(tasks))
    code, _, err = run(capsys, "tasks", "set", "s", "--canary", "ft:v4", "--force", "--tasks",
                       str(tasks))
    assert code == 1 and "the canary 'ft:v4' is the task's shadow too" in err
    assert "(--no-shadow)" in err
    code, _, err = run(capsys, "tasks", "set", "s", "--canary", "ft:v4", "--no-shadow", "--force",
                       "--tasks", str(tasks))
    assert code == 0, err
    task = load_registry(tasks).tasks["s"]
    assert task.canary is not None and (task.canary.model, task.shadow) == ("ft:v4", None)


def test_promote_removes_a_shadow_that_is_the_promoted_canary(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file written by hand with the canary as shadow too: the shadow, which would be the
    task's own model, goes with a note instead of blocking the promotion."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({
        "upstreams": {"local": {"base_url": "http://127.0.0.1:8100"}},
        "tasks": {"s": {"upstream": "local", "model": "ft:v3",
                        "canary": {"model": "ft:v4", "weight": 0.1},
                        "shadow": {"model": "ft:v4", "sample": 0.5}}}}))
    code, out, err = run(capsys, "tasks", "promote", "s", "--from", "canary", "--tasks",
                         str(tasks))
    assert code == 0, err
    assert "  shadow ft:v4 removed: it is the task's model now" in out
    task = load_registry(tasks).tasks["s"]
    assert (task.model, task.canary, task.shadow) == ("ft:v4", None, None)


def test_promote_and_rollback_keep_the_upstream_a_remaining_canary_or_shadow_had(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shadow that names no upstream is on the task's: when a promote moves the task to the
    canary's upstream, the shadow stays where it was instead of following the task."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({
        "upstreams": {"local": {"base_url": "http://127.0.0.1:8100"},
                      "other": {"base_url": "http://127.0.0.1:8200"}},
        "tasks": {"s": {"upstream": "local", "model": "ft:v3",
                        "canary": {"model": "ft:v4", "weight": 0.1, "upstream": "other"},
                        "shadow": {"model": "ft:v5", "sample": 0.2}}}}))
    assert run(capsys, "tasks", "promote", "s", "--tasks", str(tasks))[0] == 0
    task = load_registry(tasks).tasks["s"]
    assert task.upstream == "other" and task.shadow is not None
    assert (task.shadow.model, task.shadow.upstream) == ("ft:v5", "local")
    assert run(capsys, "tasks", "rollback", "s", "--tasks", str(tasks))[0] == 0
    task = load_registry(tasks).tasks["s"]
    assert task.upstream == "local" and task.shadow is not None
    assert (task.shadow.model, task.shadow.upstream) == ("ft:v5", None)  # the task's again


def test_tasks_set_refuses_a_model_its_upstream_does_not_serve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """`tasks set ghost --model nothing-here` used to exit 0; the gateway then stayed ready and
    answered every request with a 502. The factory's model list now decides, for the canary
    and the shadow too; --force saves without asking, as for an upstream that is down."""
    tasks = tmp_path / "tasks.yaml"
    with running_factory(tmp_path / "factory") as factory:
        monkeypatch.setenv("FACTORY_URL", factory.url)
        code, _, err = run(capsys, "tasks", "set", "ghost", "--model", "nothing-here", "--tasks",
                           str(tasks))
        assert code == 1 and err.count("\n") == 1, err
        assert (f"upstream 'local' ({factory.url}) has no model 'nothing-here' (the task's "
                "model); its models: local-minilm, local-ngram, ministral-3b-latest,") in err
        assert "Pass --force to save it anyway" in err and not tasks.exists()
        code, _, err = run(capsys, "tasks", "set", "ghost", "--model", "local-ngram", "--tasks",
                           str(tasks))
        assert code == 0, err
        for role in ("canary", "shadow"):
            code, _, err = run(capsys, "tasks", "set", "ghost", f"--{role}", "nope", "--tasks",
                               str(tasks))
            assert code == 1 and f"has no model 'nope' (the task's {role})" in err
        code, _, err = run(capsys, "tasks", "set", "ghost", "--canary", "local-minilm",
                           "--shadow", "ministral-3b-latest", "--tasks", str(tasks))
        assert code == 0, err
        code, _, err = run(capsys, "tasks", "set", "ghost", "--model", "nothing-here",
                           "--force", "--tasks", str(tasks))
        assert code == 0, err
    # The factory is gone: a new model cannot be checked, an unrelated setting needs no check.
    code, _, err = run(capsys, "tasks", "set", "ghost", "--model", "local-ngram", "--tasks",
                       str(tasks))
    assert code == 1 and (f"cannot check that upstream 'local' serves 'local-ngram': cannot "
                          f"reach upstream 'local' at {factory.url}") in err
    assert err.rstrip().endswith("pass --force to save without checking")
    assert run(capsys, "tasks", "set", "ghost", "--cache-ttl-s", "5", "--tasks", str(tasks))[0] == 0
    assert load_registry(tasks).tasks["ghost"].model == "nothing-here"


def test_tasks_set_saves_unchecked_on_an_upstream_without_a_model_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_fake_upstream() as fake:  # answers 404 to GET /v1/models
        tasks = tmp_path / "tasks.yaml"
        tasks.write_text(yaml.safe_dump({"upstreams": {"fake": {"base_url": str(fake.url)}},
                                         "tasks": {}}))
        code, _, err = run(capsys, "tasks", "set", "t", "--model", "any", "--upstream", "fake",
                           "--tasks", str(tasks))
    assert code == 0, err
    assert load_registry(tasks).tasks["t"].model == "any"


@pytest.mark.parametrize(("argv", "code"), [
    (("data", "validate", "{good}"), 141),  # as a Unix tool killed by SIGPIPE
    (("tasks", "list", "--tasks", "{tasks}"), 141),
    (("--help",), 0),  # argparse ignores a failed write of the help, then exits 0
])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path: Path, argv: tuple[str, ...],
                                                            code: int) -> None:
    """`... | head` with PYTHONUNBUFFERED=1 (the image sets it) used to end in a BrokenPipeError
    traceback. The reader here is gone before the command writes anything, so every write fails,
    as the ones after `head` has read its lines do."""
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"t{i}", "labels": {"a": "x" if i % 2 else "y"}}
                                                  for i in range(40)])
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("upstreams: {u: {base_url: 'http://127.0.0.1:9'}}\n"
                     "tasks: {news: {upstream: u, model: m1}, spam: {upstream: u, model: m2}}\n")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli",
             *(a.format(good=good, tasks=tasks) for a in argv)],
            cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == code


def test_no_arguments_or_a_bare_group_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """It used to be argparse's "the following arguments are required: COMMAND"."""
    code, out, err = run(capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: classifier-gateway ") and "finetune" in out and "serve" in out
    code, out, _ = run(capsys, "jobs")
    assert code == 0 and out.startswith("usage: classifier-gateway jobs ") and "wait" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"classifier-gateway {version('classifier-gateway')}\n"


def test_every_argument_of_every_command_has_help() -> None:
    missing = []
    for command in all_commands(build_parser()):
        parser = build_parser()
        for name in command:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[name]
        missing += [f"{' '.join(command)} {action.metavar or action.dest}"
                    for action in parser._actions
                    if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert not missing


@pytest.mark.parametrize(("command", "settings", "prefix"), [
    ("serve", "service.gateway.settings:Settings", "GATEWAY_"),
    ("factory", "service.factory.settings:FactorySettings", "FACTORY_"),
])
def test_server_help_lists_every_setting_and_where_each_is_explained(
        capsys: pytest.CaptureFixture[str], command: str, settings: str, prefix: str) -> None:
    import importlib

    module, name = settings.split(":")
    fields = getattr(importlib.import_module(module), name).model_fields
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "docs/configuration.md#settings" in out
    for field in fields:
        assert f"\n  {prefix}{field.upper()}=" in out, field


def bbc_like_csv(path: Path) -> Path:
    path.write_text('article,topic\n"Shares fell, and then rose",business\n"The striker scored",'
                    'sport\n' * 3)
    return path


def test_data_validate_recognises_a_csv_and_points_to_data_prepare(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It used to report every line as "not valid JSON" (15,086 of them for the BBC corpus)."""
    source = bbc_like_csv(tmp_path / "bbc.csv")
    code, out, err = run(capsys, "data", "validate", str(source))
    assert code == 1 and out == ""
    assert err == (f"classifier-gateway: {source} is a CSV file (columns: article, topic), not "
                   f"JSONL: turn it into training files with `classifier-gateway data prepare "
                   f"{source} --text-column COLUMN --label-column COLUMN --out-dir DIR`\n")


def test_finetune_checks_locally_what_the_server_would_refuse(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV, or a training file with one label (say `head -300` of a file grouped by label),
    fails here in a second, before any upload; it used to fail on the server, after it. The
    factory address is a closed port: reaching for it would be a different error."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("FACTORY_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        source = bbc_like_csv(tmp_path / "bbc.csv")
        code, _, err = run(capsys, "finetune", "--task", "news", "--train", str(source))
        assert code == 1 and f"{source} is a CSV file (columns: article, topic)" in err
        one_label = write_jsonl(tmp_path / "tech.jsonl", [
            {"text": f"gadget {i}", "labels": {"topic": "tech"}} for i in range(20)])
        code, _, err = run(capsys, "finetune", "--task", "news", "--train", str(one_label))
    assert code == 1
    assert err == (f"classifier-gateway: {one_label}: target 'topic' has only the label 'tech': a "
                   "classifier needs at least two labels per target; add examples of the others "
                   "(a file cut from one grouped by label? `data prepare` writes it shuffled); "
                   f"see the labels with `classifier-gateway data validate {one_label}`\n")
    code, _, err = run(capsys, "data", "validate", str(one_label))
    assert code == 1 and "target 'topic' has only the label 'tech'" in err
