"""`/v1/models`: base and fine-tuned models (Mistral's `ModelList`), retrieve, delete, and export
(beyond Mistral's API): `GET /v1/models/{id}/export?format=onnx|hf` answers a tarball
(`application/x-tar`) of the directories `service.export.writer` writes (one per target, plus
`export.json`)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from service.factory.errors import Conflict, FactoryError
from service.factory.state import FactoryState, get_state

router = APIRouter(prefix="/v1/models")


@router.get("")
async def list_models(state: Annotated[FactoryState, Depends(get_state)],
                      provider: str | None = None, model: str | None = None) -> dict[str, Any]:
    cards = state.catalog.list()
    if model is not None:
        cards = [c for c in cards if c["id"] == model]
    return {"object": "list", "data": cards}


# Before `/{model_id:path}`, which would otherwise take ".../export" as part of the id.
@router.get("/{model_id:path}/export", response_model=None)
async def export_model(model_id: str, state: Annotated[FactoryState, Depends(get_state)],
                       format: str = "onnx") -> FileResponse:
    """The model written for inference servers, as `application/x-tar`. 404 for an unknown
    model, 400 for an unknown format, 409 for a model that cannot be exported in that format
    (a `local-ngram` model; `hf` of a model trained before float32 weights were kept)."""
    from service.export.writer import BadFormat, NotExportable, archive, export

    record = state.catalog.record(model_id)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=state.store.tmp_dir()))
    tarball = work / "export.tar"

    def build() -> None:
        with state.catalog.using(record) as model_dir:  # on disk until the export is written
            export(model_dir, model_id, format, work / "out")
        archive(work / "out", tarball)

    try:
        # An HF export reads and writes ~90 MB a target: seconds, off the event loop.
        await asyncio.to_thread(build)
    except BadFormat as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise FactoryError(str(exc), param="format", code="unknown_export_format") from None
    except NotExportable as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise Conflict(str(exc), param="model_id", code="model_not_exportable") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    name = model_id.replace(":", "-").replace("/", "-")
    return FileResponse(tarball, media_type="application/x-tar",
                        filename=f"{name}.{format}.tar",
                        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))


@router.get("/{model_id:path}")
async def retrieve_model(model_id: str,
                         state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return state.catalog.card(model_id)


@router.delete("/{model_id:path}")
async def delete_model(model_id: str,
                       state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return state.catalog.delete(model_id)
