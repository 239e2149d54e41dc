"""The README's Deploy section stays true to the code and the deploy files it describes."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import SecretStr

from service.factory.settings import FactorySettings
from service.gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DEPLOY = README.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]


def documented_default(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "" or value is None:
        return "empty"
    return f"`{value}`"


def test_the_deploy_section_exists_and_replaced_its_marker() -> None:
    assert "<!-- section: deploy -->" not in README
    for heading in ("### The image", "### docker compose", "### Kubernetes (kustomize)",
                    "### Prometheus and Grafana", "### Configuration reference", "### Scaling"):
        assert heading in DEPLOY


def test_configuration_reference_lists_every_setting_with_its_real_default() -> None:
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in DEPLOY.splitlines() if line.startswith("| `")}
    for name, field in Settings.model_fields.items():
        variable = f"`GATEWAY_{name.upper()}`"
        assert variable in rows, f"{variable} missing from the Deploy configuration reference"
        assert rows[variable] == documented_default(field.default), variable
    for name, field in FactorySettings.model_fields.items():
        variable = f"`FACTORY_{name.upper()}`"
        assert variable in rows, f"{variable} missing from the Deploy configuration reference"
        assert rows[variable] == documented_default(field.default), variable


def test_every_alert_is_in_the_alert_table() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert f"| `{rule['alert']}` |" in DEPLOY, rule["alert"]
