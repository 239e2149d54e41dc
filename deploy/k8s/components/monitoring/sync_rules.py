#!/usr/bin/env python3
"""Writes prometheusrule.yaml from deploy/prometheus/alerts.yml.

alerts.yml stays the one source of truth because promtool can unit-test it and compose loads it
as is; the operator needs the same groups wrapped in a PrometheusRule. Run after editing alerts.yml
(the deploy tests fail until you do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parents[2] / "prometheus" / "alerts.yml"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/alerts.yml (the source of truth, unit-tested with promtool)\n"
    "# by sync_rules.py next to this file; the deploy tests fail when the two differ.\n"
)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line PromQL stays readable as a `|` block instead of an escaped one-liner."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def render() -> str:
    groups: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "classifier-gateway",
            "labels": {"app.kubernetes.io/name": "classifier-gateway"},
        },
        "spec": groups,
    }
    body = yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=10_000)
    return HEADER + body


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
