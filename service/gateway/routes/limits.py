"""Request limits shared by the gateway's own routes and the Mistral-compatible ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError

from service.gateway.errors import EmptyInput, PayloadTooLarge
from service.gateway.settings import Settings
from service.wire import Conversation


def check_texts(texts: Sequence[str], settings: Settings) -> None:
    _check_count(len(texts), settings)
    for index, text in enumerate(texts):
        if not text:
            raise EmptyInput(f"input[{index}] is an empty string; send text to classify.")
        _check_size(index, len(text), settings)


def conversations_payload(conversations: Sequence[Conversation], settings: Settings) -> list[Any]:
    """Validate size and return the JSON payload of each conversation, as sent upstream."""
    _check_count(len(conversations), settings)
    payload = []
    for index, conversation in enumerate(conversations):
        item = conversation.model_dump(exclude_none=True)
        _json_size(index, item)  # extra keys of a message are sent on too: all must encode
        chars = sum(
            len(m.content) if isinstance(m.content, str) else _json_size(index, m.content)
            for m in conversation.messages
            if m.content is not None
        )
        _check_size(index, chars, settings)
        payload.append(item)
    return payload


def _json_size(index: int, content: Any) -> int:
    """Characters of structured content as JSON; a 422 for what JSON libraries cannot send on (an
    integer beyond 64 bits: valid JSON, but neither the upstream nor the cache key can carry it)."""
    try:
        return len(orjson.dumps(content))
    except orjson.JSONEncodeError as exc:
        raise RequestValidationError([{
            "loc": ("body", "input", index, "messages"), "type": "value_error",
            "msg": f"the conversation cannot be sent on as JSON ({exc}); keep integers "
                   "within 64 bits"}]) from None


def _check_count(count: int, settings: Settings) -> None:
    if count == 0:
        raise EmptyInput("input is empty; send at least one item to classify.")
    if count > settings.max_items:
        raise PayloadTooLarge(
            f"input has {count} items; the limit is {settings.max_items} per request "
            "(GATEWAY_MAX_ITEMS). Split it into several requests."
        )


def _check_size(index: int, chars: int, settings: Settings) -> None:
    if chars > settings.max_item_chars:
        raise PayloadTooLarge(
            f"input[{index}] has {chars} characters; the limit is {settings.max_item_chars} "
            "(GATEWAY_MAX_ITEM_CHARS). Shorten or split the item."
        )
