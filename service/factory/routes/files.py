"""`/v1/files`: upload (multipart), list, retrieve, download, delete."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest
from starlette.types import Message

from service.factory.errors import FactoryError, NotFound, TooLarge
from service.factory.schemas import file_out
from service.factory.state import FactoryState, get_state
from service.factory.store import FileRecord, now

router = APIRouter(prefix="/v1/files")

PURPOSES = ("fine-tune", "batch", "ocr")
MULTIPART_OVERHEAD = 64 * 1024


class _BodyTooLarge(Exception):
    pass


def _limited(request: Request, limit: int) -> StarletteRequest:
    """The same request, whose body raises once it passes `limit` bytes (for uploads sent without
    a Content-Length, or lying about it)."""
    seen = 0
    receive = request.receive

    async def limited_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge
        return message

    return StarletteRequest(request.scope, limited_receive)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"file too large: the limit is {limit} bytes (FACTORY_MAX_UPLOAD_BYTES)",
                    param="file", code="file_too_large")


def _store_upload(upload: UploadFile, target: Path, limit: int) -> tuple[int, str, int, str]:
    """Copy to disk; (bytes, sha256, non-blank lines, sample type). Runs in a thread."""
    digest = hashlib.sha256()
    size = lines = 0
    first: bytes | None = None
    pending = b""
    with target.open("wb") as out:
        while chunk := upload.file.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            digest.update(chunk)
            out.write(chunk)
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                if line.strip():
                    lines += 1
                    first = first if first is not None else line
        if pending.strip():
            lines += 1
            first = first if first is not None else pending
    sample_type = "instruct" if first is not None and b'"messages"' in first else "pretrain"
    return size, digest.hexdigest(), lines, sample_type


@router.post("")
async def upload_file(request: Request,
                      state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)
    try:
        form = await _limited(request, limit + MULTIPART_OVERHEAD).form(max_files=1, max_fields=8)
    except _BodyTooLarge:
        raise _too_large(limit) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise FactoryError("multipart field `file` is required (the JSONL file)",
                               param="file", status=422)
        purpose = str(form.get("purpose") or "fine-tune")
        if purpose not in PURPOSES:
            raise FactoryError(f"purpose {purpose!r} is not one of {', '.join(PURPOSES)}",
                               param="purpose", status=422)
        visibility = str(form.get("visibility") or "workspace")
        filename = os.path.basename(upload.filename or "upload.jsonl")
        if purpose == "fine-tune" and not filename.endswith(".jsonl"):
            raise FactoryError(f"fine-tuning takes .jsonl files; got {filename!r}",
                               param="file")
        store = state.store
        tmp = store.tmp_dir() / f"{uuid.uuid4()}.part"
        try:
            size, sha, lines, sample_type = await run_in_threadpool(_store_upload, upload, tmp,
                                                                    limit)
        except _BodyTooLarge:
            tmp.unlink(missing_ok=True)
            raise _too_large(limit) from None
        existing = store.find_file(filename, sha, purpose)
        if existing is not None:
            tmp.unlink(missing_ok=True)
            return file_out(existing)
        record = FileRecord(id=str(uuid.uuid4()), filename=filename, purpose=purpose, bytes=size,
                            sha256=sha, created_at=now(), num_lines=lines,
                            sample_type=sample_type, mimetype="application/jsonl",
                            visibility=visibility)
        try:
            await run_in_threadpool(store.blobs.put_file, store.file_key(record.id), tmp)
        except Exception as exc:
            # The store went away mid-upload: nothing is recorded, the partial file goes.
            tmp.unlink(missing_ok=True)
            raise FactoryError(f"the file could not be stored ({store.blobs.url}): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                               param="file", status=503, code="storage_unavailable") from None
        store.add_file(record)
        return file_out(record)
    finally:
        await form.close()


@router.get("")
async def list_files(
    state: Annotated[FactoryState, Depends(get_state)],
    page: Annotated[int, Query(ge=0)] = 0,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    purpose: str | None = None,
    search: str | None = None,
    sample_type: Annotated[list[str] | None, Query()] = None,
    include_total: bool = True,
) -> dict[str, Any]:
    records, total = state.store.list_files(page=page, page_size=page_size, purpose=purpose,
                                            search=search, sample_types=sample_type)
    return {"data": [file_out(r) for r in records], "object": "list",
            "total": total if include_total else None}


def _file(state: FactoryState, file_id: str) -> FileRecord:
    record = state.store.get_file(file_id)
    if record is None:
        raise NotFound(f"no file {file_id!r}", param="file_id", code="file_not_found")
    return record


@router.get("/{file_id}")
async def retrieve_file(file_id: str,
                        state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return file_out(_file(state, file_id), with_deleted=True)


@router.get("/{file_id}/content")
async def download_file(file_id: str,
                        state: Annotated[FactoryState, Depends(get_state)]) -> FileResponse:
    record = _file(state, file_id)
    path = await run_in_threadpool(state.store.file_path, record.id)
    return FileResponse(path, media_type="application/octet-stream",
                        filename=record.filename)


@router.delete("/{file_id}")
async def delete_file(file_id: str,
                      state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    _file(state, file_id)
    state.store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
