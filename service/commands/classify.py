"""`classifier-gateway classify | classify-chat`: ask a running gateway, by task name."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

import orjson

from service.commands.api import add_gateway_arguments, gateway_api
from service.commands.errors import UserError
from service.commands.output import print_json, short, table

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    p = sub.add_parser("classify", help="classify texts with a task of the running gateway",
                       description="Classify texts with a task of the running gateway. Without "
                                   "TEXT, reads one text per line from standard input.")
    p.add_argument("--task", required=True, metavar="NAME", help="a task of the gateway")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="the texts to classify (none: one per line from standard input)")
    add_gateway_arguments(p)
    p.add_argument("--json", action="store_true", help="print the gateway's response")
    p.set_defaults(handler=cmd_classify)

    p = sub.add_parser("classify-chat", help="classify conversations with a chat task",
                       description="Classify conversations with a chat task of the running "
                                   "gateway. FILE holds JSON: a list of messages (one "
                                   "conversation), {\"messages\": [...]}, a list of those, or "
                                   "JSONL with one {\"messages\": [...]} per line; - is stdin.")
    p.add_argument("--task", required=True, metavar="NAME", help="a chat task of the gateway")
    p.add_argument("--messages", required=True, metavar="FILE", help="the conversation(s)")
    add_gateway_arguments(p)
    p.add_argument("--json", action="store_true", help="print the gateway's response")
    p.set_defaults(handler=cmd_classify_chat)


def result_rows(inputs: list[str], response: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row per input and target: the chosen label(s) and score(s)."""
    rows: list[tuple[Any, ...]] = []
    for text, result in zip(inputs, response.get("results") or [], strict=False):
        for target, body in result.items():
            scores: dict[str, float] = body.get("scores") or {}
            if "labels" in body:
                chosen = body["labels"]
                label = ", ".join(chosen) or "(none)"
                score = ", ".join(f"{scores[lbl]:.4f}" for lbl in chosen) or "-"
            else:
                label = body.get("label") or max(scores, key=scores.__getitem__)
                score = f"{scores.get(label, 0.0):.4f}"
            rows.append((short(text, 50), target, label, score))
    return rows


def _show(args: argparse.Namespace, inputs: list[str], response: dict[str, Any]) -> None:
    if args.json:
        print_json(response)
        return
    print(table(["input", "target", "label", "score"], result_rows(inputs, response)))


@contextlib.contextmanager
def _kind_hint(task: str) -> Iterator[None]:
    """The gateway names its route for a task of the other kind; name the CLI command instead."""
    try:
        yield
    except UserError as exc:
        message = str(exc)
        if "send it to /classify-chat" in message:
            raise UserError(f"{message} With this CLI: classifier-gateway classify-chat --task "
                            f"{task} --messages FILE") from None
        if "send it to /classify " in message:
            raise UserError(f"{message} With this CLI: classifier-gateway classify --task "
                            f"{task} TEXT...") from None
        raise


def cmd_classify(args: argparse.Namespace) -> int:
    if not args.texts and sys.stdin.isatty():
        raise UserError("nothing to classify: give TEXT arguments, or pipe one text per line")
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("nothing to classify: give TEXT arguments or lines on standard input")
    with gateway_api(args) as api, _kind_hint(args.task):
        response = api.post("/classify", json={"task": args.task, "input": texts})
    _show(args, texts, response)
    return 0


def read_conversations(source: str) -> list[dict[str, Any]]:
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            data = [orjson.loads(line) for line in raw.splitlines() if line.strip()]
        except orjson.JSONDecodeError as exc:
            raise UserError(f"{source} is neither JSON nor JSONL ({exc.args[0].split(':')[0]})"
                            ) from None
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list) and data and all(isinstance(m, dict) and "role" in m for m in data):
        data = [{"messages": data}]
    if not (isinstance(data, list) and data
            and all(isinstance(c, dict) and isinstance(c.get("messages"), list) for c in data)):
        raise UserError(f"{source}: expected a list of messages, {{\"messages\": [...]}}, or a "
                        "list of those")
    return [{"messages": c["messages"]} for c in data]


def conversation_summary(conversation: dict[str, Any]) -> str:
    """The last message, which is what a reader recognises a conversation by."""
    last = conversation["messages"][-1] if conversation["messages"] else {}
    content = last.get("content") if isinstance(last, dict) else ""
    return f"{last.get('role', '?')}: {content if isinstance(content, str) else '...'}"


def cmd_classify_chat(args: argparse.Namespace) -> int:
    conversations = read_conversations(args.messages)
    with gateway_api(args) as api, _kind_hint(args.task):
        response = api.post("/classify-chat", json={"task": args.task, "input": conversations})
    _show(args, [conversation_summary(c) for c in conversations], response)
    return 0
