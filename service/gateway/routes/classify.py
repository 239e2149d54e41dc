"""`POST /classify` and `POST /classify-chat`: the gateway's own API, by task name."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from service.gateway.classifier import Outcome, decorate
from service.gateway.registry import TaskSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.resolve import resolve_task
from service.gateway.runtime import Runtime, get_runtime
from service.wire import Conversation

router = APIRouter(tags=["classify"])


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, description="A task name from the tasks file.")
    input: str | list[str]


class ClassifyChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    input: Conversation | list[Conversation]


def reads_cache(cache_control: str | None) -> bool:
    return not (cache_control and "no-cache" in cache_control.lower())


def disconnect_waiter(request: Request) -> Any:
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return wait


def respond(task: TaskSpec, outcome: Outcome) -> JSONResponse:
    body = {
        "id": uuid.uuid4().hex,
        "task": task.name,
        "model": task.model,
        "results": [decorate(task, result) for result in outcome.results],
    }
    return JSONResponse(body, headers={"X-Cache": outcome.cache_status})


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
CacheControl = Annotated[str | None, Header()]


@router.post("/classify", summary="Classify one text or a list of texts with a task's model")
async def classify(body: ClassifyRequest, request: Request, runtime: RuntimeDep,
                   cache_control: CacheControl = None) -> JSONResponse:
    task, upstream = resolve_task(request, runtime.registry.current, body.task, "text")
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_texts(texts, runtime.settings)
    outcome = await runtime.classifier.classify(
        task, upstream, texts, read_cache=reads_cache(cache_control),
        disconnected=disconnect_waiter(request),
    )
    return respond(task, outcome)


@router.post("/classify-chat", summary="Classify one conversation or a list of them")
async def classify_chat(body: ClassifyChatRequest, request: Request, runtime: RuntimeDep,
                        cache_control: CacheControl = None) -> JSONResponse:
    task, upstream = resolve_task(request, runtime.registry.current, body.task, "chat")
    conversations = [body.input] if isinstance(body.input, Conversation) else body.input
    payload = conversations_payload(conversations, runtime.settings)
    outcome = await runtime.classifier.classify(
        task, upstream, payload, read_cache=reads_cache(cache_control),
        disconnected=disconnect_waiter(request),
    )
    return respond(task, outcome)
