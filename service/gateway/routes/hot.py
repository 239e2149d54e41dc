"""The hot classification routes, declared once.

Both the front door (middleware.py, which counts these routes per task and calls their handlers
directly) and FastAPI's routing and API docs are derived from `HOT_ROUTES`; a fifth route is one
more line here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from service.gateway.routes import classify, compat
from service.gateway.routes.body import install_body_schemas, openapi_body
from service.gateway.routes.classify import CACHE_CONTROL_DOC
from service.gateway.routes.openapi import (
    ClassificationResponse,
    ClassifyAnswer,
    classify_responses,
)
from service.wire import ChatClassificationRequest, ClassificationRequest

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class HotRoute:
    path: str
    handler: Handler
    body: type[BaseModel]
    #: The 200 body's model (a union for /classify: one task's answer, or a fan-out's).
    response: Any
    summary: str
    tag: str


HOT_ROUTES = (
    HotRoute("/classify", classify.classify, classify.ClassifyRequest, ClassifyAnswer,
             "Classify one text or a list of texts with a task's model (or several tasks')",
             "classify"),
    HotRoute("/classify-chat", classify.classify_chat, classify.ClassifyChatRequest,
             ClassifyAnswer, "Classify one conversation or a list of them", "classify"),
    HotRoute("/v1/classifications", compat.classifications, ClassificationRequest,
             ClassificationResponse, "Mistral's classification endpoint", "mistral-compatible"),
    HotRoute("/v1/chat/classifications", compat.chat_classifications, ChatClassificationRequest,
             ClassificationResponse, "Mistral's chat classification endpoint",
             "mistral-compatible"),
)


def handlers() -> dict[str, Handler]:
    """Path -> handler, for the front door."""
    return {route.path: route.handler for route in HOT_ROUTES}


def install(app: FastAPI) -> None:
    """Register every hot route with FastAPI (routing outside the front door, and the docs)."""
    for route in HOT_ROUTES:
        app.add_api_route(route.path, route.handler, methods=["POST"], summary=route.summary,
                          tags=[route.tag], responses=classify_responses(route.response),
                          openapi_extra={**openapi_body(route.body), **CACHE_CONTROL_DOC})
    install_body_schemas(app, [route.body for route in HOT_ROUTES])
