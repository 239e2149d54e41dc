"""Runtime: everything a request handler needs, built once per process by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from service.gateway.batcher import MicroBatcher
from service.gateway.cache import ResultCache
from service.gateway.classifier import Classifier
from service.gateway.drift import LabelDrift
from service.gateway.feedback import FeedbackBook
from service.gateway.metrics import GatewayMetrics
from service.gateway.predictions import PredictionLog
from service.gateway.quotas import QuotaChecker
from service.gateway.registry import RegistryWatcher
from service.gateway.settings import Settings
from service.gateway.store import MemoryShadowStore, ShadowStore
from service.gateway.tenants import TenantStore, UsageRecorder
from service.gateway.upstream import UpstreamPool


@dataclass
class Lifecycle:
    """Shutdown state, set by the server's signal handling and read by /readyz."""

    draining: bool = False


@dataclass
class Runtime:
    settings: Settings
    metrics: GatewayMetrics
    registry: RegistryWatcher
    upstreams: UpstreamPool
    batcher: MicroBatcher
    cache: ResultCache | None
    classifier: Classifier
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    store: ShadowStore = field(default_factory=MemoryShadowStore)
    feedback: FeedbackBook | None = None
    tenants: TenantStore | None = None  # keys and tenant quotas (None without Redis)
    admin_tenants: TenantStore | None = None  # the same, for the admin API's longer deadline
    quotas: QuotaChecker | None = None
    usage: UsageRecorder | None = None
    drift: LabelDrift | None = None
    predictions: PredictionLog | None = None


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    """Async on purpose: FastAPI runs a sync dependency in a worker thread, a costly hop per request."""
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
