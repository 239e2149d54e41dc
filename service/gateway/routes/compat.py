"""Mistral-compatible `POST /v1/classifications` and `/v1/chat/classifications`.

`model` may be a task name or a registered model id, so that code written for Mistral's API (the
official SDK with `server_url` pointing here) gains caching and batching without a change. The
response is Mistral's shape exactly; gateway extras go into headers only.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from starlette.requests import Request

from service.gateway.classifier import Outcome
from service.gateway.registry import TaskSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes.classify import (
    CacheControl,
    RuntimeDep,
    disconnect_waiter,
    reads_cache,
)
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.resolve import resolve_task
from service.wire import ChatClassificationRequest, ClassificationRequest

router = APIRouter(prefix="/v1", tags=["mistral-compatible"])


def respond(task: TaskSpec, outcome: Outcome) -> JSONResponse:
    body = {"id": uuid.uuid4().hex, "model": task.model, "results": outcome.results}
    return JSONResponse(body, headers={"X-Cache": outcome.cache_status, "X-Task": task.name})


@router.post("/classifications", summary="Mistral's classification endpoint")
async def classifications(body: ClassificationRequest, request: Request, runtime: RuntimeDep,
                          cache_control: CacheControl = None) -> JSONResponse:
    task, upstream = resolve_task(request, runtime.registry.current, body.model, "text",
                                  by_model=True)
    texts = body.inputs()
    check_texts(texts, runtime.settings)
    outcome = await runtime.classifier.classify(
        task, upstream, texts, read_cache=reads_cache(cache_control),
        disconnected=disconnect_waiter(request),
    )
    return respond(task, outcome)


@router.post("/chat/classifications", summary="Mistral's chat classification endpoint")
async def chat_classifications(body: ChatClassificationRequest, request: Request,
                               runtime: RuntimeDep,
                               cache_control: CacheControl = None) -> JSONResponse:
    task, upstream = resolve_task(request, runtime.registry.current, body.model, "chat",
                                  by_model=True)
    payload = conversations_payload(body.inputs(), runtime.settings)
    outcome = await runtime.classifier.classify(
        task, upstream, payload, read_cache=reads_cache(cache_control),
        disconnected=disconnect_waiter(request),
    )
    return respond(task, outcome)
