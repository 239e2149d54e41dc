"""The README's factory section documents every factory setting and metric."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from service.factory.metrics import FactoryMetrics
from service.factory.settings import FactorySettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_factory_setting_is_documented() -> None:
    missing = [f"FACTORY_{name.upper()}" for name in FactorySettings.model_fields
               if f"`FACTORY_{name.upper()}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_every_factory_metric_is_documented() -> None:
    registry = CollectorRegistry()
    FactoryMetrics(registry)
    names = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert not missing, f"README lacks {missing}"
