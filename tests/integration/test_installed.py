"""What users install: the wheel built from this checkout, installed into a fresh virtualenv
outside it, runs a worker from an empty folder with only the settings the image sets, against the
real servers: a good record lands in all three sinks (Postgres through the wheel's own migrations,
in a database of its own), a bad one in the DLQ. This is the test that catches package data missing
from the wheel (the migrations were, once: no row was ever written in the image)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from ingest_stream.ops.devstack import DevStack, free_port
from tests.dataset import v2
from tests.integration.harness import (
    PROJECT_ROOT,
    Kafka,
    SinkReader,
    WorkerProcess,
    assert_equal,
    eventually,
    headers_of,
)
from tests.integration.pipeline_helpers import source_topics


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, installed with no dependencies into a new virtualenv that sees this one's
    dependencies (a .pth line) but not the checkout: returns the new virtualenv's bin/."""
    root = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root),
                    str(PROJECT_ROOT)], check=True, timeout=600, cwd=root)
    [wheel] = root.glob("ingest_stream-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("ingest_stream/schemas/input.schema.json", "ingest_stream/schemas/input.v1.schema.json",
                 "ingest_stream/sinks/migrations/0001_ingest_records.sql", "ingest_stream/py.typed",
                 "ingest_stream/stream/operator.html"):
        assert data in names, f"{data} is not in {wheel.name}"
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=600)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print("
                                "sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


@pytest.fixture
def own_database(stack: DevStack, prefix: str) -> Iterator[str]:
    """A database of its own: the wheel's migrations create the table, not the suite's."""
    async def run(sql: str) -> None:
        connection = await asyncpg.connect(stack.postgres_dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run(f'CREATE DATABASE "{prefix}"'))
    yield stack.postgres_dsn.rsplit("/", 1)[0] + f"/{prefix}"
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{prefix}" WITH (FORCE)'))


def test_the_installed_wheel_runs_a_worker_that_writes_every_sink_and_the_dlq(
        installed: Path, own_database: str, stack: DevStack, kafka: Kafka, sinks: SinkReader,
        prefix: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = "import ingest_stream; print(ingest_stream.__file__)"
    where = subprocess.run([str(installed / "python"), "-c", code], cwd=empty, check=True,
                           capture_output=True, text=True).stdout
    assert str(installed.parent) in where and str(PROJECT_ROOT) not in where, where
    tenant = f"{prefix}-acme"
    kafka.create_topics(source_topics(prefix))
    env = {**stack.settings_env(), "INGEST_APP_ID": f"it-{prefix}", "INGEST_TOPIC_PREFIX": prefix,
           "INGEST_POSTGRES_DSN": own_database, "INGEST_WEB_HOST": "127.0.0.1",
           # what the image sets (Dockerfile), with its paths in this test's folder
           "INGEST_DATA_DIR": str(tmp_path / "data"), "INGEST_WEB_PORT": str(free_port()),
           "PYTHONUNBUFFERED": "1"}
    worker = WorkerProcess(env, tmp_path / "installed-worker.log",
                           argv=[str(installed / "ingest-stream"), "worker"], cwd=empty)
    try:
        worker.start()
        good, bad = v2(tenant, "doc-1", 3), {**v2(tenant, "doc-2", 1), "revision": "three"}
        kafka.produce(f"{prefix}.source.kafka", [(f"{tenant}:doc-1".encode(), json.dumps(good).encode()),
                                                 (f"{tenant}:doc-2".encode(), json.dumps(bad).encode())])

        def landed() -> None:
            assert_equal(postgres_revisions(own_database, tenant), {"doc-1": 3}, "postgres")
            assert_equal({k: v["revision"] for k, v in sinks.graph_nodes([tenant]).items()},
                         {(tenant, "doc-1"): 3}, "graph")
            assert_equal(sinks.search_documents([tenant]), {(tenant, "doc-1"): 3}, "search")
            letters = [headers_of(m) for m in kafka.read_all(f"{prefix}.dlq")]
            assert_equal([(h["dlq.record_id"], h["dlq.reason"]) for h in letters],
                         [("doc-2", "SCHEMA_DRIFT")], "dead letters")

        eventually(landed, timeout_s=120, context=worker.log_tail)
        status, page = worker.get("/")  # the operator page, from the wheel's package data
        assert status == 200 and b"/operator/state" in page, page[:200]
    finally:
        worker.stop()


def postgres_revisions(dsn: str, tenant: str) -> dict[str, int]:
    async def read() -> dict[str, int]:
        connection = await asyncpg.connect(dsn)
        try:
            rows = await connection.fetch("SELECT id, revision FROM ingest_records WHERE tenant = $1", tenant)
        except asyncpg.UndefinedTableError:
            return {}
        finally:
            await connection.close()
        return {row["id"]: row["revision"] for row in rows}

    return asyncio.run(read())
