"""The README is the front door and `docs/` the reference: both stay true to the code.

Every process setting must appear in the one settings table with its real default, every metric on
the metrics page, every alert on the deployment page; the README's links and the sections the site
includes from it must exist. `make lint` builds the site with `mkdocs build --strict`, which checks
the links between pages and that every page is in the navigation.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from service.commands.demo_runner import BASE_MODEL as DEMO_BASE_MODEL
from service.commands.demo_runner import TASKS as DEMO_TASKS
from service.factory.jobs import fine_tuned_model_id
from service.factory.metrics import FactoryMetrics
from service.factory.settings import FactorySettings
from service.gateway.metrics import GatewayMetrics
from service.gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a page, up to the next `## `."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def table(text: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in `text`, keyed by its header cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines]
    header, rows = split[0], split[2:]
    return [dict(zip(header, row, strict=True)) for row in rows]


def documented_default(value: object) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "" or value is None:
        return "empty"
    return f"`{value}`"


def metric_names(metrics: type[GatewayMetrics] | type[FactoryMetrics]) -> set[str]:
    registry = CollectorRegistry()
    metrics(registry)
    return {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}


SETTINGS = {row["variable"]: row for row in table(section(page("configuration.md"), "Settings"))}


def test_the_settings_table_lists_every_setting_with_its_real_default() -> None:
    expected = {f"`GATEWAY_{name.upper()}`": field for name, field in Settings.model_fields.items()}
    expected |= {f"`FACTORY_{name.upper()}`": field
                 for name, field in FactorySettings.model_fields.items()}
    for variable, field in expected.items():
        assert variable in SETTINGS, f"{variable} is missing from docs/configuration.md#settings"
        assert SETTINGS[variable]["default"] == documented_default(field.default), variable
        assert SETTINGS[variable]["what it does"], f"{variable} says nothing about what it does"


def test_settings_are_tabled_once() -> None:
    """One settings table: no other page (nor the README) tables the settings again.

    A page may name one variable in a table of its own (the command line's reads
    `GATEWAY_TASKS_FILE` too), but not copy the settings' rows.
    """
    pages = {path.name: path.read_text() for path in DOCS.glob("*.md")} | {"README.md": README}
    for name, text in pages.items():
        rows = [line for line in text.splitlines()
                if re.match(r"\| `(GATEWAY|FACTORY)_[A-Z_]+` \|", line)]
        if name == "configuration.md":
            assert len(rows) == len(SETTINGS) - 1  # every row but MISTRAL_API_KEY's
        else:
            assert len(rows) <= 1, f"{name} repeats settings rows: {rows[:3]}"


def test_every_gateway_and_factory_metric_is_documented() -> None:
    metrics = page("metrics.md")
    for heading, names in (("Gateway", metric_names(GatewayMetrics)),
                           ("Factory", metric_names(FactoryMetrics))):
        documented = {row["series"].strip("`") for row in table(section(metrics, heading))}
        assert names <= documented, f"docs/metrics.md ({heading}) lacks {sorted(names - documented)}"


def test_every_alert_is_in_the_alert_table() -> None:
    alerts = {row["alert"] for row in table(section(page("deployment.md"), "Prometheus and Grafana"))}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in alerts, rule["alert"]


def test_the_deployment_page_covers_each_way_to_run() -> None:
    deployment = page("deployment.md")
    for heading in ("The image", "docker compose", "Kubernetes (kustomize)",
                    "Prometheus and Grafana", "Scaling"):
        assert f"\n## {heading}\n" in deployment


def test_the_readme_is_the_front_door() -> None:
    """What it is, the two set-up commands, the walkthrough, and links that all lead somewhere."""
    assert "make run " in README and "make test " in README
    assert "## From data to a classifier in five minutes" in README
    links = re.findall(r"\]\((docs/[^)#]*)", README)
    assert {"docs/cli.md", "docs/api.md", "docs/configuration.md", "docs/metrics.md",
            "docs/deployment.md", "docs/factory.md", "docs/performance.md",
            "docs/architecture.md"} <= set(links)
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    assert len(README.splitlines()) < 250, "the reference belongs in docs/, not the README"


def test_the_site_includes_the_readme_sections_it_names() -> None:
    """docs/index.md pulls the README's sections in by name: each must be marked in the README."""
    included = re.findall(r'^--8<-- "README\.md:(\w+)"$', page("index.md"), re.MULTILINE)
    assert included == ["intro", "setup", "walkthrough"]
    for name in included:
        start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
        assert README.index(start) < README.index(end), name
        body = README.split(start, 1)[1].split(end, 1)[0]
        assert "](docs/" not in body, f"a docs/ link in README:{name} breaks on the site"


def test_the_architecture_page_draws_processes_flows_and_modules() -> None:
    """One diagram each: the processes, a request's path, data to a classifier, the modules'
    directions (tests/unit/test_architecture.py holds the last one to the code); all drawn top to
    bottom, to stay readable at the page's width."""
    text = page("architecture.md")
    for heading in ("Processes", "A request's path", "From data to a classifier, and out to a "
                    "server", "Modules and their directions"):
        assert section(text, heading).count("```mermaid\n") == 1, heading
    assert text.count("```mermaid\n") == text.count("```mermaid\nflowchart TB\n") == 4


def test_the_client_key_convention_is_written_once_and_the_old_name_only_as_such() -> None:
    """GATEWAY_API_KEYS on the gateway, GATEWAY_API_KEY in clients: one section says so, the
    others link to it, and the demo's old `$GATEWAY_KEY` appears only where it is called old."""
    pages = {path.name: path.read_text() for path in DOCS.glob("*.md")} | {"README.md": README}
    assert sum("\n## Client keys\n" in text for text in pages.values()) == 1
    assert "\n## Client keys\n" in pages["configuration.md"]
    for name, text in pages.items():
        for line in text.splitlines():
            if "GATEWAY_KEY`" in line:
                assert name == "configuration.md" and "used to" in line, (name, line)


def test_nothing_cites_the_design_documents_outside_the_repository() -> None:
    """Code, tests and docs cite what a reader of this repository can open."""
    paths = [*ROOT.glob("service/**/*.py"), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/**/*.py"),
             *DOCS.glob("*.md"), ROOT / "README.md"]
    for path in paths:
        text = path.read_text()
        for needle in ("DESIGN.md", "shared/reference", "../shared/", "mistral-api.md"):
            if path.name == "test_docs.py":
                continue
            assert needle not in text, f"{path.relative_to(ROOT)} cites {needle}"


def test_the_classify_example_is_what_the_demo_serves() -> None:
    """docs/api.md shows `POST /classify` on the demo's `sentiment` task as `make run` serves it:
    a model fine-tuned from the demo's base model, in the factory's id format, with the labels of
    the demo's data, one result per input."""
    body = section(page("api.md"), "`POST /classify`: texts, by task name")
    assert "(This is the demo's `sentiment` task, as `make run` serves it.)" in body
    request = json.loads(re.search(r"-d '(\{.*\})'", body)[1])  # type: ignore[index]
    response = json.loads(body.split("```json\n", 1)[1].split("```", 1)[0])
    assert request["task"] == response["task"] == "sentiment"
    workspace, day, job = re.fullmatch(r"ft:classifier:([^:]+):([0-9a-f]{8}):(\d{8}):([0-9a-f]{8})",
                                       response["model"]).groups()[1:]  # type: ignore[union-attr]
    assert response["model"] == fine_tuned_model_id(
        DEMO_BASE_MODEL, workspace, job, datetime.strptime(day, "%Y%m%d").replace(
            tzinfo=UTC).timestamp()), f"{response['model']} is not fine-tuned from {DEMO_BASE_MODEL}"
    sentiment = next(task for task in DEMO_TASKS if task.name == "sentiment")
    rows = (ROOT / "service" / "factory" / "demo" / sentiment.dataset).read_text().splitlines()
    labels = {json.loads(row)["labels"]["sentiment"] for row in rows}
    assert len(response["results"]) == len(request["input"])
    for result in response["results"]:
        assert set(result["sentiment"]["scores"]) == labels
