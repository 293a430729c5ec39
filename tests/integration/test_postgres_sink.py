"""The Postgres sink against the real server: what it sends per batch, and the guard it writes with.

A sink batch waits on every round trip behind the other agents' work in the one event loop, so the
number of round trips per batch is a latency figure, held here: one read, and a write of three (one
transaction: BEGIN, the batch COPYed into a scratch table, the guarded upsert from it with COMMIT).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import asyncpg
import pytest

from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.reasons import Reason
from ingest_stream.core.record import with_defaults
from ingest_stream.errors import SinkError
from ingest_stream.metrics import Metrics
from ingest_stream.ops.devstack import DevStack
from ingest_stream.sinks import postgres
from ingest_stream.sinks.base import Write
from ingest_stream.sinks.guarded import GuardedSink
from ingest_stream.sinks.postgres import PostgresSink
from tests.dataset import v2
from tests.integration.harness import SinkReader


def _write(tenant: str, record_id: str, revision: int, *, rewrite: bool = False, **overrides: Any) -> Write:
    return Write(with_defaults(v2(tenant, record_id, revision, **overrides)), may_rewrite_equal=rewrite,
                 origin_tp="t:0", origin_offset=revision)


async def _apply(sink: PostgresSink, writes: list[Write]) -> None:
    """What GuardedSink does per batch: read the held revisions, then write."""
    await sink.current_revisions([w.key for w in writes])
    await sink.write(writes)


def test_a_batch_is_one_read_and_a_write_of_three_round_trips_and_the_guard_holds(
        stack: DevStack, sinks: SinkReader, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    async def log_queries(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(lambda logged: sent.append(logged.query.split()[0].rstrip(";").upper()))

    copy_records_to_table = asyncpg.Connection.copy_records_to_table

    async def log_copy(connection: asyncpg.Connection, *args: Any, **kwargs: Any) -> str:
        """asyncpg's query log does not show a COPY: logged here, once done (as the log does)."""
        status: str = await copy_records_to_table(connection, *args, **kwargs)
        sent.append("COPY")
        return status

    monkeypatch.setattr(asyncpg, "create_pool", functools.partial(asyncpg.create_pool, init=log_queries))
    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", log_copy)
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
            # a redriven record rewrites its equal revision beside a normal newer one: a second
            # upsert, in the same message
            await _apply(sink, [_write(tenant, "a", 3), _write(tenant, "b", 1, rewrite=True)])
            mixed = list(sent)
        finally:
            await sink.close()
        return {"usual": usual, "older": older, "mixed": mixed}

    seen = asyncio.run(scenario())
    # the upserts and COMMIT are one message (logged by its first word); no reset query on release
    assert seen["usual"] == ["SELECT", "BEGIN", "COPY", "INSERT"]
    assert seen["older"] == ["SELECT", "BEGIN", "COPY", "INSERT"]
    assert seen["mixed"] == ["SELECT", "BEGIN", "COPY", "INSERT"]
    assert {record_id: row["revision"] for (_, record_id), row in sinks.postgres([tenant]).items()} == {
        "a": 3, "b": 1}


def test_records_postgres_refuses_fail_alone_and_the_rest_of_their_batch_lands(
        stack: DevStack, sinks: SinkReader, prefix: str) -> None:
    """Each refusal comes at another step of the write: a NUL in text, refused by the server during
    the COPY; a lone surrogate, which the driver cannot encode, during the COPY on our side; a
    negative revision, refused by the table's CHECK in the upsert, after the COPY."""
    tenant = f"{prefix}-refused"
    good = [_write(tenant, f"good-{i}", 1) for i in range(6)]
    refused = [_write(tenant, "nul", 1, kind="doc\x00ument"),
               _write(tenant, "surrogate", 1, source="ka\ud800fka"),
               _write(tenant, "negative", -1)]
    batch = [good[0], refused[0], good[1], good[2], refused[1], good[3], refused[2], good[4], good[5]]

    async def no_wait(_: float) -> None:
        """Backoff delays (none expected: a refusal is split at once) are not waited out."""

    async def scenario() -> tuple[list[Write], list[tuple[Write, SinkError]]]:
        sink = PostgresSink(stack.postgres_dsn, timeout_s=10)
        guarded = GuardedSink(sink, metrics=Metrics(), backoff=BackoffPolicy(), failure_policy="dlq",
                              timeout_s=10, sleep=no_wait)
        try:
            outcome = await guarded.apply(batch)
        finally:
            await sink.close()
        return outcome.applied, [(write, error) for write, error, _ in outcome.failed]

    applied, failed = asyncio.run(scenario())
    assert applied == [w for w in batch if w in good]
    assert [write for write, _ in failed] == [w for w in batch if w in refused]
    assert {(error.reason, error.unexpected) for _, error in failed} == {(Reason.CONSTRAINT_VIOLATION, None)}
    assert {record_id for _, record_id in sinks.postgres([tenant])} == {f"good-{i}" for i in range(6)}


def test_a_batch_refused_after_its_copy_leaves_nothing_behind(
        stack: DevStack, sinks: SinkReader, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """The upsert refused after the COPY: the sink rolls its transaction back itself (the pool would
    too, logging an error), and the connection goes back idle with its scratch table empty."""
    tenant = f"{prefix}-left"

    async def scenario() -> tuple[bool, int]:
        sink = PostgresSink(stack.postgres_dsn, timeout_s=10)  # one connection: all runs on it
        await sink.open()
        try:
            await sink.write([_write(tenant, "first", 1)])  # the connection's scratch table is made
            with pytest.raises(SinkError) as refused:
                await sink.write([_write(tenant, "left", 1), _write(tenant, "negative", -1)])
            assert refused.value.reason is Reason.CONSTRAINT_VIOLATION
            async with sink.pool.acquire() as conn:
                in_transaction = conn.is_in_transaction()
                left = await conn.fetchval(f"SELECT count(*) FROM pg_temp.{postgres._BATCH_TABLE}")
            await sink.write([_write(tenant, "next", 1)])
        finally:
            await sink.close()
        return in_transaction, left

    with caplog.at_level("ERROR", logger="asyncio"):
        assert asyncio.run(scenario()) == (False, 0)
    assert not caplog.records
    assert set(sinks.postgres([tenant])) == {(tenant, "first"), (tenant, "next")}


def test_a_write_cancelled_while_its_upsert_waits_on_a_lock_never_commits(
        stack: DevStack, sinks: SinkReader, prefix: str) -> None:
    """The upsert and its COMMIT are one message, already with the server: a write the caller's
    timeout cancels must have its statement cancelled and its transaction rolled back, or it
    would commit once the lock it waits on is released."""
    tenant = f"{prefix}-locked"

    async def scenario() -> None:
        sink = PostgresSink(stack.postgres_dsn, timeout_s=10)
        holder = await asyncpg.connect(stack.postgres_dsn)
        await sink.open()
        try:
            await sink.write([_write(tenant, "a", 1)])
            locked = holder.transaction()
            await locked.start()
            await holder.execute("SELECT 1 FROM ingest_records WHERE tenant = $1 FOR UPDATE", tenant)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):  # the lock is held: the write cannot finish
                    await sink.write([_write(tenant, "a", 2)])
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            assert waiting == 0  # nothing left waiting to commit once the lock goes
            await locked.rollback()
            await sink.write([_write(tenant, "b", 1)])  # the connection is usable
        finally:
            await sink.close()
            await holder.close()

    asyncio.run(scenario())
    assert {record_id: row["revision"] for (_, record_id), row in sinks.postgres([tenant]).items()} == {
        "a": 1, "b": 1}
