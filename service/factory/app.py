"""`create_app(settings)`: the factory, a local Mistral-compatible classifier server.

The lifespan builds everything (store, metrics, model catalog, job workers) from the settings and
closes it again; nothing is configured at import time, so tests run several factories side by
side, each on its own data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header
from prometheus_client import CollectorRegistry

from service.factory.blobs import open_blobs
from service.factory.catalog import ModelCatalog
from service.factory.errors import Unauthorized, install_error_handlers
from service.factory.gc import sweep
from service.factory.jobs import JobManager
from service.factory.metrics import FactoryMetrics
from service.factory.routes import classify, files, health, jobs, models
from service.factory.settings import FactorySettings
from service.factory.state import FactoryState
from service.factory.store import Store
from service.tracing import TracingMiddleware, open_tracing

log = logging.getLogger("service.factory")


def _auth(settings: FactorySettings) -> Callable[..., Awaitable[None]]:
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else b""

    async def check(authorization: Annotated[str | None, Header()] = None) -> None:
        if not expected:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 expected):
            raise Unauthorized("missing or invalid API key: send `Authorization: Bearer <key>` "
                               "with the key the factory was started with (FACTORY_API_KEY)",
                               headers={"WWW-Authenticate": "Bearer"})

    return check


async def _sweep_orphans(store: Store, min_age_s: int) -> None:
    """The start-up sweep of orphaned blobs (`gc.py`), off the start's path: a large bucket
    takes a while to list, and serving does not depend on it."""
    try:
        report = await asyncio.to_thread(sweep, store, min_age_s=min_age_s)
    except Exception as exc:
        log.warning("the sweep of orphaned blobs failed (%s: %s); run `classifier-gateway "
                    "factory gc` to retry it", type(exc).__name__, exc)
        return
    if report.removed:
        log.info("removed %d orphaned blob(s), %d bytes", len(report.removed),
                 report.bytes_removed)


def create_app(settings: FactorySettings | None = None,
               registry: CollectorRegistry | None = None) -> FastAPI:
    settings = settings or FactorySettings()
    registry = registry or CollectorRegistry()
    # None unless the `otel` extra is installed and OTEL_* variables ask for traces.
    tracing = open_tracing("classifier-factory")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        data_dir = settings.resolved_data_dir
        blobs = open_blobs(settings.storage_url, data_dir, settings.disk_cache_bytes)
        blobs.check()
        database = settings.database_url.get_secret_value() if settings.database_url else None
        store = Store(data_dir, database, blobs)
        metrics = FactoryMetrics(registry)
        catalog = ModelCatalog(store, metrics, settings.model_cache_size, int(time.time()),
                               capacity_bytes=settings.model_cache_bytes)
        manager = JobManager(store, settings, metrics, tracing=tracing)
        app.state.factory = FactoryState(settings, store, manager, catalog, metrics, tracing)
        await manager.start()
        sweeper = asyncio.create_task(_sweep_orphans(store, settings.gc_min_age_s),
                                      name="factory-gc")
        log.info("factory ready: metadata in %s (schema revision %s), blobs in %s, %d model(s)",
                 store.engine.url.render_as_string(), store.schema_revision(), blobs.url,
                 len(store.list_models()))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await manager.stop()
            store.close()
            if tracing is not None:
                tracing.shutdown()  # exports the spans still buffered

    app = FastAPI(title="Classifier factory", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if tracing is not None:  # a server span per request, continuing the caller's traceparent
        app.add_middleware(TracingMiddleware, tracing=tracing)
    app.include_router(health.router)
    protected = [Depends(_auth(settings))]
    for router in (files.router, jobs.router, models.router, classify.router):
        app.include_router(router, dependencies=protected)
    return app
