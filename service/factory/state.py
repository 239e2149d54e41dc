"""What the lifespan builds and the routes use, injected through `request.app.state.factory`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.factory.catalog import ModelCatalog
from service.factory.jobs import JobManager
from service.factory.metrics import FactoryMetrics
from service.factory.settings import FactorySettings
from service.factory.store import Store
from service.tracing import Tracing


@dataclass
class FactoryState:
    settings: FactorySettings
    store: Store
    jobs: JobManager
    catalog: ModelCatalog
    metrics: FactoryMetrics
    #: None when tracing is off (service/tracing.py).
    tracing: Tracing | None = None


def get_state(request: Request) -> FactoryState:
    state: FactoryState = request.app.state.factory
    return state
