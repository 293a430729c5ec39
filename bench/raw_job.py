"""(a'') ingest_stream's job hand-written, no framework: aiokafka consume → orjson → fastjsonschema →
SHA-256 dedupe in a rocksdict store → revision-guarded writes to Postgres and Typesense, both sinks
at once, and the partition's offset committed only after both wrote the batch. One task per
partition, each with its own Postgres connection; the consume loop hands it the partition's batches.
Prints one JSON line. Launched by bench/run.py with the stack's INGEST_* variables in its env.

The straightforward pipeline a competent engineer would write for the same job with the same
guarantees, to compare ingest_stream with (written for the bench, not ingest_stream's code):
- dedupe: SHA-256 of the record's canonical JSON (sorted keys, as stage (a)); a digest is stored
  after both sinks wrote its batch, so a crash before the commit redelivers a batch whose writes
  are already in (the revision guard skips them), never one whose digests hide unwritten records;
- a batch keeps the newest revision of each entity (records are keyed `tenant:id`: one partition,
  one task, per entity);
- Postgres: the rows COPYed into a temp table, then one `INSERT … SELECT … ON CONFLICT DO UPDATE
  … WHERE excluded.revision > ingest_records.revision`, in one transaction;
- Typesense: the batch's current revisions read with `filter_by: id:[…]`, up to 250 ids per search,
  all searches in one `multi_search`; only newer documents imported, one JSONL upsert per batch.
Rows and documents have the shape ingest_stream writes (ingest_stream/sinks/postgres.py and
typesense.py), into its table and collection, which must exist (the bench opens ingest_stream's
sinks first: their migrations). Tombstones (`deleted: true`) are out of scope: the bench produces
none, and one fails the stage. A sink error fails the stage too (no retries). `verify`, called by
the bench after the stage and not timed, checks each sink holds every entity at its newest revision
(`read_back` and `discrepancies`, also used by the outage stage of bench/run.py, read the graph too).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import fastjsonschema
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from rocksdict import Options, Rdict, WriteBatch

from bench.common import machine_busy_seconds, proc_figures
from ingest_stream.config import Settings

SINKS = ("postgres", "typesense")  # the sinks this job writes; the graph is not one of them
TABLE = COLLECTION = "ingest_records"
IDS_PER_SEARCH = 250  # Typesense's largest per_page
TEXT_LIMIT = 32_768  # characters of searchable text per document, as ingest_stream
QUEUED_BATCHES = 2  # per partition; beyond that the consume loop waits for the partition's task

COLUMNS = ("tenant", "id", "kind", "revision", "event_time", "source", "priority", "attributes", "links",
           "deleted", "origin_tp", "origin_offset")
_STAGING = """
CREATE TEMP TABLE incoming (
    tenant text, id text, kind text, revision bigint, event_time timestamptz, source text,
    priority text, attributes jsonb, links jsonb, deleted boolean, origin_tp text, origin_offset bigint
) ON COMMIT DELETE ROWS
"""
_GUARDED_INSERT = f"""
INSERT INTO {TABLE} ({", ".join(COLUMNS)}, updated_at)
SELECT {", ".join(COLUMNS)}, now() FROM incoming
ON CONFLICT (tenant, id) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in (*COLUMNS[2:], "updated_at"))}
WHERE excluded.revision > {TABLE}.revision
"""


class Job:
    def __init__(self, consumer: AIOKafkaConsumer, sinks: list[str], settings: Settings, seen: Rdict,
                 expected: int) -> None:
        self.consumer, self.sinks, self.seen, self.expected = consumer, sinks, seen, expected
        self.validate = fastjsonschema.compile(
            orjson.loads((settings.schema_dir / "input.schema.json").read_bytes()))
        self.dsn = settings.postgres.dsn
        self.typesense = httpx.AsyncClient(base_url=settings.typesense.url, timeout=30, headers={
            "X-TYPESENSE-API-KEY": settings.typesense.api_key, "Content-Type": "application/json"})
        self.committed = self.rejected = self.duplicates = 0
        self.done = asyncio.Event()
        self.started = self.cpu_started = self.machine_started = 0.0
        self.workers: list[asyncio.Task[None]] = []

    async def consume(self, tasks: asyncio.TaskGroup) -> None:
        """Fetch, and hand each partition's records to its own task (started on its first batch)."""
        queues: dict[TopicPartition, asyncio.Queue[list[ConsumerRecord[bytes, bytes]]]] = {}
        while not self.done.is_set():
            batches = await self.consumer.getmany(timeout_ms=1000, max_records=2000)
            if batches and not self.started:
                self.started, self.cpu_started = time.monotonic(), time.process_time()
                self.machine_started = machine_busy_seconds()
            for tp, records in batches.items():
                if tp not in queues:
                    queues[tp] = asyncio.Queue(QUEUED_BATCHES)
                    self.workers.append(tasks.create_task(self.partition(tp, queues[tp])))
                await queues[tp].put(records)

    async def partition(self, tp: TopicPartition,
                        queue: asyncio.Queue[list[ConsumerRecord[bytes, bytes]]]) -> None:
        """One partition's batches in order, on the task's own Postgres connection."""
        conn = None
        if "postgres" in self.sinks:
            conn = await asyncpg.connect(self.dsn)
            await conn.execute(_STAGING)
        try:
            while True:
                await self.handle(tp, await queue.get(), conn)
        finally:
            if conn is not None:
                await conn.close()

    async def handle(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]],
                     conn: asyncpg.Connection | None) -> None:
        fresh: list[tuple[bytes, dict[str, Any], int]] = []
        for record in records:
            try:
                document = orjson.loads(record.value)
                self.validate(document)
            except (orjson.JSONDecodeError, fastjsonschema.JsonSchemaValueException):
                self.rejected += 1  # a real job would dead-letter it; the bench sends none
                continue
            digest = hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).digest()
            fresh.append((digest, document, record.offset))
        known = self.seen.get([digest for digest, _, _ in fresh]) if fresh else []
        digests: dict[bytes, int] = {}
        newest: dict[tuple[str, str], tuple[dict[str, Any], int]] = {}
        for (digest, document, offset), held in zip(fresh, known, strict=True):
            if held is not None or digest in digests:
                self.duplicates += 1
                continue
            digests[digest] = offset
            if document.get("deleted"):
                raise RuntimeError(f"{tp.topic}:{tp.partition}@{offset}: a tombstone, out of scope")
            entity = (document["tenant"], document["id"])
            if entity not in newest or document["revision"] > newest[entity][0]["revision"]:
                newest[entity] = (document, offset)
        if newest:
            origin_tp = f"{tp.topic}:{tp.partition}"
            writes = []
            if conn is not None:
                writes.append(write_postgres(conn, [row(d, origin_tp, o) for d, o in newest.values()]))
            if "typesense" in self.sinks:
                writes.append(write_typesense(self.typesense,
                                              [search_document(d, origin_tp, o) for d, o in newest.values()]))
            await asyncio.gather(*writes)
        if digests:
            batch = WriteBatch(raw_mode=True)
            for digest, offset in digests.items():
                batch.put(digest, f"{tp.partition}:{offset}".encode())
            self.seen.write(batch)
        await self.consumer.commit({tp: records[-1].offset + 1})
        self.committed += len(records)
        if self.committed >= self.expected:
            self.done.set()


def row(document: dict[str, Any], origin_tp: str, offset: int) -> tuple[Any, ...]:
    return (document["tenant"], document["id"], document["kind"], document["revision"],
            datetime.fromisoformat(document["event_time"]), document["source"],
            document.get("priority", "normal"), orjson.dumps(document["attributes"]).decode(),
            orjson.dumps(document.get("links", [])).decode(), False, origin_tp, offset)


async def write_postgres(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    async with conn.transaction():
        await conn.copy_records_to_table("incoming", records=rows, columns=COLUMNS)
        await conn.execute(_GUARDED_INSERT)


def search_document(document: dict[str, Any], origin_tp: str, offset: int) -> dict[str, Any]:
    return {"id": f"{document['tenant']}:{quote(document['id'], safe='._-')}",
            "tenant": document["tenant"], "record_id": document["id"], "kind": document["kind"],
            "source": document["source"], "revision": document["revision"],
            "event_time": int(datetime.fromisoformat(document["event_time"]).timestamp() * 1000),
            "text": " ".join(strings(document["attributes"]))[:TEXT_LIMIT],
            "origin_tp": origin_tp, "origin_offset": offset}


def strings(value: Any) -> Iterable[str]:
    """The strings and numbers inside a JSON value, in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield str(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


async def write_typesense(http: httpx.AsyncClient, documents: list[dict[str, Any]]) -> None:
    """Upsert the documents newer than the collection's: one multi_search, one import."""
    chunks = (documents[i:i + IDS_PER_SEARCH] for i in range(0, len(documents), IDS_PER_SEARCH))
    searches = [{"collection": COLLECTION, "q": "*", "per_page": len(chunk), "include_fields": "id,revision",
                 "filter_by": "id:[" + ",".join(f"`{d['id']}`" for d in chunk) + "]"} for chunk in chunks]
    response = await http.post("/multi_search", content=orjson.dumps({"searches": searches}))
    response.raise_for_status()
    current: dict[str, int] = {}
    for result in orjson.loads(response.content)["results"]:
        if "error" in result:
            raise RuntimeError(f"typesense search: {result['error']}")
        for hit in result["hits"]:
            current[hit["document"]["id"]] = hit["document"]["revision"]
    newer = [d for d in documents if d["revision"] > current.get(d["id"], -1)]
    if not newer:
        return
    response = await http.post(f"/collections/{COLLECTION}/documents/import", params={"action": "upsert"},
                               content=b"\n".join(orjson.dumps(d) for d in newer),
                               headers={"Content-Type": "text/plain"})
    response.raise_for_status()
    results = [orjson.loads(line) for line in response.content.splitlines()]
    refused = [r for r in results if not r.get("success")]
    if len(results) != len(newer) or refused:
        raise RuntimeError(f"typesense import: {len(newer)} sent, {len(results)} answered, "
                           f"{len(refused)} refused, first: {refused[:1]}")


async def run(bootstrap: str, source: str, expected: int, sinks: list[str], data_dir: Path
              ) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=f"bench-rawjob-{source}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_poll_records=2000)
    seen = Rdict(str(data_dir), Options(raw_mode=True))
    job = Job(consumer, sinks, Settings.from_env(), seen, expected)
    await consumer.start()
    try:
        async with asyncio.TaskGroup() as tasks:  # a task that fails stops the others and the stage
            loop = tasks.create_task(job.consume(tasks))
            await job.done.wait()
            elapsed = time.monotonic() - job.started
            cpu = time.process_time() - job.cpu_started
            machine = machine_busy_seconds() - job.machine_started
            for task in (loop, *job.workers):
                task.cancel()
    finally:
        await job.typesense.aclose()
        await consumer.stop()
        seen.close()
    return {"records": expected, "seconds": elapsed, "cpu_seconds": cpu, "machine_busy_seconds": machine,
            "peak_rss_mib": proc_figures(os.getpid())["peak_rss_mib"], "sinks": sinks,
            "rejected": job.rejected, "duplicates": job.duplicates}


def newest_revisions(values: Iterable[bytes]) -> dict[tuple[str, str], int]:
    """What the sinks must hold after the stage: each entity of `values` at its newest revision."""
    newest: dict[tuple[str, str], int] = {}
    for value in values:
        document = orjson.loads(value)
        entity = (document["tenant"], document["id"])
        newest[entity] = max(newest.get(entity, -1), document["revision"])
    return newest


async def read_back(settings: Settings, sinks: list[str], tenants: list[str]
                    ) -> dict[str, dict[tuple[str, str], int]]:
    """What each of `sinks` holds for `tenants`: the revision of every entity, read back."""
    held: dict[str, dict[tuple[str, str], int]] = {}
    if "postgres" in sinks:
        conn = await asyncpg.connect(settings.postgres.dsn)
        try:
            rows = await conn.fetch(
                f"SELECT tenant, id, revision FROM {TABLE} WHERE tenant = ANY($1::text[])", tenants)
        finally:
            await conn.close()
        held["postgres"] = {(r["tenant"], r["id"]): r["revision"] for r in rows}
    if "typesense" in sinks:
        async with httpx.AsyncClient(base_url=settings.typesense.url, timeout=120,
                                     headers={"X-TYPESENSE-API-KEY": settings.typesense.api_key}) as http:
            response = await http.get(f"/collections/{COLLECTION}/documents/export", params={
                "filter_by": "tenant:=[" + ",".join(f"`{t}`" for t in tenants) + "]"})
            response.raise_for_status()
        documents = [orjson.loads(line) for line in response.content.splitlines() if line.strip()]
        held["typesense"] = {(d["tenant"], d["record_id"]): d["revision"] for d in documents}
    if "neo4j" in sinks:
        # Through ingest_stream's own sink (its driver settings); not closed, as the worker does not
        # close it on the FalkorDB stand-in (a closed driver leaves that server refusing new ones).
        from ingest_stream.sinks import neo4j  # its driver only where the graph is read

        graph = neo4j.from_settings(settings)
        await graph.open()
        result = await graph.driver.execute_query(
            "MATCH (n:Record) WHERE n.tenant IN $tenants AND n.revision IS NOT NULL "
            "RETURN n.tenant AS tenant, n.id AS id, n.revision AS revision", tenants=tenants)
        held["neo4j"] = {(r["tenant"], r["id"]): r["revision"] for r in result.records}
    return held


def discrepancies(expected: dict[tuple[str, str], int], found: dict[tuple[str, str], int]
                  ) -> dict[str, int]:
    """One sink's read-back against `expected`: entities missing, not at their newest revision, and
    found but not expected."""
    return {"entities": len(expected), "found": len(found),
            "missing": len(expected.keys() - found.keys()),
            "stale": sum(1 for entity, revision in found.items()
                         if entity in expected and expected[entity] != revision),
            "extra": len(found.keys() - expected.keys())}


async def verify(settings: Settings, sinks: list[str], expected: dict[tuple[str, str], int],
                 stage: str = "(a'')") -> dict[str, int]:
    """Each sink's entities of `expected`'s tenants, read back; raises unless every one is there at
    its newest revision and nothing else. Returns the entities found per sink."""
    held = await read_back(settings, sinks, sorted({tenant for tenant, _ in expected}))
    problems = []
    for sink, found in held.items():
        d = discrepancies(expected, found)
        if d["missing"] or d["stale"] or d["extra"]:
            problems.append(f"{sink}: {d['missing']} of {len(expected)} entities missing, {d['stale']} not "
                            f"at their newest revision, {d['extra']} not in the stage's records")
    if problems:
        raise RuntimeError(f"stage {stage} did not write every record: " + "; ".join(problems))
    return {sink: len(found) for sink, found in held.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--sinks", default=",".join(SINKS), help=f"comma-separated, of {', '.join(SINKS)}")
    parser.add_argument("--data-dir", type=Path, required=True, help="the dedupe store (rocksdict)")
    args = parser.parse_args()
    sinks = list(dict.fromkeys(s for s in args.sinks.split(",") if s))
    if unknown := set(sinks) - set(SINKS):
        parser.error(f"unknown sink(s) {', '.join(sorted(unknown))}; this job writes {', '.join(SINKS)}")
    result = asyncio.run(run(args.bootstrap, args.source, args.records, sinks, args.data_dir))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
