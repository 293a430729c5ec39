"""PostgreSQL sink: `ingest_records`, the batch COPYed into a scratch table, then one revision-guarded
`INSERT … SELECT … ON CONFLICT` from it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import resources

import asyncpg
import orjson

from ingest_stream.config import Settings
from ingest_stream.core.reasons import Reason
from ingest_stream.core.record import entity_key, split_entity_key
from ingest_stream.core.revision import Version
from ingest_stream.core.timefmt import parse_rfc3339
from ingest_stream.errors import SinkError
from ingest_stream.sinks.base import Write, translated_errors
from ingest_stream.sinks.errors import Rule, classifier

log = logging.getLogger(__name__)
NAME = "postgres"
POOL_SIZE = 4  # connections: batches written at once (`parallel_batches`)
ERROR_RULES: Sequence[Rule] = (
    ((TimeoutError, asyncpg.QueryCanceledError), Reason.SINK_TIMEOUT),
    ((asyncpg.TooManyConnectionsError,), Reason.RATE_LIMITED),
    ((asyncpg.IntegrityConstraintViolationError, asyncpg.DataError, OverflowError),
     Reason.CONSTRAINT_VIOLATION),
    # InternalClientError: the protocol state broke mid-operation, seen when the server shut
    # down during a query; asyncpg terminates that connection ("most likely an IO error").
    ((OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError),
     Reason.CONNECTION_ERROR),
)
classify = classifier(NAME, ERROR_RULES)


def from_settings(settings: Settings) -> PostgresSink:
    return PostgresSink(settings.postgres.dsn, timeout_s=settings.sink.timeout_s)

MIGRATIONS_LOCK_ID = 0x1A6E57  # pg_advisory lock held while migrating: workers start together

# The connection's own scratch table (TEMP: per session, so per pooled connection). Binary COPY into
# it costs the client ~1.7 µs (~38 %) less CPU per row than one array per column `unnest`ed, and the
# server ~1.5 µs more (`python -m bench.pg_write_costs`). ON COMMIT DELETE ROWS empties it in place at
# COMMIT; emptied by a TRUNCATE in the upsert's message instead (no BEGIN: one round trip fewer), it
# cost the server another 0.5–1.5 µs per row (a new file and a pg_class row per batch).
_BATCH_TABLE = "ingest_batch"
_BEGIN_BATCH = f"""
BEGIN;
CREATE TEMP TABLE IF NOT EXISTS {_BATCH_TABLE} (
    rewrite boolean NOT NULL,
    tenant text, id text, kind text, revision bigint, event_time timestamptz, source text,
    priority text, attributes jsonb, links jsonb, deleted boolean, origin_tp text, origin_offset bigint
) ON COMMIT DELETE ROWS
"""
_BATCH_COLUMNS = ("rewrite", "tenant", "id", "kind", "revision", "event_time", "source", "priority",
                  "attributes", "links", "deleted", "origin_tp", "origin_offset")
_RECORD_COLUMNS = ", ".join(_BATCH_COLUMNS[1:])
_UPSERT = f"""
INSERT INTO ingest_records ({_RECORD_COLUMNS}, updated_at)
SELECT {_RECORD_COLUMNS}, now() FROM pg_temp.{_BATCH_TABLE} WHERE {{rewrites}}
ON CONFLICT (tenant, id) DO UPDATE SET
    kind = EXCLUDED.kind, revision = EXCLUDED.revision, event_time = EXCLUDED.event_time,
    source = EXCLUDED.source, priority = EXCLUDED.priority, attributes = EXCLUDED.attributes,
    links = EXCLUDED.links, deleted = EXCLUDED.deleted, origin_tp = EXCLUDED.origin_tp,
    origin_offset = EXCLUDED.origin_offset, updated_at = EXCLUDED.updated_at
WHERE ingest_records.revision {{guard}} EXCLUDED.revision;
"""
_GUARDS = (("<", "NOT rewrite", False), ("<=", "rewrite", True))  # guard, its rows, their `rewrite`
_CURRENT = """
SELECT r.tenant, r.id, r.revision, r.origin_tp, r.origin_offset FROM ingest_records r
JOIN unnest($1::text[], $2::text[]) AS k(tenant, id) ON r.tenant = k.tenant AND r.id = k.id
"""


_PROBE = """
INSERT INTO ingest_sink_probe (name) VALUES ('ingest-stream')
ON CONFLICT (name) DO UPDATE SET probed_at = now()
"""


class PostgresSink:
    name = NAME
    parallel_batches = POOL_SIZE  # a row per entity: transactions of disjoint entities never wait

    def __init__(self, dsn: str, *, timeout_s: float) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        with translated_errors(classify, NAME):
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=POOL_SIZE, command_timeout=self._timeout_s,
                reset=_nothing_to_reset,
            )
            async with self._pool.acquire() as conn:
                await migrate(conn)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise SinkError(self.name, Reason.CONNECTION_ERROR, "not open")
        return self._pool

    async def probe_write(self) -> None:
        with translated_errors(classify, NAME):
            await self.pool.execute(_PROBE)

    async def current_revisions(self, keys: Sequence[str]) -> dict[str, Version]:
        tenants, ids = zip(*(split_entity_key(k) for k in keys), strict=True) if keys else ((), ())
        with translated_errors(classify, NAME):
            rows = await self.pool.fetch(_CURRENT, list(tenants), list(ids))
        return {
            entity_key(row["tenant"], row["id"]):
                Version(row["revision"], row["origin_tp"], row["origin_offset"])
            for row in rows
        }

    async def write(self, writes: Sequence[Write]) -> None:
        """One transaction in three round trips: BEGIN (and the scratch table, on a connection's
        first batch); the batch COPYed into it; the guarded upsert from it (a second one, `<=`, when
        reprocessed records are beside the `<` ones) with the COMMIT, in one message."""
        if not writes:
            return
        rows = _rows(writes)
        flags = {row[0] for row in rows}  # the `rewrite` flags present
        upserts = "".join(_UPSERT.format(rewrites=rewrites, guard=guard)
                          for guard, rewrites, rewrite in _GUARDS if rewrite in flags)
        with translated_errors(classify, NAME):
            async with self.pool.acquire() as conn:
                try:
                    await conn.execute(_BEGIN_BATCH)
                    await _copy(conn, rows)
                    await conn.execute(upserts + "COMMIT")
                except BaseException:  # cancelled too (the caller's timeout)
                    await _roll_back(conn)
                    raise


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """The pool's reset on release. asyncpg's default sends `SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL` after every use: a round trip per query here, for session
    state this sink never sets (its only lock is transaction-scoped; its scratch table, which none
    of that drops, is meant to stay). An open transaction is still rolled back by the pool first."""


async def _copy(conn: asyncpg.pool.PoolConnectionProxy, rows: list[tuple[object, ...]]) -> None:
    """A value the driver cannot encode fails the COPY with a raw TypeError or ValueError where a
    query argument fails with DataError: made a DataError, so the record is refused, not a bug."""
    try:
        await conn.copy_records_to_table(_BATCH_TABLE, schema_name="pg_temp", records=rows,
                                         columns=_BATCH_COLUMNS)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            raise
        raise asyncpg.DataError(f"invalid input for the batch's COPY: {exc}") from exc


async def _roll_back(conn: asyncpg.pool.PoolConnectionProxy) -> None:
    """End a failed or cancelled batch's transaction before the connection goes back to the pool,
    which would roll it back too but log that as an error. After a cancellation this first waits
    for asyncpg's cancel request, so a statement stuck on a lock never commits later. The batch's
    own error is the one raised: a connection that breaks meanwhile is dropped."""
    try:
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute("ROLLBACK")
    except Exception:
        conn.terminate()


def _rows(writes: Sequence[Write]) -> list[tuple[object, ...]]:
    """One row of the scratch table per write, in `_BATCH_COLUMNS` order."""
    rows: list[tuple[object, ...]] = []
    for w in writes:
        r = w.record
        rows.append((bool(w.may_rewrite_equal), r["tenant"], r["id"], r["kind"], r["revision"],
                     parse_rfc3339(r["event_time"]), r["source"], r["priority"],
                     orjson.dumps(r["attributes"]).decode(), orjson.dumps(r["links"]).decode(),
                     r["deleted"], w.origin_tp, w.origin_offset))
    return rows


async def migrate(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> list[str]:
    """Apply the project's SQL migrations in name order, each once, under an advisory lock."""
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATIONS_LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS ingest_schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["name"] for row in await conn.fetch("SELECT name FROM ingest_schema_migrations")}
        folder = resources.files("ingest_stream.sinks") / "migrations"
        for item in sorted(folder.iterdir(), key=lambda p: p.name):
            if not item.name.endswith(".sql") or item.name in done:
                continue
            await conn.execute(item.read_text())
            await conn.execute("INSERT INTO ingest_schema_migrations (name) VALUES ($1)", item.name)
            applied.append(item.name)
            log.info("postgres: applied migration %s", item.name)
    return applied
