"""The README is the user's front door: it must document every setting and every metric."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from service.gateway.metrics import GatewayMetrics
from service.gateway.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_gateway_setting_is_documented() -> None:
    missing = [f"GATEWAY_{name.upper()}" for name in Settings.model_fields
               if f"`GATEWAY_{name.upper()}`" not in README
               and f"`GATEWAY_{name.upper()}` /" not in README]
    assert not missing, f"README lacks {missing}"


def test_every_gateway_metric_is_documented() -> None:
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    names = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert not missing, f"README lacks {missing}"
