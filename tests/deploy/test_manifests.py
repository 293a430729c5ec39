"""Deployment files: Kubernetes manifests valid against the API schemas (kubernetes-validate
--strict), the KEDA object against KEDA's model, the PrometheusRule equal to the rules file, the
operators' runbooks' kubectl commands finding what they name, and every INGEST_* setting in the
manifests and the compose file one the product knows."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest_stream.config import SOURCES, Settings, effective

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
RUNBOOK = ROOT / "docs" / "runbook.md"
CRD_KINDS = {"ScaledObject", "PrometheusRule", "ServiceMonitor"}
KNOWN = set(effective(Settings()))
WORKER = "ingest-worker"  # the name the operators' runbooks use for the workers' workload
PAUSED_REPLICAS = "autoscaling.keda.sh/paused-replicas"
# The operators' reference runbook (shared/reference/ingest-pipeline-runbook.md, "Scaling Workers")
# runs these as written, in the namespace of the current context (no -n).
REFERENCE_KUBECTL = [
    "kubectl scale deployment ingest-worker --replicas=10",
    "kubectl get pods -l app=ingest-worker",
]
REFERENCE_SERVICE = ("ingest-service", 8080)  # its curl http://ingest-service:8080/…
KUBECTL_KINDS = {"deployment": "Deployment", "deployments": "Deployment", "deploy": "Deployment",
                 "statefulset": "StatefulSet", "statefulsets": "StatefulSet", "sts": "StatefulSet",
                 "scaledobject": "ScaledObject", "scaledobjects": "ScaledObject", "so": "ScaledObject",
                 "service": "Service", "services": "Service", "svc": "Service",
                 "pod": "Pod", "pods": "Pod", "po": "Pod"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for _, d in documents() if d["kind"] == kind]
    return doc


def all_of(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in documents() if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any] | None:
    found = [d for d in all_of(kind) if d["metadata"]["name"] == name]
    return found[0] if found else None


def worker() -> dict[str, Any]:
    """The workers' workload: a Deployment named as the runbooks name it."""
    found = named("Deployment", WORKER)
    assert found is not None, f"no Deployment {WORKER} in k8s/"
    return found


def pod_labels() -> dict[str, str]:
    return worker()["spec"]["template"]["metadata"]["labels"]


def the_container() -> dict[str, Any]:
    [container] = worker()["spec"]["template"]["spec"]["containers"]
    return container


def config() -> dict[str, str]:
    return by_kind("ConfigMap")["data"]


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) as the API server applies it."""
    if not all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not ok:
            return False
    return True


def service_selects(service: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = service["spec"].get("selector") or {}
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def test_builtin_resources_pass_kubernetes_validate_strict():
    paths = sorted({str(p) for p, d in documents() if d["kind"] not in CRD_KINDS})
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "kubernetes-validate"), "--strict", *paths],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") + done.stderr.count("passed") >= len(paths)


def test_kustomization_lists_every_manifest_and_sets_no_namespace():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present
    # The runbooks' kubectl commands carry no -n: everything lives in the current context's namespace.
    assert "namespace" not in kustomization
    assert not [d["metadata"]["name"] for _, d in documents() if "namespace" in d["metadata"]]


def scaled_object():
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    doc = by_kind("ScaledObject")
    scaled = ScaledObject.model_validate(doc)
    # The model ignores keys it does not know: a misspelt field would pass unseen without this.
    assert scaled.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
    return scaled


def test_the_keda_scaled_object_matches_kedas_model_and_targets_the_workers():
    scaled = scaled_object()
    assert scaled.spec.scale_target_ref.kind == "Deployment"
    assert scaled.spec.scale_target_ref.name == worker()["metadata"]["name"]
    assert {t.type for t in scaled.spec.triggers} == {"kafka"}
    assert all(t.metadata["consumerGroup"] == config()["INGEST_APP_ID"] for t in scaled.spec.triggers)
    assert all(t.metadata["bootstrapServers"] == config()["INGEST_KAFKA_BOOTSTRAP"]
               for t in scaled.spec.triggers)
    assert scaled.spec.max_replica_count <= int(config()["INGEST_PARTITIONS"])
    # The HPA owns the count: a replicas in the Deployment would reset it on every apply.
    assert "replicas" not in worker()["spec"]


def test_keda_scales_on_the_source_topics_lag_only():
    """A down sink's topic lags; more workers do not bring the sink back."""
    settings = Settings.from_env(config())
    topics = [t.metadata.get("topic") for t in scaled_object().spec.triggers]
    assert sorted(topics) == sorted(settings.source_topic(source) for source in SOURCES)
    assert not [t for t in topics if t is None or t.startswith(f"{settings.topic_prefix}.sink.")]


def test_keda_scales_down_slowly_and_sets_nothing_it_ignores():
    spec = scaled_object().spec
    # cooldownPeriod only applies to scaling to zero.
    assert spec.cooldown_period is None or spec.min_replica_count == 0
    assert spec.min_replica_count >= 1 + int(config()["INGEST_TABLE_STANDBY_REPLICAS"])
    down = spec.advanced.horizontal_pod_autoscaler_config.behavior.scale_down
    assert down.stabilization_window_seconds >= 300  # each step is a Kafka rebalance
    assert down.policies and all(p.type == "Pods" and p.value == 1 and p.period_seconds >= 120
                                 for p in down.policies)


def test_manual_scaling_with_keda_paused_replicas_is_documented():
    scaled = by_kind("ScaledObject")["metadata"]["name"]
    assert PAUSED_REPLICAS in (K8S / "keda-scaledobject.yaml").read_text()
    text = RUNBOOK.read_text()
    assert re.search(rf"kubectl annotate scaledobject {scaled} {PAUSED_REPLICAS}=\d+", text)
    assert f"kubectl annotate scaledobject {scaled} {PAUSED_REPLICAS}-" in text


def test_prometheus_rule_carries_exactly_the_rules_file():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "ingest-rules.yml").read_text())
    assert by_kind("PrometheusRule")["spec"]["groups"] == rules["groups"]
    monitor = by_kind("ServiceMonitor")["spec"]
    assert monitor["endpoints"][0]["path"] == "/metrics"


def test_the_service_monitor_scrapes_each_worker_once():
    monitor = by_kind("ServiceMonitor")["spec"]
    assert not monitor.get("namespaceSelector")
    scraped = [s for s in all_of("Service")
               if label_selector_matches(monitor["selector"], s["metadata"].get("labels", {}))]
    assert len(scraped) == 1, [s["metadata"]["name"] for s in scraped]
    [service] = scraped
    assert service_selects(service, pod_labels())
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    # A worker that is not ready (a sink down) is still scraped, and reached by admin overrides.
    assert service["spec"].get("publishNotReadyAddresses") is True


def test_workers_run_as_non_root_with_limits_and_a_data_dir_of_their_own():
    spec = worker()["spec"]
    pod = spec["template"]["spec"]
    container = the_container()
    assert label_selector_matches(spec["selector"], pod_labels())
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == config()["INGEST_DATA_DIR"]
    [data] = [v for v in pod["volumes"] if v["name"] == "data"]
    assert "emptyDir" in data or "ephemeral" in data  # one per pod, never a claim pods would share
    assert int(config()["INGEST_TABLE_STANDBY_REPLICAS"]) >= 1
    # One worker replaced at a time: a partition's active and standby copies never go together.
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert by_kind("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert label_selector_matches(by_kind("PodDisruptionBudget")["spec"]["selector"], pod_labels())
    headless = [d for d in all_of("Service") if d["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [WORKER]
    assert service_selects(headless[0], pod_labels())


def test_probes_readiness_is_not_liveness_and_start_allows_for_table_recovery():
    container = the_container()
    ports = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/health"
    assert ready["path"] == "/health/ready"  # consuming and its sinks reachable
    assert ready["path"] != live["path"]
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 300  # minutes
    assert {live["port"], ready["port"], startup["httpGet"]["port"]} <= ports


def test_workers_spread_over_nodes_so_standby_copies_sit_elsewhere():
    constraints = {c["topologyKey"]: c for c in
                   worker()["spec"]["template"]["spec"].get("topologySpreadConstraints", [])}
    host = constraints.get("kubernetes.io/hostname")
    assert host is not None, "no spread by node"
    assert host["maxSkew"] == 1 and host["whenUnsatisfiable"] == "DoNotSchedule"
    assert "topology.kubernetes.io/zone" in constraints
    for constraint in constraints.values():
        assert label_selector_matches(constraint["labelSelector"], pod_labels())


def runbook_kubectl_commands() -> list[str]:
    """kubectl commands in our runbook, in code blocks or inline, comments cut."""
    found = re.findall(r"kubectl [^`\n]*", RUNBOOK.read_text())
    return [line.split("  #", 1)[0].strip() for line in found]


def parse_kubectl(line: str) -> tuple[list[str], dict[str, str]]:
    args: list[str] = []
    options: dict[str, str] = {}
    words = iter(shlex.split(line)[1:])
    for word in words:
        if word.startswith("-"):
            key, eq, value = word.partition("=")
            if not eq and key in {"-l", "--selector", "-o", "--output", "-n", "--namespace", "--replicas"}:
                value = next(words)
            options[key] = value
        else:
            args.append(word)
    return args, options


@pytest.mark.parametrize("line", [pytest.param(line, id=f"reference: {line}") for line in REFERENCE_KUBECTL]
                         + [pytest.param(line, id=f"runbook: {line}") for line in runbook_kubectl_commands()])
def test_each_kubectl_command_of_the_runbooks_finds_what_it_names(line):
    args, options = parse_kubectl(line)
    namespaced = {"-n", "--namespace", "-A", "--all-namespaces"} & set(options)
    assert not namespaced, "our manifests set no namespace"
    verb, what, *rest = args
    kind_word, _, name = what.partition("/")
    name = name or (rest[0] if rest else "")
    kind = KUBECTL_KINDS[kind_word.lower()]
    selector = options.get("-l", options.get("--selector"))
    if kind == "Pod":
        workloads = [d for _, d in documents() if d["kind"] in WORKLOAD_KINDS]
        if selector:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            matched = [d for d in workloads if label_selector_matches({"matchLabels": wanted},
                                                                      d["spec"]["template"]["metadata"]["labels"])]
            assert [d["metadata"]["name"] for d in matched] == [WORKER], selector
        if name:  # a pod's name starts with its workload's
            assert any(name.startswith(d["metadata"]["name"] + "-") for d in workloads), name
        return
    assert name, line
    target = named(kind, name)
    assert target is not None, f"no {kind} {name} in k8s/"
    if verb == "scale":
        assert kind in WORKLOAD_KINDS
        replicas = options.get("--replicas", "")
        if replicas.isdigit():  # not a placeholder (N)
            [scaled] = [d for d in all_of("ScaledObject") if d["spec"]["scaleTargetRef"]["name"] == name]
            assert int(replicas) <= scaled["spec"]["maxReplicaCount"]


def test_the_reference_runbooks_service_address_reaches_the_workers():
    name, port = REFERENCE_SERVICE
    service = named("Service", name)
    assert service is not None
    assert port in {p["port"] for p in service["spec"]["ports"]}
    assert service_selects(service, pod_labels())


def test_settings_in_manifests_are_known_and_valid():
    config = by_kind("ConfigMap")["data"]
    secret = by_kind("Secret")["stringData"]
    assert set(config) | set(secret) <= KNOWN
    Settings.from_env({**config, **secret})  # raises ConfigError on a bad value


def test_compose_is_a_whole_pipeline_with_known_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    wanted = {"kafka", "postgres", "neo4j", "typesense", "prometheus", "grafana", "worker-1", "worker-2"}
    assert wanted <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image"
        for volume in service.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), f"{name}: {host} missing"
    env = services["worker-1"]["environment"]
    assert set(env) <= KNOWN
    Settings.from_env(env)
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == ["worker-1", "worker-2"]


