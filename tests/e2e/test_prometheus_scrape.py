"""A real Prometheus server scrapes a real gateway and a real factory, end to end.

Everything is a separate process on loopback ports: redis-server, the factory
(`python -m service.cli factory`, which first trains the classifier the tasks use), the gateway
(`python -m service.cli serve`) and Debian's `prometheus` with a generated config (1 s scrape
interval, a temporary TSDB) that also loads deploy/prometheus/alerts.yml. After traffic the query API
must show both targets up and `gateway_request_duration_seconds_count` rising for each task used;
the alert rules must load, and every dashboard query must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.factory import FactoryClient, jsonl, sentiment_rows
from tests.support.processes import spawn, stop
from tests.support.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "classifier-gateway.json"
TASKS = ("sentiment", "sentiment_uncached")


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, ok: Any, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Polls until `ok(result)`; scrapes every second, so a few seconds is the usual wait."""
        deadline = time.monotonic() + timeout_s
        result = self.query(expr)
        while not ok(result):
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} never satisfied the condition; last result {result}")
            time.sleep(0.25)
            result = self.query(expr)
        return result


def start_prometheus(tmp_path: Path, jobs: dict[str, str]) -> Prometheus:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `apt-get install prometheus` (.ci/run does it)")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                   "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in jobs.items()],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
         "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"prometheus did not start:\n{(tmp_path / 'prometheus.log').read_text()}")
        time.sleep(0.1)
    return Prometheus(url, process)


@dataclass
class Stack:
    gateway_url: str
    prometheus: Prometheus
    jobs: dict[str, str]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """One stack for the module: starting Prometheus and three processes is the slow part."""
    tmp_path = tmp_path_factory.mktemp("prometheus-e2e")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        factory_port = free_port()
        processes.append(spawn(
            ["-m", "service.cli", "factory"],
            env={"FACTORY_HOST": "127.0.0.1", "FACTORY_PORT": str(factory_port),
                 "FACTORY_DATA_DIR": str(tmp_path / "factory-data")},
            port=factory_port, log=tmp_path / "factory.log"))
        factory = FactoryClient(f"http://127.0.0.1:{factory_port}")
        model = factory.train(jsonl(sentiment_rows(200)))["fine_tuned_model"]
        factory.close()
        tasks = tmp_path / "tasks.yaml"
        tasks.write_text(yaml.safe_dump({
            "upstreams": {"local": {"base_url": f"http://127.0.0.1:{factory_port}"}},
            "tasks": {
                "sentiment": {"upstream": "local", "model": model},
                "sentiment_uncached": {"upstream": "local", "model": model, "cache_ttl_s": 0},
            },
        }))
        gateway_port = free_port()
        processes.append(spawn(
            ["-m", "service.cli", "serve"],
            env={"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(gateway_port),
                 "GATEWAY_TASKS_FILE": str(tasks), "GATEWAY_REDIS_URL": redis_server.url,
                 "GATEWAY_CACHE_PREFIX": f"e2e-prom-{os.getpid()}"},
            port=gateway_port, log=tmp_path / "gateway.log", ready_path="/readyz"))
        jobs = {"classifier-gateway": f"127.0.0.1:{gateway_port}",
                "classifier-factory": f"127.0.0.1:{factory_port}"}
        prometheus = start_prometheus(tmp_path, jobs)
        processes.append(prometheus.process)
        yield Stack(f"http://127.0.0.1:{gateway_port}", prometheus, jobs)
    finally:
        for process in reversed(processes):
            stop(process)


def send_traffic(gateway_url: str, rounds: int, tag: str) -> None:
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        for i in range(rounds):
            for task in TASKS:
                response = client.post("/classify", json={"task": task, "input": f"{tag} text {i}"})
                assert response.status_code == 200, response.text


def counts(prometheus: Prometheus) -> dict[str, float]:
    result = prometheus.query(
        'sum by (task) (gateway_request_duration_seconds_count{job="classifier-gateway"})')
    return {r["metric"].get("task", ""): float(r["value"][1]) for r in result}


def grafana_to_promql(expr: str) -> str:
    """Dashboard variables as Grafana would fill them with `All` selected."""
    for name, value in (("$__rate_interval", "1m"), ("$__range", "5m"), ("$job", ".*"),
                        ("$task", ".*")):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def test_prometheus_sees_targets_up_and_request_counts_rising(stack: Stack) -> None:
    prometheus = stack.prometheus
    # every target is scraped successfully
    up = prometheus.wait_for("up", lambda r: len(r) == len(stack.jobs)
                             and all(x["value"][1] == "1" for x in r))
    assert {r["metric"]["job"] for r in up} == set(stack.jobs)
    targets = httpx.get(f"{prometheus.url}/api/v1/targets").json()["data"]["activeTargets"]
    assert {t["health"] for t in targets} == {"up"}, targets

    send_traffic(stack.gateway_url, 5, "first")
    first = prometheus.wait_for(
        'sum by (task) (gateway_request_duration_seconds_count{job="classifier-gateway"})',
        lambda r: {x["metric"].get("task") for x in r if float(x["value"][1]) >= 5} >= set(TASKS))
    before = {r["metric"]["task"]: float(r["value"][1]) for r in first}

    send_traffic(stack.gateway_url, 3, "second")
    prometheus.wait_for(
        'sum by (task) (gateway_request_duration_seconds_count{job="classifier-gateway"})',
        lambda r: all(float(x["value"][1]) >= before[x["metric"]["task"]] + 3
                      for x in r if x["metric"].get("task") in TASKS)
        and {x["metric"].get("task") for x in r} >= set(TASKS))
    after = counts(prometheus)
    for task in TASKS:
        assert after[task] > before[task], (task, before, after)
    # the rate the dashboard shows is positive for both tasks
    rates = prometheus.query(
        'sum by (task) (rate(gateway_request_duration_seconds_count{job="classifier-gateway"}[1m]))')
    assert {r["metric"]["task"] for r in rates if float(r["value"][1]) > 0} >= set(TASKS)
    # the gateway's traffic reached the factory, and the factory's training job was counted
    prometheus.wait_for('sum(factory_classify_items_total{job="classifier-factory"})',
                        lambda r: bool(r) and float(r[0]["value"][1]) > 0)
    jobs = prometheus.query('factory_jobs_total{job="classifier-factory", status="SUCCESS"}')
    assert [float(r["value"][1]) for r in jobs] == [1.0]


def test_alert_rules_load_and_dashboard_queries_run(stack: Stack) -> None:
    prometheus = stack.prometheus
    send_traffic(stack.gateway_url, 2, "rules")
    prometheus.wait_for('gateway_requests_total{job="classifier-gateway"}', lambda r: len(r) > 0)

    groups = httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    expected = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
                for rule in group["rules"]}
    assert set(loaded) == expected
    # rules are evaluated every second; none may fail to evaluate
    deadline = time.monotonic() + 15
    while any(r.get("lastEvaluation", "").startswith("0001") for r in loaded.values()):
        assert time.monotonic() < deadline, "rules were never evaluated"
        time.sleep(0.5)
        groups = httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
        loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert {name: r["health"] for name, r in loaded.items() if r["health"] != "ok"} == {}
    # with healthy traffic nothing fires
    firing = [a for a in httpx.get(f"{prometheus.url}/api/v1/alerts").json()["data"]["alerts"]
              if a["state"] == "firing"]
    assert firing == []

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 15
    for expr in exprs:
        prometheus.query(grafana_to_promql(expr))  # raises on a PromQL error
    # the panels that matter have data once traffic has flowed
    throughput = prometheus.query(grafana_to_promql(exprs[0]))
    assert {r["metric"]["task"] for r in throughput} >= set(TASKS)


def test_metric_families_used_by_alerts_and_dashboard_are_exposed(stack: Stack) -> None:
    """Prometheus keeps HELP/TYPE metadata for every family a target exposes, even with no samples
    yet (a labelled counter nobody has incremented), so this catches a renamed metric."""
    prometheus = stack.prometheus
    prometheus.wait_for('up{job="classifier-gateway"}', lambda r: r and r[0]["value"][1] == "1")
    deadline = time.monotonic() + 15
    while True:
        metadata = httpx.get(f"{prometheus.url}/api/v1/metadata").json()["data"]
        names = set(metadata)
        if (any(n.startswith("gateway_") for n in names) and any(n.startswith("factory_") for n in names)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    text = ALERTS.read_text() + DASHBOARD.read_text()
    used = set(re.findall(r"\b((?:gateway|factory)_[a-z_]+)\b", text))
    missing = []
    for series in used:
        # In the OpenMetrics format (which the gateway serves when Prometheus asks, for the
        # exemplars) a counter's family is named without `_total`.
        family = re.sub(r"_(bucket|sum|count|total)$", "", series)
        if series not in metadata and family not in metadata \
                and re.sub(r"_(bucket|sum|count)$", "", series) not in metadata:
            missing.append(series)
    assert missing == [], f"used but not exposed by the gateway or factory: {sorted(missing)}"


def test_docker_healthcheck_script_probes_a_live_gateway(stack: Stack) -> None:
    script = ROOT / "deploy" / "docker" / "healthcheck.py"
    port = stack.gateway_url.rsplit(":", 1)[1]
    env = {**os.environ, "GATEWAY_PORT": port}
    ok = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0, ok.stderr
    env["GATEWAY_PORT"] = str(free_port())  # nothing listens there
    down = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=30)
    assert down.returncode == 1 and "healthz" in down.stderr
