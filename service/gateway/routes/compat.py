"""Mistral-compatible `POST /v1/classifications` and `/v1/chat/classifications`.

`model` may be a task name or a registered model id, so that code written for Mistral's API (the
official SDK with `server_url` pointing here) gains caching and batching without a change. The
response is Mistral's shape exactly; gateway extras go into headers only.
"""

from __future__ import annotations

from starlette.requests import Request

from service.gateway.classifier import Outcome
from service.gateway.registry import TaskSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes.body import parse_body
from service.gateway.routes.classify import answer_headers, run
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.resolve import resolve_task
from service.gateway.runtime import runtime_of
from service.wire import ChatClassificationRequest, ClassificationRequest


def respond(task: TaskSpec, outcome: Outcome) -> JSONResponse:
    body = {"id": outcome.id, "model": outcome.model, "results": outcome.results}
    return JSONResponse(body, headers={**answer_headers(outcome), "X-Task": task.name})


async def classifications(request: Request) -> JSONResponse:
    body = await parse_body(request, ClassificationRequest)
    runtime = runtime_of(request)
    task, upstream = resolve_task(request, runtime.registry.current, body.model, "text",
                                  by_model=True)
    texts = body.inputs()
    check_texts(texts, runtime.settings)
    return respond(task, await run(runtime, request, task, upstream, texts))


async def chat_classifications(request: Request) -> JSONResponse:
    body = await parse_body(request, ChatClassificationRequest)
    runtime = runtime_of(request)
    task, upstream = resolve_task(request, runtime.registry.current, body.model, "chat",
                                  by_model=True)
    payload = conversations_payload(body.inputs(), runtime.settings)
    return respond(task, await run(runtime, request, task, upstream, payload))
