"""PostgreSQL sink: `ingest_records`, one revision-guarded `INSERT … ON CONFLICT` per batch."""

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

_UPSERT = """
INSERT INTO ingest_records
    (tenant, id, kind, revision, event_time, source, priority, attributes, links, deleted,
     origin_tp, origin_offset, updated_at)
SELECT t, i, k, r, e, s, p, a::jsonb, l::jsonb, d, otp, ooff, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[], $6::text[],
            $7::text[], $8::text[], $9::text[], $10::bool[], $11::text[], $12::bigint[])
     AS u(t, i, k, r, e, s, p, a, l, d, otp, ooff)
ON CONFLICT (tenant, id) DO UPDATE SET
    kind = EXCLUDED.kind, revision = EXCLUDED.revision, event_time = EXCLUDED.event_time,
    source = EXCLUDED.source, priority = EXCLUDED.priority, attributes = EXCLUDED.attributes,
    links = EXCLUDED.links, deleted = EXCLUDED.deleted, origin_tp = EXCLUDED.origin_tp,
    origin_offset = EXCLUDED.origin_offset, updated_at = EXCLUDED.updated_at
WHERE ingest_records.revision {guard} EXCLUDED.revision
"""
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

    def __init__(self, dsn: str, *, timeout_s: float) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        with translated_errors(classify, NAME):
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=4, command_timeout=self._timeout_s,
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
        """One statement, atomic on its own, for the usual batch; a transaction (two more round
        trips) only when reprocessed records need the `<=` guard beside the `<` one."""
        normal = [w for w in writes if not w.may_rewrite_equal]
        rewrites = [w for w in writes if w.may_rewrite_equal]
        statements = [(_UPSERT.format(guard=guard), _columns(part))
                      for guard, part in (("<", normal), ("<=", rewrites)) if part]
        with translated_errors(classify, NAME):
            if len(statements) == 1:
                query, columns = statements[0]
                await self.pool.execute(query, *columns)
                return
            async with self.pool.acquire() as conn, conn.transaction():
                for query, columns in statements:
                    await conn.execute(query, *columns)


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """The pool's reset on release. asyncpg's default sends `SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL` after every use: a round trip per query here, for session
    state this sink never sets (its only lock is transaction-scoped). An open transaction is still
    rolled back by the pool before this is called."""


def _columns(writes: Sequence[Write]) -> list[list[object]]:
    records = [w.record for w in writes]
    return [
        [r["tenant"] for r in records],
        [r["id"] for r in records],
        [r["kind"] for r in records],
        [r["revision"] for r in records],
        [parse_rfc3339(r["event_time"]) for r in records],
        [r["source"] for r in records],
        [r["priority"] for r in records],
        [orjson.dumps(r["attributes"]).decode() for r in records],
        [orjson.dumps(r["links"]).decode() for r in records],
        [r["deleted"] for r in records],
        [w.origin_tp for w in writes],
        [w.origin_offset for w in writes],
    ]


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
