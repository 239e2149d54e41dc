"""Pydantic's validation errors in plain words, for the message of a 422.

Pydantic reports where it looked, in its own terms: every branch of a union it tried
(`input.str: Input should be a valid string; input.list[str]: Input should be a valid array`) and
class names inside paths (`input.Conversation.messages.0.role`). A person calling the API needs
which field, which item, what was expected and what was sent: `input[1] must be a string, not a
number (3)`. The gateway and the factory both say it so (the machine-readable `detail` list keeps
pydantic's own entries, which Mistral's SDK reads).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: How a union branch (the tag pydantic puts in `loc`) reads in a sentence.
BRANCHES = {
    "str": "a string",
    "list[str]": "a list of strings",
    "Conversation": 'a conversation ({"messages": [...]})',
    "list[Conversation]": "a list of conversations",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "dict[str,any]": "an object",
    "list[dict[str,any]]": "a list of objects",
    "none": "null",
}

EXPECTED = {
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "an object",
    "dict_type": "an object",
    "model_attributes_type": "an object",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def _is_branch(part: object) -> bool:
    """A union branch tag rather than a field name or an index: field names in our models are
    lower-case identifiers, tags are type expressions (`list[str]`) or class names."""
    return isinstance(part, str) and (part in BRANCHES or "[" in part or part[:1].isupper()
                                      or part in ("str", "int", "float", "bool", "none"))


def _path(loc: Iterable[object]) -> str:
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_branch(part):
            out += f".{part}" if out else str(part)
    return out


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Sequence):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _shown(value: object, width: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _sentence(error: Mapping[str, Any], path: str, expected: str | None = None) -> str:
    kind = str(error.get("type", ""))
    value = error.get("input")
    subject = f"`{path}`" if path else "the body"
    if kind == "missing":
        return f"{subject} is missing"
    if kind == "extra_forbidden":
        return f"`{path}` is not a field here"
    if kind == "json_invalid":
        reason = str((error.get("ctx") or {}).get("error") or error.get("msg", ""))
        return f"the body is not valid JSON ({reason})"
    if kind in ("too_short", "string_too_short"):
        return f"{subject} must not be empty"
    if kind == "too_long":
        return f"{subject} has too many items"
    if expected is None:
        expected = EXPECTED.get(kind)
    if expected is None:  # pydantic's sentence, without its "Input should be"
        message = re.sub(r"^Input should be ", "be ", str(error.get("msg", "is invalid")))
        message = message if message.startswith("be ") else message[:1].lower() + message[1:]
        verb = "must " if message.startswith("be ") else ""
        return f"{subject} {verb}{message}, not {_shown(value)}"
    return f"{subject} must be {expected}, not {_kind(value)} ({_shown(value)})"


def _branch_index(loc: Sequence[object], start: int = 0) -> int | None:
    return next((i for i, part in enumerate(loc) if i >= start and _is_branch(part)), None)


def _sentences(errors: Sequence[Mapping[str, Any]], start: int = 0) -> list[str]:
    """Sentences for errors whose locations agree up to `start`. Where a union's branches failed,
    only the branch that got furthest speaks (the value had its shape, so what is wrong is inside
    it); where all failed at once, one sentence names every branch as what was expected."""
    sentences: list[str] = []
    unions: dict[tuple[object, ...], list[Mapping[str, Any]]] = {}
    for error in errors:
        loc = tuple(error.get("loc", ()))
        at = _branch_index(loc, start)
        if at is None:
            sentences.append(_sentence(error, _path(loc)))
        else:
            unions.setdefault(loc[:at], []).append(error)
    for site, branch_errors in unions.items():
        at = len(site)
        by_branch: dict[object, list[Mapping[str, Any]]] = {}
        for error in branch_errors:
            by_branch.setdefault(tuple(error["loc"])[at], []).append(error)
        depth = {tag: max(len(tuple(e["loc"])) for e in errs) for tag, errs in by_branch.items()}
        furthest = max(depth, key=depth.__getitem__)
        if depth[furthest] > at + 1:
            sentences.extend(_sentences(by_branch[furthest], at + 1))
            continue
        expected = " or ".join(BRANCHES.get(str(tag), f"a {tag}") for tag in by_branch)
        sentences.append(_sentence(branch_errors[0], _path(site), expected))
    return sentences


def describe(errors: Sequence[Mapping[str, Any]], limit: int = 5) -> str:
    """One line: each problem as where + what was expected + what was sent, joined by "; "."""
    sentences = _sentences(errors)
    shown = sentences[:limit]
    more = len(sentences) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
