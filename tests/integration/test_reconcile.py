"""Issue 18: `ingest-stream reconcile` on the real servers: a clean run agrees, a row deleted behind
the pipeline's back is found (exit 1, the id named)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import asyncpg

from ingest_stream.config import Settings
from ingest_stream.core.reconcile import Diff
from ingest_stream.ops.devstack import DevStack
from ingest_stream.ops.reconcile import Readers, diff_tenant, recheck
from ingest_stream.ops.reconcile import reconcile as run_reconcile
from tests.dataset import v2
from tests.integration.harness import PROJECT_ROOT, Kafka, SinkReader, WorkerProcess, eventually
from tests.integration.pipeline_helpers import source_topics

IDS = ["r0", "r1", "r2", "a b/ç%", "r3-gone"]  # one id Typesense must percent-escape


def reconcile(stack: DevStack, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.settings_env(), "INGEST_TOPIC_PREFIX": prefix}
    return subprocess.run([sys.executable, "-m", "ingest_stream.cli", "reconcile", *args],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)


def _assert_held(sinks: SinkReader, tenant: str) -> None:
    rows = sinks.postgres([tenant])
    assert len(rows) == len(IDS) and rows[(tenant, "r3-gone")]["deleted"], rows
    assert len(sinks.graph_nodes([tenant])) == len(IDS)
    assert len(sinks.search_documents([tenant])) == len(IDS) - 1


def test_reconcile_agrees_after_a_clean_run_and_names_a_row_deleted_behind_the_pipelines_back(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    tenant = f"{prefix}-rec"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker()
    worker.start()
    records = [v2(tenant, i, 1) for i in IDS]
    records.append(v2(tenant, "r3-gone", 2, deleted=True, attributes={}))
    kafka.produce(f"{prefix}.source.kafka",
                  [(f"{tenant}:{r['id']}".encode(), json.dumps(r).encode()) for r in records])
    eventually(lambda: _assert_held(sinks, tenant), timeout_s=60, context=worker.log_tail)

    clean = reconcile(stack, prefix, "--tenant", tenant, "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    report: dict[str, Any] = json.loads(clean.stdout)
    (row,) = report["tenants"]
    expected = {"live": len(IDS) - 1, "deleted": 1}
    assert row["sinks"] == {"postgres": expected, "neo4j": expected, "typesense": expected}, row
    assert row["compared"] == len(IDS) and row["mismatches"] == 0, row
    table = reconcile(stack, prefix, "--tenant", tenant)
    assert table.returncode == 0 and "all sinks agree" in table.stdout, table.stdout + table.stderr
    print(table.stdout)
    # Pages of 2 ids: several keyset windows across Postgres and the graph, the same answer.
    settings = Settings.from_env({**stack.settings_env(), "INGEST_TOPIC_PREFIX": prefix})
    paged = asyncio.run(run_reconcile(settings, tenant=tenant, page=2))
    assert paged["mismatches"] == 0 and paged["tenants"][0]["compared"] == len(IDS), paged

    async def delete_row() -> asyncpg.Record:
        conn = await asyncpg.connect(stack.postgres_dsn)
        try:
            return await conn.fetchrow("DELETE FROM ingest_records WHERE tenant = $1 AND id = $2 RETURNING *",
                                       tenant, "a b/ç%")
        finally:
            await conn.close()

    deleted = asyncio.run(delete_row())
    found = reconcile(stack, prefix, "--tenant", tenant, "--json", "--settle", "0.5")
    assert found.returncode == 1, found.stdout + found.stderr
    (row,) = json.loads(found.stdout)["tenants"]
    assert row["in_flight"] == 0, row  # read again half a second later: still missing
    assert row["missing"]["postgres"] == {"count": 1, "sample": ["a b/ç%"]}, row
    assert row["missing"]["neo4j"]["count"] == row["missing"]["typesense"]["count"] == 0, row
    assert row["mismatches"] == 1 and row["sinks"]["postgres"] == {"live": len(IDS) - 2, "deleted": 1}
    table = reconcile(stack, prefix, "--tenant", tenant)
    assert table.returncode == 1 and "missing in postgres: 1 id(s): a b/ç%" in table.stdout, table.stdout
    print(table.stdout)
    paged = asyncio.run(run_reconcile(settings, tenant=tenant, page=2, limit=1))
    assert paged["tenants"][0]["missing"]["postgres"] == {"count": 1, "sample": ["a b/ç%"]}, paged

    # A row that comes back before the second look (a record on its way through) is no mismatch.
    async def first_look_then_the_row_back() -> tuple[Diff, Diff]:
        readers = Readers(settings)
        await readers.open()
        try:
            first = await diff_tenant(readers, tenant)
            conn = await asyncpg.connect(stack.postgres_dsn)
            try:
                columns = list(deleted.keys())
                await conn.execute(
                    f"INSERT INTO ingest_records ({', '.join(columns)}) "
                    f"VALUES ({', '.join(f'${n}' for n in range(1, len(columns) + 1))})", *deleted.values())
            finally:
                await conn.close()
            return first, await recheck(readers, tenant, first)
        finally:
            await readers.close()

    first, settled = asyncio.run(first_look_then_the_row_back())
    assert (first.mismatches, first.suspects) == (1, ["a b/ç%"])
    assert (settled.mismatches, settled.in_flight, settled.compared) == (0, 1, len(IDS))
