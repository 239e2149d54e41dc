"""`POST /admin/tasks/{name}/cascade/{stage}`: one cascade stage's own answers, for
`classifier-gateway tasks calibrate`.

Why through the gateway: calibration must see what the gateway will see, the stage asked with
the gateway's own upstream client (any protocol: TEI, vLLM, Infinity, KServe v2, not only
Mistral's), its target and labels mapping, its batching and its deadline. Why admin only: the
route pins a model (a caller of `/classify` never chooses one) and bypasses the cache, so each
call costs the upstream its full price; it is a tool for whoever runs the gateway, guarded like
the rest of `/admin/` by GATEWAY_ADMIN_KEY in the front door (a client key gets a 401).

The answers are each item's result in Mistral's shape (`{target: {"scores": {...}}}`), the raw
scores calibration replays its thresholds on; nothing is read from or written to the cache, and
nothing counts as the task's answers (no shadow, review, drift or cascade counts, no quota).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from service.gateway.errors import InvalidRequest, NotFound
from service.gateway.responses import JSONResponse
from service.gateway.routes.limits import check_texts, conversations_payload
from service.gateway.routes.openapi import ADMIN_ERRORS, ErrorResponse, error_responses
from service.gateway.routes.resolve import known_task
from service.gateway.runtime import RuntimeDep
from service.wire import Conversation

router = APIRouter(prefix="/admin", tags=["admin"], responses={
    **error_responses(*ADMIN_ERRORS, 413, 502, 504),
    400: {"description": "The body is not JSON, or its items are not of the task's kind.",
          "model": ErrorResponse}})


class StageRequest(BaseModel):
    """Texts for a text task, conversations for a chat task; at most GATEWAY_MAX_ITEMS."""

    model_config = ConfigDict(extra="forbid")

    input: list[str] | list[Conversation] = Field(min_length=1)


class StageAnswer(BaseModel):
    model: str = Field(description="The stage's model.")
    stage: int
    results: list[dict[str, Any]] = Field(description="Each item's scores per target, in "
                                                      "Mistral's shape, in input order.")


@router.post("/tasks/{name}/cascade/{stage}", response_model=StageAnswer,
             summary="A cascade stage's own answers, uncached (for tasks calibrate)")
async def stage_answers(name: str, stage: Annotated[int, Path(ge=0, le=63)],
                        body: StageRequest, runtime: RuntimeDep) -> JSONResponse:
    task = known_task(runtime.registry.current, name)
    if not task.cascade:
        raise NotFound(f"Task {name!r} has no cascade; add one to the tasks file "
                       "(tasks.<name>.cascade) to calibrate it.")
    if stage >= len(task.cascade):
        raise NotFound(f"Task {name!r} has {len(task.cascade)} cascade stages (0 to "
                       f"{len(task.cascade) - 1}); stage {stage} is not one of them.")
    texts = [item for item in body.input if isinstance(item, str)]
    if task.kind == "text":
        if len(texts) != len(body.input):
            raise InvalidRequest(f"Task {name!r} classifies text: send `input` as a list of "
                                 "strings.")
        check_texts(texts, runtime.settings)
        items: list[Any] = texts
    else:
        if texts:
            raise InvalidRequest(f"Task {name!r} classifies chat: send `input` as a list of "
                                 "conversations ({\"messages\": [...]}).")
        items = conversations_payload([c for c in body.input if isinstance(c, Conversation)],
                                      runtime.settings)
    model, results = await runtime.classifier.stage_answers(task, stage, items)
    return JSONResponse({"model": model, "stage": stage, "results": results})
