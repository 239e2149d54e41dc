"""`POST /classify` and `POST /classify-chat`: the gateway's own API, by task name.

The routes themselves (paths, docs) are declared in hot.py."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from service.gateway.classifier import Outcome, decorate
from service.gateway.registry import TaskSpec, UpstreamSpec
from service.gateway.responses import JSONResponse
from service.gateway.routes.body import parse_body
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.resolve import resolve_task
from service.gateway.runtime import Runtime, runtime_of
from service.wire import Conversation


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


async def run(runtime: Runtime, request: Request, task: TaskSpec, upstream: UpstreamSpec,
              items: Sequence[Any]) -> Outcome:
    """The part every classification route shares, once the items are validated."""

    started = time.perf_counter()

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    outcome = await runtime.classifier.classify(task, upstream, items,
                                                read_cache=reads_cache(
                                                    request.headers.get("cache-control")),
                                                disconnected=disconnected)
    outcome = dataclasses.replace(outcome, id=response_id())
    if runtime.feedback is not None:
        runtime.feedback.after(outcome.id, task, items, outcome)
    if task.log is not None and runtime.predictions is not None:
        runtime.predictions.offer(task, items, outcome, time.perf_counter() - started)
    return outcome


_ids = random.Random()  # seeded from the OS; ids need to be unique, not secret
os.register_at_fork(after_in_child=_ids.seed)  # forked workers must not repeat each other's ids


def response_id() -> str:
    """32 hex digits like a uuid4's, without a getrandom() system call per response."""
    return f"{_ids.getrandbits(128):032x}"


def answer_headers(outcome: Outcome) -> dict[str, str]:
    """`X-Cache`; `X-Model`, the model that answered (a canary's or a fallback's when one did;
    comma-separated when items split between models), and `X-Fallback-From`, the model that
    failed, when a fallback answered."""
    headers = {"X-Cache": outcome.cache_status,
               "X-Model": ", ".join(dict.fromkeys(outcome.models))}
    if outcome.fallback_from is not None:
        headers["X-Fallback-From"] = outcome.fallback_from
    return headers


def respond(task: TaskSpec, outcome: Outcome) -> JSONResponse:
    body: dict[str, Any] = {
        "id": outcome.id,
        "task": task.name,
        "model": outcome.model,
        "results": [decorate(task, result) for result in outcome.results],
    }
    if outcome.split:
        body["models"] = outcome.models
    return JSONResponse(body, headers=answer_headers(outcome))


CACHE_CONTROL_DOC = {"parameters": [{
    "name": "Cache-Control", "in": "header", "required": False, "schema": {"type": "string"},
    "description": "`no-cache` skips the cache read (the fresh result is still written).",
}]}


async def classify(request: Request) -> JSONResponse:
    body = await parse_body(request, ClassifyRequest)
    runtime = runtime_of(request)
    task, upstream = resolve_task(request, runtime.registry.current, body.task, "text")
    texts = [body.input] if isinstance(body.input, str) else body.input
    check_texts(texts, runtime.settings)
    outcome = await run(runtime, request, task, upstream, texts)
    return respond(task, outcome)


async def classify_chat(request: Request) -> JSONResponse:
    body = await parse_body(request, ClassifyChatRequest)
    runtime = runtime_of(request)
    task, upstream = resolve_task(request, runtime.registry.current, body.task, "chat")
    conversations = [body.input] if isinstance(body.input, Conversation) else body.input
    payload = conversations_payload(conversations, runtime.settings)
    outcome = await run(runtime, request, task, upstream, payload)
    return respond(task, outcome)
