"""Mistral's classification wire format, shared by the gateway and the factory.

The shapes follow `shared/reference/mistral-api.md` (and Mistral's public OpenAPI spec): request
models forbid unknown keys, because the real API answers a misspelt field such as `inputs` with a 422
and a client that works against us must also work against Mistral. Response models allow extra keys,
because we add fields (`label`, `labels`, `task`) that Mistral's clients simply ignore.
"""

from __future__ import annotations

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
