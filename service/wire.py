"""Mistral's classification wire format, shared by the gateway and the factory.

The shapes follow Mistral's public API reference and OpenAPI spec: request
models forbid unknown keys, because the real API answers a misspelt field such as `inputs` with a 422
and a client that works against us must also work against Mistral. Response models allow extra keys,
because we add fields (`label`, `labels`, `task`) that Mistral's clients simply ignore.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant", "tool"]

TEXT_ENDPOINT = "classifications"
CHAT_ENDPOINT = "chat/classifications"
Endpoint = Literal["classifications", "chat/classifications"]


class Message(BaseModel):
    """One chat message. Extra keys (`prefix`, `tool_calls`, `name`, ...) are accepted because the
    official SDK sends `"prefix": false` on assistant messages."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None


class Conversation(BaseModel):
    """Mistral's `InstructRequest`: the unit the chat classification endpoint scores."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] = Field(min_length=1)


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[str]
    metadata: dict[str, Any] | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ChatClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: Conversation | list[Conversation]

    def inputs(self) -> list[Conversation]:
        return [self.input] if isinstance(self.input, Conversation) else list(self.input)


class TargetResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    scores: dict[str, float]


class ClassificationResponse(BaseModel):
    """`results[i]` maps each target name to its scores, one entry per input, in input order."""

    model_config = ConfigDict(extra="allow")

    id: str
    model: str
    results: list[dict[str, TargetResult]]


class ErrorBody(BaseModel):
    """Mistral's error shape for everything except 422 (which uses FastAPI's `detail` list)."""

    object: Literal["error"] = "error"
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


def render_messages(messages: Iterable[Mapping[str, Any]]) -> str:
    """One text per conversation: `role: content` lines, so that who said what stays a feature.

    The factory's models read conversations this way, and the gateway renders them the same
    way for upstreams that only take text (TEI, vLLM, Infinity, KServe v2)."""
    parts = []
    for message in messages:
        parts.append(f"{message.get('role', 'user')}: {content_text(message.get('content'))}")
    return "\n".join(parts)


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return ""
