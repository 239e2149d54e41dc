"""UpstreamClient: one pooled HTTP client per upstream, with retries and a circuit breaker.

INTERFACE STUB: being implemented (see the gateway issue, item 7).
"""

from __future__ import annotations

from typing import Any

from service.gateway.metrics import GatewayMetrics
from service.gateway.registry import UpstreamSpec
from service.gateway.settings import Settings


class UpstreamClient:
    def __init__(self, spec: UpstreamSpec, settings: Settings, metrics: GatewayMetrics) -> None:
        raise NotImplementedError

    @property
    def circuit_open(self) -> bool:
        raise NotImplementedError

    async def classify(self, endpoint: str, model: str, inputs: list[Any], *,
                       deadline: float) -> list[dict[str, Any]]:
        """POST /v1/<endpoint> {"model", "input": inputs}; return the `results` list.

        `deadline` is absolute, in `time.monotonic()` seconds. Raises the UpstreamError subclasses of
        errors.py; never includes the key in a message."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class UpstreamPool:
    """One UpstreamClient per upstream spec; a changed spec (after a reload) gets a new client."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        raise NotImplementedError

    def get(self, spec: UpstreamSpec) -> UpstreamClient:
        raise NotImplementedError

    def open_circuits(self) -> list[str]:
        """Names of upstreams whose circuit is open (for /readyz)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError
