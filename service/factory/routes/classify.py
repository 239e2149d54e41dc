"""`/v1/classifications` and `/v1/chat/classifications`: Mistral's classification endpoints.

Small batches of a fast model (`Predictor.inline`) are scored on the event loop (well under a
millisecond, less than a thread hop); larger ones, and every batch of a neural encoder, in a
worker thread, so one request does not stall the others.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Response

from service.factory.errors import TooLarge
from service.factory.models.base import Predictor
from service.factory.state import FactoryState, get_state
from service.tracing import ITEMS, MODEL, span
from service.wire import (
    CHAT_ENDPOINT,
    TEXT_ENDPOINT,
    ChatClassificationRequest,
    ClassificationRequest,
    Conversation,
    render_messages,
)

router = APIRouter(prefix="/v1")


def _as_text(item: str | Conversation, kind: str) -> str:
    """What the model saw in training: a chat model saw rendered conversations (a bare text is
    one user message); a text model saw texts (a conversation is its contents, without roles)."""
    if isinstance(item, str):
        return render_messages([{"role": "user", "content": item}]) if kind == "chat" else item
    messages = [m.model_dump() for m in item.messages]
    if kind == "chat":
        return render_messages(messages)
    return "\n".join(_content(m.get("content")) for m in messages)


def _content(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
    return content or ""


def _check_limits(state: FactoryState, texts: list[str]) -> None:
    settings = state.settings
    if len(texts) > settings.max_classify_items:
        raise TooLarge(f"`input` has {len(texts)} items; the limit is "
                       f"{settings.max_classify_items} per request (FACTORY_MAX_CLASSIFY_ITEMS)",
                       param="input", code="too_many_inputs")
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise TooLarge(f"`input[{i}]` has {len(text)} characters; the limit is "
                           f"{settings.max_input_chars} (FACTORY_MAX_INPUT_CHARS)",
                           param="input", code="input_too_long")


async def _classify(state: FactoryState, model_id: str, inputs: list[str] | list[Conversation],
                    endpoint: str) -> Response:
    started = time.perf_counter()
    tracing = state.tracing
    with span(tracing, "factory.classify", {MODEL: model_id, ITEMS: len(inputs)}):
        with span(tracing, "factory.load", {MODEL: model_id}):
            _, model = await state.catalog.get(model_id)
        with span(tracing, "factory.tokenise", {ITEMS: len(inputs)}):  # rendering + limits
            texts = [_as_text(item, model.kind) for item in inputs]
            _check_limits(state, texts)
        with span(tracing, "factory.model", {MODEL: model_id, ITEMS: len(texts)}):
            if model.inline and len(texts) <= state.settings.inline_batch_items:
                results = classification_scores(model, texts)
            else:
                results = await asyncio.to_thread(classification_scores, model, texts)
    state.metrics.classify_items.labels(endpoint=endpoint).inc(len(texts))
    state.metrics.classify_duration.labels(endpoint=endpoint).observe(
        time.perf_counter() - started)
    # Serialised here: the hot path skips FastAPI's response validation and encoder.
    return Response(orjson.dumps({"id": uuid.uuid4().hex, "model": model_id, "results": results}),
                    media_type="application/json")


def classification_scores(model: Predictor, texts: list[str]) -> list[dict[str, Any]]:
    """Mistral's `results` entries: `{target: {"scores": {label: p}}}` per text."""
    return [{name: {"scores": scores} for name, scores in result.items()}
            for result in model.classify(texts)]


@router.post("/classifications")
async def classify(body: ClassificationRequest,
                   state: Annotated[FactoryState, Depends(get_state)]) -> Response:
    return await _classify(state, body.model, body.inputs(), TEXT_ENDPOINT)


@router.post("/chat/classifications")
async def classify_chat(body: ChatClassificationRequest,
                        state: Annotated[FactoryState, Depends(get_state)]) -> Response:
    return await _classify(state, body.model, body.inputs(), CHAT_ENDPOINT)
