"""The seam between the gateway and the inference servers it fronts: one `UpstreamProtocol` per
wire format.

The gateway's callers always get Mistral's result shape, one `{target: {"scores": {label: p}}}`
per input, whatever serves the model. A protocol module knows the rest: the path for a task's
kind, how a batch is encoded, how the answer is checked and turned into that shape, how an error
body explains itself, and what the server can tell about a model (labels, batch limit). The
client (upstream.py) keeps what every protocol shares: deadlines, retries, the breaker, metrics
and scrubbing. Adding a protocol is a module here and a line in `protocols/__init__.py`.

Protocol modules are pure: bytes and JSON in, results or a reason out, no I/O; so each is tested
against its server's published examples without a network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeGuard

from service.wire import render_messages

Result = dict[str, Any]
Kind = Literal["text", "chat"]


@dataclass(frozen=True)
class Route:
    """What a protocol needs to know about the task a batch belongs to.

    `target` is the key a single-target server's scores appear under (the task's `target`, by
    default its name); `labels` name the classes in index order for servers that answer with
    unnamed probability arrays (vLLM, KServe v2). Both are ignored by Mistral's protocol, whose
    answers carry their own targets and labels."""

    kind: Kind
    model: str
    target: str = ""
    labels: tuple[str, ...] = ()

    @classmethod
    def text(cls, model: str, target: str = "", labels: Sequence[str] = ()) -> Route:
        return cls("text", model, target, tuple(labels))

    @classmethod
    def chat(cls, model: str, target: str = "", labels: Sequence[str] = ()) -> Route:
        return cls("chat", model, target, tuple(labels))


@dataclass(frozen=True)
class ServerInfo:
    """What a server says about a model: its labels in index order, its batch limit."""

    labels: tuple[str, ...] = ()
    max_batch_size: int | None = None


class UpstreamProtocol(Protocol):
    """One inference server's classification API (see the module docstring)."""

    #: The name used in the tasks file (`protocol: tei`).
    name: ClassVar[str]
    #: Whether the server returns probabilities by class index, so that labels must be known
    #: (from the task's `labels` or the server's metadata).
    labels_by_index: ClassVar[bool]
    #: Whether `info_path` can tell the labels (TEI's `/info`, KServe's model metadata).
    labels_from_server: ClassVar[bool]
    #: 4xx statuses that mean the server failed, not the request (TEI's 424 "inference
    #: failed"): retried and counted against the upstream like a 5xx.
    server_errors: ClassVar[frozenset[int]]

    def root(self, base_url: str) -> str:
        """The server's root, from the upstream's `base_url` as operators write it."""
        ...

    def path(self, route: Route) -> str:
        """The request path, from the server's root."""
        ...

    def endpoint(self, route: Route) -> str:
        """A short, bounded name of the path for metric labels and cache keys."""
        ...

    def encode(self, route: Route, inputs: Sequence[Any]) -> bytes:
        """The request body for a batch; chat inputs are rendered here if the server takes text."""
        ...

    def decode(self, route: Route, payload: Any, count: int,
               info: ServerInfo | None) -> list[Result] | str:
        """One result per input in Mistral's shape, or what is wrong with the answer."""
        ...

    def error_text(self, payload: Any) -> str | None:
        """The server's own explanation in an error body, if it has one."""
        ...

    def info_path(self, route: Route) -> str | None:
        """Where the server describes the model, or None if it cannot."""
        ...

    def read_info(self, route: Route, payload: Any) -> ServerInfo | str:
        """What `info_path` answered, or what is wrong with it."""
        ...

    def answer_scope(self, base_url: str, route: Route) -> str:
        """What, besides the model and the input, decides the answer the server at `base_url`
        gives this route: two routes with the same scope get the same answer, so one's answer may
        stand in for the other's (the gateway's cache keys on it)."""
        ...


class Defaults:
    """What most protocols share: the base URL is the server's root, and the server says nothing
    about a model. A protocol module subclasses it and overrides what differs."""

    name: ClassVar[str]
    labels_by_index: ClassVar[bool] = False
    labels_from_server: ClassVar[bool] = False
    server_errors: ClassVar[frozenset[int]] = frozenset()

    def root(self, base_url: str) -> str:
        return base_url

    def info_path(self, route: Route) -> str | None:
        return None

    def read_info(self, route: Route, payload: Any) -> ServerInfo | str:
        return ServerInfo()

    def answer_scope(self, base_url: str, route: Route) -> str:
        """A single-target server's answer is named with the route's target and labels: routes
        that name them differently get different answers."""
        return f"{self.name}:{base_url}#{route.target}:{','.join(route.labels)}"


def render_text(item: Any) -> str:
    """A text, or a conversation rendered as the factory renders it for its own models
    (`role: content` lines), for servers that only take text."""
    if isinstance(item, str):
        return item
    messages = item.get("messages", ()) if isinstance(item, Mapping) else ()
    return render_messages(messages)


def is_number(value: Any) -> TypeGuard[int | float]:
    return type(value) is float or type(value) is int  # bool is neither


def scores_from_pairs(entries: Any, where: str) -> dict[str, float] | str:
    """`[{"label": str, "score": number}, ...]` (TEI, Infinity) as `{label: score}`."""
    if not isinstance(entries, list) or not entries:
        return f"{where} is not a non-empty list of {{label, score}} objects"
    scores: dict[str, float] = {}
    for j, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return f"{where}[{j}] is not an object"
        label, score = entry.get("label"), entry.get("score")
        if not isinstance(label, str) or not is_number(score):
            return f"{where}[{j}] needs a string 'label' and a numeric 'score'"
        scores[label] = float(score)
    return scores


def results_from_pairs(rows: list[Any], target: str, where: str) -> list[Result] | str:
    """One result per row of `{label, score}` lists (TEI's answer, Infinity's `data`)."""
    results: list[Result] = []
    for i, entry in enumerate(rows):
        scores = scores_from_pairs(entry, f"{where}[{i}]")
        if isinstance(scores, str):
            return scores
        results.append({target: {"scores": scores}})
    return results


def scores_from_probs(probs: Any, labels: Sequence[str], where: str) -> dict[str, float] | str:
    """An unnamed probability row (vLLM, KServe v2) named by `labels` in index order."""
    if not isinstance(probs, list) or not all(is_number(p) for p in probs):
        return f"{where} is not a list of numbers"
    if len(probs) != len(labels):
        return (f"{where} has {len(probs)} classes but the task names {len(labels)} labels "
                f"({', '.join(labels)}); set the task's `labels` to the model's classes in "
                "index order")
    return {label: float(p) for label, p in zip(labels, probs, strict=True)}


def first_message(payload: Any, *fields: str) -> str | None:
    """The first non-empty string among `fields` of an error body; `{"error": {"message": ...}}`
    (OpenAI-style, as vLLM and Infinity send) is looked into as well."""
    if not isinstance(payload, dict):
        return None
    for field in fields:
        value = payload.get(field)
        if isinstance(value, dict):
            value = value.get("message")
        if isinstance(value, str) and value:
            return value
    return None
