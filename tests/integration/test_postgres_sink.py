"""The Postgres sink against the real server: what it sends per batch, and the guard it writes with.

A sink batch waits on every round trip behind the other agents' work in the one event loop, so the
number of statements per batch is a latency figure, held here: one read, one write.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import asyncpg
import pytest

from ingest_stream.core.record import with_defaults
from ingest_stream.ops.devstack import DevStack
from ingest_stream.sinks.base import Write
from ingest_stream.sinks.postgres import PostgresSink
from tests.dataset import v2
from tests.integration.harness import SinkReader


def _write(tenant: str, record_id: str, revision: int, *, rewrite: bool = False) -> Write:
    return Write(with_defaults(v2(tenant, record_id, revision)), may_rewrite_equal=rewrite,
                 origin_tp="t:0", origin_offset=revision)


async def _apply(sink: PostgresSink, writes: list[Write]) -> None:
    """What GuardedSink does per batch: read the held revisions, then write."""
    await sink.current_revisions([w.key for w in writes])
    await sink.write(writes)


def test_a_batch_is_one_read_and_one_write_statement_and_the_guard_holds(
        stack: DevStack, sinks: SinkReader, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    async def log_queries(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda logged: sent.append(logged.query.split()[0].rstrip(";").upper()))

    monkeypatch.setattr(asyncpg, "create_pool", functools.partial(asyncpg.create_pool, init=log_queries))
    tenant = f"{prefix}-pg"

    async def scenario() -> dict[str, Any]:
        sink = PostgresSink(stack.postgres_dsn, timeout_s=10)
        await sink.open()
        try:
            # asyncpg's first use of each statement introspects its types (once per connection)
            await _apply(sink, [_write(f"{tenant}-warm", "a", 1),
                                _write(f"{tenant}-warm", "b", 1, rewrite=True)])
            sent.clear()
            await _apply(sink, [_write(tenant, "a", 2), _write(tenant, "b", 1)])
            usual = list(sent)
            sent.clear()
            await _apply(sink, [_write(tenant, "a", 1)])  # older than held: the guard keeps 2
            older = list(sent)
            sent.clear()
            # a redriven record rewrites its equal revision beside a normal newer one: two
            # statements, one transaction
            await _apply(sink, [_write(tenant, "a", 3), _write(tenant, "b", 1, rewrite=True)])
            mixed = list(sent)
        finally:
            await sink.close()
        return {"usual": usual, "older": older, "mixed": mixed}

    seen = asyncio.run(scenario())
    assert seen["usual"] == ["SELECT", "INSERT"]  # no BEGIN/COMMIT, no reset query on release
    assert seen["older"] == ["SELECT", "INSERT"]
    assert seen["mixed"] == ["SELECT", "BEGIN", "INSERT", "INSERT", "COMMIT"]
    assert {record_id: row["revision"] for (_, record_id), row in sinks.postgres([tenant]).items()} == {
        "a": 3, "b": 1}
