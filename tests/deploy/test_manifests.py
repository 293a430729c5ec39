"""Deployment files: Kubernetes manifests valid against the API schemas (kubernetes-validate
--strict), the KEDA object against KEDA's model, the PrometheusRule equal to the rules file, and
every INGEST_* setting in the manifests and the compose file one the product knows."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest_stream.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_KINDS = {"ScaledObject", "PrometheusRule", "ServiceMonitor"}
KNOWN = {f"INGEST_{f.name.upper()}" for f in fields(Settings)}


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, Any]:
    [doc] = [d for _, d in documents() if d["kind"] == kind]
    return doc


def test_builtin_resources_pass_kubernetes_validate_strict():
    paths = sorted({str(p) for p, d in documents() if d["kind"] not in CRD_KINDS})
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "kubernetes-validate"), "--strict", *paths],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") + done.stderr.count("passed") >= len(paths)


def test_the_keda_scaled_object_matches_kedas_model_and_targets_the_workers():
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    doc = by_kind("ScaledObject")
    scaled = ScaledObject.model_validate(doc)
    assert scaled.spec.scale_target_ref.kind == "StatefulSet"
    assert scaled.spec.scale_target_ref.name == by_kind("StatefulSet")["metadata"]["name"]
    assert {t.type for t in scaled.spec.triggers} == {"kafka"}
    group = by_kind("ConfigMap")["data"]["INGEST_APP_ID"]
    assert all(t.metadata["consumerGroup"] == group for t in scaled.spec.triggers)
    assert scaled.spec.max_replica_count <= int(by_kind("ConfigMap")["data"]["INGEST_PARTITIONS"])


def test_prometheus_rule_carries_exactly_the_rules_file():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "ingest-rules.yml").read_text())
    assert by_kind("PrometheusRule")["spec"]["groups"] == rules["groups"]
    monitor = by_kind("ServiceMonitor")["spec"]
    assert monitor["endpoints"][0]["path"] == "/metrics"


def test_workers_run_as_non_root_with_limits_probes_and_their_own_volume():
    spec = by_kind("StatefulSet")["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert mounts["data"] == by_kind("ConfigMap")["data"]["INGEST_DATA_DIR"]
    assert int(by_kind("ConfigMap")["data"]["INGEST_TABLE_STANDBY_REPLICAS"]) >= 1
    headless = [d for _, d in documents() if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [spec["serviceName"]]


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


def _compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30,
                          check=False).returncode == 0


@pytest.mark.skipif(not _compose_available(), reason="no docker compose on this machine")
def test_docker_compose_config_accepts_the_file():
    done = subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
