"""`python -m bench.pg_write_costs [--rows N] [--batch B] [--repeat R] [--dsn DSN]`: the CPU per row
of the Postgres sink's batch write, the way it is written now (`copy`: in a transaction, binary COPY
into the connection's ON COMMIT DELETE ROWS scratch table, then the guarded `INSERT … SELECT`)
against the way it was (`unnest`: one array per column, `unnest`ed in one guarded `INSERT`) and the
alternative not taken (`copy+truncate`: no BEGIN/COMMIT, the scratch table emptied by a TRUNCATE in
the upsert's message), on the same pool against a real server: the embedded stack's (started here)
unless a DSN is given. Each run writes N new rows (inserts), then the same entities at the next
revision (updates), in batches of B. Prints, per form and run: client CPU (`time.process_time`,
around the write calls only) µs per row, wall ms per batch, and the server backend's CPU µs per row
(from /proc, 10 ms ticks). For issue 20's per-record cost work."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from bench.common import proc_figures
from ingest_stream.core.record import with_defaults
from ingest_stream.core.timefmt import format_rfc3339, parse_rfc3339
from ingest_stream.ops.devstack import DevStack
from ingest_stream.sinks.base import Write
from ingest_stream.sinks.postgres import PostgresSink

# The write before COPY, kept here as the reference it is measured against.
UNNEST_UPSERT = """
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
WHERE ingest_records.revision < EXCLUDED.revision
"""


# The alternative not taken: COPY and upsert in two implicit transactions, one round trip fewer.
TRUNCATED_TABLE = "bench_batch_truncated"
CREATE_TRUNCATED_TABLE = f"""
CREATE TEMP TABLE IF NOT EXISTS {TRUNCATED_TABLE} (
    tenant text, id text, kind text, revision bigint, event_time timestamptz, source text,
    priority text, attributes jsonb, links jsonb, deleted boolean, origin_tp text, origin_offset bigint)
"""
TRUNCATED_UPSERT = f"""
INSERT INTO ingest_records
    (tenant, id, kind, revision, event_time, source, priority, attributes, links, deleted,
     origin_tp, origin_offset, updated_at)
SELECT tenant, id, kind, revision, event_time, source, priority, attributes, links, deleted,
       origin_tp, origin_offset, now()
FROM pg_temp.{TRUNCATED_TABLE}
ON CONFLICT (tenant, id) DO UPDATE SET
    kind = EXCLUDED.kind, revision = EXCLUDED.revision, event_time = EXCLUDED.event_time,
    source = EXCLUDED.source, priority = EXCLUDED.priority, attributes = EXCLUDED.attributes,
    links = EXCLUDED.links, deleted = EXCLUDED.deleted, origin_tp = EXCLUDED.origin_tp,
    origin_offset = EXCLUDED.origin_offset, updated_at = EXCLUDED.updated_at
WHERE ingest_records.revision < EXCLUDED.revision;
TRUNCATE pg_temp.{TRUNCATED_TABLE}
"""


def unnest_columns(writes: Sequence[Write]) -> list[list[object]]:
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


def copy_rows(writes: Sequence[Write]) -> list[tuple[object, ...]]:
    return [(r["tenant"], r["id"], r["kind"], r["revision"], parse_rfc3339(r["event_time"]), r["source"],
             r["priority"], orjson.dumps(r["attributes"]).decode(), orjson.dumps(r["links"]).decode(),
             r["deleted"], w.origin_tp, w.origin_offset) for w in writes for r in (w.record,)]


def batches(tenant: str, rows: int, size: int, revision: int) -> list[list[Write]]:
    """`rows` entities of one revision, shaped like `ops.produce.synthetic_records` (~320 bytes)."""
    start = datetime.now(UTC) - timedelta(seconds=rows)
    writes = [Write(with_defaults({
        "schema_version": 2, "tenant": f"{tenant}-{n % 3}", "source": "kafka", "id": f"doc-{n}",
        "revision": revision, "event_time": format_rfc3339(start + timedelta(seconds=n)),
        "priority": ("high", "normal", "normal", "low")[n % 4], "kind": "document",
        "attributes": {"title": f"document {n} rev {revision}", "body": "lorem ipsum " * (1 + n % 8)},
        "links": [{"rel": "CITES", "to": f"doc-{(n * 7) % rows}"}],
    }), origin_tp="bench.in:0", origin_offset=n) for n in range(rows)]
    return [writes[i:i + size] for i in range(0, rows, size)]


async def measure(sink: PostgresSink, form: str, rows: int, size: int) -> dict[str, float]:
    write: Callable[[list[Write]], Awaitable[object]]
    if form == "unnest":
        async def write(batch: list[Write]) -> object:
            return await sink.pool.execute(UNNEST_UPSERT, *unnest_columns(batch))
    elif form == "copy+truncate":
        await sink.pool.execute(CREATE_TRUNCATED_TABLE)

        async def write(batch: list[Write]) -> object:
            async with sink.pool.acquire() as conn:
                await conn.copy_records_to_table(TRUNCATED_TABLE, schema_name="pg_temp",
                                                 records=copy_rows(batch))
                return await conn.execute(TRUNCATED_UPSERT)
    else:
        write = sink.write
    backend = await sink.pool.fetchval("SELECT pg_backend_pid()")  # the one connection used
    tenant = f"bench-{form}-{uuid.uuid4().hex[:6]}"
    await write(batches(f"{tenant}-warm", size, size, 1)[0])  # statement preparation, scratch table
    figures: dict[str, float] = {}
    for phase, revision in (("insert", 1), ("update", 2)):
        work = batches(tenant, rows, size, revision)
        cpu = wall = 0.0
        server = proc_figures(backend)["cpu_seconds"]
        for batch in work:
            # In the worker the validator has parsed each event time just before (a cache hit here).
            for w in batch:
                parse_rfc3339(w.record["event_time"])
            cpu, wall = cpu - time.process_time(), wall - time.perf_counter()
            await write(batch)
            cpu, wall = cpu + time.process_time(), wall + time.perf_counter()
        figures[f"{phase} client µs/row"] = cpu / rows * 1e6
        figures[f"{phase} wall ms/batch"] = wall / len(work) * 1e3
        figures[f"{phase} server µs/row"] = (proc_figures(backend)["cpu_seconds"] - server) / rows * 1e6
    return figures


async def run(dsn: str, rows: int, size: int, repeat: int) -> None:
    sink = PostgresSink(dsn, timeout_s=60)
    await sink.open()  # one pool connection, used one batch at a time: the backend measured is it
    try:
        results: dict[str, list[dict[str, float]]] = {"unnest": [], "copy": [], "copy+truncate": []}
        for _ in range(repeat):
            for form in results:  # interleaved, so drift on a shared machine hits all three
                results[form].append(await measure(sink, form, rows, size))
                print(form, {k: round(v, 2) for k, v in results[form][-1].items()}, file=sys.stderr)
    finally:
        await sink.close()
    print(f"{rows} rows in batches of {size}, median of {repeat} runs:")
    for form, runs in results.items():
        print(f"  {form:13}", "  ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_write_costs")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dsn", help="an existing server (its ingest_records is written to)")
    args = parser.parse_args()
    if args.dsn:
        asyncio.run(run(args.dsn, args.rows, args.batch, args.repeat))
        return 0
    root = Path(tempfile.mkdtemp(prefix="pg-write-costs-"))
    try:
        with DevStack(root) as stack:
            asyncio.run(run(stack.postgres_dsn, args.rows, args.batch, args.repeat))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
