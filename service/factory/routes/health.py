"""Liveness and metrics: open without a key, like the gateway's."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.factory.state import FactoryState, get_state

router = APIRouter()


@router.get("/healthz")
async def healthz(state: Annotated[FactoryState, Depends(get_state)]) -> dict[str, object]:
    return {"status": "ok", "jobs_running": len(state.jobs.running)}


@router.get("/metrics")
async def metrics(state: Annotated[FactoryState, Depends(get_state)]) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
