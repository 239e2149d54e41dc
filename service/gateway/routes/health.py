"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from service.gateway.responses import JSONResponse
from service.gateway.routes.openapi import METRICS_RESPONSES, Health, Readiness
from service.gateway.runtime import RuntimeDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive", responses={200: {"model": Health}})
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="Ready for traffic: tasks loaded and not draining",
            responses={200: {"model": Readiness},
                       503: {"model": Readiness, "description": "Not ready: see `problems`."}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """A degraded cache does not fail readiness: the gateway serves without it (fail open), and
    taking every replica out of rotation because Redis is down would turn a slowdown into an outage.
    """
    registry = runtime.registry
    cache = runtime.cache.state if runtime.cache is not None else "disabled"
    problems = []
    if runtime.lifecycle.draining:
        problems.append("draining: shutting down")
    if not registry.loaded:
        problems.append(f"no tasks loaded: {registry.last_error or 'tasks file not read yet'}")
    body = {
        "status": "not ready" if problems else ("degraded" if cache == "degraded" else "ready"),
        "problems": problems,
        "tasks": len(registry.current.tasks),
        "cache": cache,
        "circuits_open": runtime.upstreams.open_circuits(),
        "queued_items": runtime.batcher.queued_items,
    }
    return JSONResponse(body, status_code=503 if problems else 200)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses=METRICS_RESPONSES)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    """OpenMetrics when the scraper asks for it (Prometheus does): only that format carries the
    latency histograms' exemplars, the trace ids of sampled requests (docs/observability.md)."""
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        return Response(openmetrics.generate_latest(  # type: ignore[no-untyped-call]
            runtime.metrics.registry),
                        media_type=openmetrics.CONTENT_TYPE_LATEST)
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
