"""`/v1/fine_tuning/jobs`: create (or dry-run), list, get, start, cancel."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from service.factory.schemas import JobIn, Status, detailed_job_out, job_out
from service.factory.state import FactoryState, get_state
from service.factory.store import JobRecord

router = APIRouter(prefix="/v1/fine_tuning/jobs")


def _detailed(state: FactoryState, job: JobRecord) -> dict[str, Any]:
    return detailed_job_out(job, state.store.events(job.id), state.store.checkpoints(job.id),
                            state.jobs.progress(job))


@router.post("")
async def create_job(body: JobIn, state: Annotated[FactoryState, Depends(get_state)],
                     dry_run: bool | None = None) -> dict[str, Any]:
    created = await state.jobs.create(body, dry_run=bool(dry_run))
    if isinstance(created, dict):
        return created
    return job_out(created)


@router.get("")
async def list_jobs(
    state: Annotated[FactoryState, Depends(get_state)],
    page: Annotated[int, Query(ge=0)] = 0,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    model: str | None = None,
    status: Status | None = None,
    suffix: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    created_by_me: bool = False,
    wandb_project: str | None = None,
    wandb_name: str | None = None,
) -> dict[str, Any]:
    jobs, total = state.store.list_jobs(
        page=page, page_size=page_size, model=model, status=status, suffix=suffix,
        created_after=int(created_after.timestamp()) if created_after else None,
        created_before=int(created_before.timestamp()) if created_before else None,
    )
    return {"data": [job_out(j) for j in jobs], "object": "list", "total": total}


@router.get("/{job_id}")
async def get_job(job_id: str,
                  state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return _detailed(state, state.jobs.get(job_id))


@router.post("/{job_id}/start")
async def start_job(job_id: str,
                    state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return _detailed(state, await state.jobs.start_job(job_id))


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str,
                     state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, Any]:
    return _detailed(state, await state.jobs.cancel(job_id))
