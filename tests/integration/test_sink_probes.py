"""Each real sink's probe write (GuardedSink's proof that a sink takes writes, when a lone record
keeps failing): it writes, it is idempotent, and it leaves the records alone."""

from __future__ import annotations

import asyncpg
import pytest
import typesense
from neo4j import AsyncGraphDatabase

from ingest_stream.config import Settings
from ingest_stream.ops.devstack import DevStack
from ingest_stream.sinks.registry import build_sink


async def probes_held(stack: DevStack, sink: str) -> int:
    """How many probe rows / nodes / documents the server holds, read with the plain drivers."""
    if sink == "postgres":
        connection = await asyncpg.connect(stack.postgres_dsn)
        try:
            return int(await connection.fetchval("SELECT count(*) FROM ingest_sink_probe"))
        finally:
            await connection.close()
    if sink == "neo4j":
        driver = AsyncGraphDatabase.driver(stack.neo4j_uri, auth=("falkordb", ""))
        result = await driver.execute_query("MATCH (p:IngestSinkProbe) RETURN count(p) AS n")
        return int(result.records[0]["n"])
    client = typesense.Client({"nodes": [{"host": "127.0.0.1", "port": stack.typesense_port,
                                          "protocol": "http"}],
                               "api_key": stack.typesense_api_key, "connection_timeout_seconds": 10})
    return int(client.collections["ingest_sink_probe"].retrieve()["num_documents"])


@pytest.mark.parametrize("name", ["postgres", "neo4j", "typesense"])
async def test_the_probe_write_writes_once_however_often_it_runs(stack: DevStack, name: str) -> None:
    sink = build_sink(name, Settings.from_env(stack.settings_env()))
    await sink.open()
    try:
        await sink.probe_write()
        await sink.probe_write()
        assert await probes_held(stack, name) == 1
    finally:
        await sink.close()
