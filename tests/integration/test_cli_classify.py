"""`classify` and `classify-chat` against a real gateway (uvicorn on a loopback port) in front of
the fake upstream, whose scores are a known function of the input."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import orjson
import pytest

from service.cli import main
from tests.support.fake_upstream import expected_scores
from tests.support.gateway import gateway_stack


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def top(scores: dict[str, float]) -> str:
    return max(scores, key=scores.__getitem__)


def test_classify_prints_a_table_per_input_and_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with gateway_stack(tmp_path) as stack:
        code, out, _ = run(capsys, "classify", "--task", "sentiment", "--gateway-url", stack.url,
                           "I love it", "I hate it")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["input", "target", "label", "score"]
    for line, text in zip(lines[1:], ["I love it", "I hate it"], strict=True):
        scores = expected_scores(text)["sentiment"]
        assert line.split()[-3:] == ["sentiment", top(scores), f"{scores[top(scores)]:.4f}"]
        assert line.startswith(text)


def test_classify_json_is_the_gateways_response_and_stdin_gives_the_texts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("first line\n\nsecond line\n"))
    with gateway_stack(tmp_path) as stack:
        code, out, _ = run(capsys, "classify", "--task", "sentiment", "--gateway-url", stack.url,
                           "--json")
    body = orjson.loads(out)
    assert code == 0 and body["task"] == "sentiment"
    assert [r["sentiment"]["scores"] for r in body["results"]] == [
        expected_scores("first line")["sentiment"], expected_scores("second line")["sentiment"]]


def test_classify_chat_reads_a_conversation_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    messages = [{"role": "user", "content": "book a table"},
                {"role": "assistant", "content": "for when?"}]
    path = tmp_path / "conversation.json"
    path.write_bytes(orjson.dumps(messages))
    with gateway_stack(tmp_path, targets={"intent": ["booking", "other"]}) as stack:
        code, out, _ = run(capsys, "classify-chat", "--task", "intent", "--messages", str(path),
                           "--gateway-url", stack.url)
        sent = stack.upstream.calls[-1].inputs[0]
    assert code == 0
    scores = expected_scores(sent, {"intent": ["booking", "other"]})["intent"]
    assert out.splitlines()[1].split()[-3:] == ["intent", top(scores), f"{scores[top(scores)]:.4f}"]
    assert out.splitlines()[1].startswith("assistant: for when?")


def test_an_unknown_task_gives_the_gateways_reason_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with gateway_stack(tmp_path) as stack:
        code, _, err = run(capsys, "classify", "--task", "nope", "--gateway-url", stack.url, "x")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("classifier-gateway: the gateway answered HTTP 404 to POST /classify: ")
    assert "nope" in err and "sentiment" in err


def test_a_task_of_the_other_kind_names_the_cli_command_to_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "conversation.json"
    path.write_bytes(orjson.dumps([{"role": "user", "content": "hi"}]))
    with gateway_stack(tmp_path) as stack:
        chat_code, _, chat_err = run(capsys, "classify", "--task", "intent", "--gateway-url",
                                     stack.url, "hi")
        text_code, _, text_err = run(capsys, "classify-chat", "--task", "sentiment", "--messages",
                                     str(path), "--gateway-url", stack.url)
    assert chat_code == 1 and chat_err.count("\n") == 1
    assert chat_err.rstrip().endswith(
        "With this CLI: classifier-gateway classify-chat --task intent --messages FILE")
    assert text_code == 1 and text_err.count("\n") == 1
    assert text_err.rstrip().endswith(
        "With this CLI: classifier-gateway classify --task sentiment TEXT...")


def test_the_gateway_key_comes_from_the_environment_and_is_never_echoed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    with gateway_stack(tmp_path, api_keys="right-key") as stack:
        monkeypatch.setenv("GATEWAY_API_KEY", "wrong-key")
        code, out, err = run(capsys, "classify", "--task", "sentiment", "--gateway-url",
                             stack.url, "x")
        assert code == 1
        assert err == ("classifier-gateway: the gateway refused the key (HTTP 401): set "
                       "GATEWAY_API_KEY to a valid key\n")
        assert "wrong-key" not in out + err
        monkeypatch.setenv("GATEWAY_API_KEY", "right-key")
        code, _, _ = run(capsys, "classify", "--task", "sentiment", "--gateway-url", stack.url, "x")
        assert code == 0

        # The name the demo's curl lines used: still accepted, with a warning to rename it.
        monkeypatch.delenv("GATEWAY_API_KEY")
        monkeypatch.setenv("GATEWAY_KEY", "right-key")
        code, _, err = run(capsys, "classify", "--task", "sentiment", "--gateway-url", stack.url,
                           "x")
        assert code == 0
        assert err == ("classifier-gateway: warning: GATEWAY_KEY is deprecated; name the gateway's "
                       "client key GATEWAY_API_KEY instead (it is used this time)\n")


def test_a_gateway_that_is_down_says_how_to_start_it(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        code, _, err = run(capsys, "classify", "--task", "t", "--gateway-url",
                           f"http://127.0.0.1:{port}", "x")
    assert code == 1
    assert err == (f"classifier-gateway: cannot reach the gateway at http://127.0.0.1:{port}: "
                   "start it with `classifier-gateway serve`, or set GATEWAY_URL\n")


def test_a_malformed_conversation_file_is_a_user_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"turns": []}')
    code, _, err = run(capsys, "classify-chat", "--task", "t", "--messages", str(path))
    assert code == 1 and "expected a list of messages" in err
