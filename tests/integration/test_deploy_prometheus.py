"""Prometheus config and alert rules, checked by the real `promtool` (Debian's `prometheus`).

`promtool test rules` runs the unit tests in deploy/prometheus/alerts_test.yml; the tests here also
make sure every alert has a case that fires, and that promtool really fails on a broken rule or a
wrong expectation (so a green run means something).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (.ci/run does it)")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def alert_names() -> set[str]:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}


def test_compose_prometheus_config_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    tests: dict[str, Any] = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alert_names() - firing == set(), "alerts without a firing unit test"
    assert len(alert_names()) >= 8


def test_every_alert_has_severity_summary_and_description() -> None:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_promtool_catches_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: loosen one threshold and the 5xx test must break."""
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    alerts = (PROM / "alerts.yml").read_text()
    assert "> 0.05" in alerts
    (tmp_path / "alerts.yml").write_text(alerts.replace("> 0.05", "> 0.5", 1))
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "GatewayHigh5xxRatio" in result.stdout + result.stderr


def test_promtool_catches_a_broken_expression(tmp_path: Path) -> None:
    alerts = (PROM / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(alerts.replace("sum by (job, task)", "sum by (job, task", 1))
    result = promtool("check", "rules", "alerts.yml", cwd=tmp_path)
    assert result.returncode != 0
