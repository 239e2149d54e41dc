"""The Grafana dashboard and provisioning, and the metric names that dashboards and alerts rely on.

A renamed metric would leave a panel empty or an alert silent without any error, so every series
name in the dashboard and in alerts.yml is checked against what the gateway's metrics module really
exports, and the factory's. The queries themselves are run against a real
Prometheus in tests/e2e/test_prometheus_scrape.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from service.factory.metrics import FactoryMetrics
from service.gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "classifier-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

METRIC = re.compile(r"\b((?:gateway|factory)_[a-z_]+)\b")


def series_names(registry: CollectorRegistry) -> set[str]:
    """Series names a registry exports, whether or not a labelled child exists yet."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def gateway_series() -> set[str]:
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    return series_names(registry)


def factory_series() -> set[str]:
    registry = CollectorRegistry()
    FactoryMetrics(registry)
    return series_names(registry)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_the_gateway_series_list_is_real() -> None:
    names = gateway_series()
    assert "gateway_requests_total" in names
    assert "gateway_request_duration_seconds_bucket" in names
    assert "gateway_requests_bucket" not in names


def test_dashboard_and_alerts_use_only_exported_series() -> None:
    known = gateway_series() | factory_series()
    variables = [v["query"]["query"] for v in dashboard()["templating"]["list"]
                 if isinstance(v.get("query"), dict)]
    for expr in [*dashboard_exprs(), *alert_exprs(), *variables]:
        used = set(METRIC.findall(expr))
        assert used or expr.startswith("up{"), f"no metric in {expr!r}"
        assert used <= known, f"{sorted(used - known)} in {expr!r} is not exported"


def test_factory_job_counters_exist_at_zero_so_increase_sees_the_first_failure() -> None:
    """FactoryJobsFailed uses increase(), which cannot see the jump from a missing series to 1."""
    registry = CollectorRegistry()
    FactoryMetrics(registry)
    statuses = {sample.labels["status"]: sample.value for family in registry.collect()
                if family.name == "factory_jobs" for sample in family.samples
                if sample.name == "factory_jobs_total"}
    assert statuses.get("FAILED") == 0 and statuses.get("FAILED_VALIDATION") == 0, statuses


def test_dashboard_covers_what_operators_watch() -> None:
    exprs = "\n".join(dashboard_exprs())
    for series in ("gateway_requests_total", "gateway_request_duration_seconds_bucket",
                   "gateway_cache_lookups_total", "gateway_batch_size_bucket",
                   "gateway_upstream_duration_seconds_bucket", "gateway_upstream_requests_total",
                   "gateway_queue_depth", "factory_jobs_total"):
        assert series in exprs, f"no panel shows {series}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (task, le)" in exprs


def test_dashboard_panels_are_well_formed() -> None:
    data = dashboard()
    assert data["uid"] and data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    names = {v["name"] for v in data["templating"]["list"]}
    for expr in dashboard_exprs():
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in names, f"undefined ${var} in {expr!r}"


def test_provisioning_points_at_the_dashboard_folder_compose_mounts() -> None:
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "classifier-gateway.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    assert sources["datasources"][0]["type"] == "prometheus"
