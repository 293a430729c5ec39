"""Neo4j sink: `:Record` nodes keyed by (tenant, id) and `[:LINK {rel}]` edges, via the neo4j driver.

A write replaces the node's properties and its outgoing links, guarded by revision in the Cypher
itself. Attributes stay in Postgres and Typesense; the graph holds identity, revision and edges.
A batch is sent in chunks of at most `INGEST_NEO4J_BATCH_SIZE` rows and, when set,
`INGEST_NEO4J_MAX_REQUEST_BYTES`. With `INGEST_NEO4J_CONCURRENCY` 1 (the default) all chunks share one
transaction; above 1 each chunk is its own transaction, sent concurrently (for a server that answers
each request slowly; the FalkorDB stand-in cannot take concurrent writes, docs/development.md). Each
chunk is revision-guarded and idempotent, so a batch half-written by a crash is completed on redelivery.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import neo4j
import orjson
from neo4j import AsyncGraphDatabase
from neo4j import exceptions as neo4j_errors

from ingest_stream.config import Neo4jFlavor, Settings
from ingest_stream.core.reasons import Reason
from ingest_stream.core.record import entity_key, split_entity_key
from ingest_stream.core.revision import Version
from ingest_stream.core.timefmt import epoch_ms
from ingest_stream.errors import SinkError
from ingest_stream.sinks.base import Write, translated_errors
from ingest_stream.sinks.errors import Rule, classifier

log = logging.getLogger(__name__)
NAME = "neo4j"
ERROR_RULES: Sequence[Rule] = (
    ((TimeoutError, neo4j_errors.TransientError), Reason.SINK_TIMEOUT),
    ((neo4j_errors.ConstraintError, neo4j_errors.CypherTypeError, OverflowError),
     Reason.CONSTRAINT_VIOLATION),
    ((neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired, OSError), Reason.CONNECTION_ERROR),
    # The FalkorDB stand-in answers every error as a generic database error.
    ((neo4j_errors.Neo4jError, neo4j_errors.DriverError), Reason.CONNECTION_ERROR),
)
classify = classifier(NAME, ERROR_RULES)


def from_settings(settings: Settings) -> Neo4jSink:
    return Neo4jSink(settings.neo4j.uri, user=settings.neo4j.user, password=settings.neo4j.password,
                     batch_size=settings.neo4j.batch_size, flavor=settings.neo4j.flavor,
                     timeout_s=settings.sink.timeout_s, max_request_bytes=settings.neo4j.max_request_bytes,
                     concurrency=settings.neo4j.concurrency)

_UPSERT = """
UNWIND $rows AS r
MERGE (n:Record {tenant: r.tenant, id: r.id})
WITH n, r
WHERE n.revision IS NULL OR n.revision < r.revision OR (r.rewrite AND n.revision = r.revision)
SET n.kind = r.kind, n.revision = r.revision, n.deleted = r.deleted, n.source = r.source,
    n.event_time_ms = r.event_time_ms, n.origin_tp = r.origin_tp, n.origin_offset = r.origin_offset
WITH n, r
OPTIONAL MATCH (n)-[old:LINK]->()
DELETE old
WITH DISTINCT n, r
UNWIND r.links AS link
MERGE (m:Record {tenant: r.tenant, id: link.to})
MERGE (n)-[:LINK {rel: link.rel}]->(m)
"""
_CURRENT = """
UNWIND $keys AS k
MATCH (n:Record {tenant: k.tenant, id: k.id})
WHERE n.revision IS NOT NULL
RETURN n.tenant AS tenant, n.id AS id, n.revision AS revision, n.origin_tp AS origin_tp,
       n.origin_offset AS origin_offset
"""
_SCHEMA = {
    # Neo4j 5: uniqueness of the identity, which also indexes it.
    Neo4jFlavor.NEO4J: ["CREATE CONSTRAINT record_identity IF NOT EXISTS "
              "FOR (n:Record) REQUIRE (n.tenant, n.id) IS UNIQUE"],
    # The FalkorDB stand-in has no constraints and no IF NOT EXISTS; a plain index works once.
    Neo4jFlavor.FALKORDB: ["CREATE INDEX FOR (n:Record) ON (n.tenant, n.id)"],
}


_PROBE = "MERGE (p:IngestSinkProbe {name: 'ingest-stream'}) SET p.probed_at = timestamp()"


class Neo4jSink:
    name = NAME
    parallel_batches = 1  # links MERGE shared nodes: concurrent batches could deadlock each other

    def __init__(
        self, uri: str, *, user: str, password: str, batch_size: int, flavor: Neo4jFlavor | str,
        timeout_s: float, max_request_bytes: int = 0, concurrency: int = 1,
    ) -> None:
        self._uri = uri
        self._auth = (user, password)
        self._batch_size = max(1, batch_size)
        self._flavor = Neo4jFlavor(flavor)
        self._max_request_bytes = max_request_bytes
        self._concurrency = max(1, concurrency)
        self._timeout_s = timeout_s
        self._driver: neo4j.AsyncDriver | None = None

    async def open(self) -> None:
        self._driver = AsyncGraphDatabase.driver(
            self._uri, auth=self._auth, connection_timeout=self._timeout_s,
            max_transaction_retry_time=0,  # retries are ours (backoff + circuit), not the driver's
        )
        with translated_errors(classify, NAME):
            for statement in _SCHEMA[self._flavor]:
                try:
                    await self._driver.execute_query(statement)
                except neo4j_errors.Neo4jError as exc:
                    if self._flavor is not Neo4jFlavor.FALKORDB:
                        raise
                    log.debug("neo4j: schema statement skipped (already there?): %s", exc)

    async def close(self) -> None:
        # FalkorDB stops answering *new* connections after a driver's close(); exiting without it
        # is harmless there (the server sees the sockets drop), so the stand-in is never closed.
        if self._driver is not None and self._flavor is not Neo4jFlavor.FALKORDB:
            await self._driver.close()
        self._driver = None

    @property
    def driver(self) -> neo4j.AsyncDriver:
        if self._driver is None:
            raise SinkError(self.name, Reason.CONNECTION_ERROR, "not open")
        return self._driver

    async def probe_write(self) -> None:
        with translated_errors(classify, NAME):
            await self.driver.execute_query(_PROBE)

    async def current_revisions(self, keys: Sequence[str]) -> dict[str, Version]:
        found: dict[str, Version] = {}
        with translated_errors(classify, NAME):
            for start in range(0, len(keys), self._batch_size):
                chunk = [dict(zip(("tenant", "id"), split_entity_key(k), strict=True))
                         for k in keys[start:start + self._batch_size]]
                result = await self.driver.execute_query(
                    _CURRENT, keys=chunk, routing_=neo4j.RoutingControl.READ)
                found.update({
                    entity_key(r["tenant"], r["id"]):
                        Version(r["revision"], r["origin_tp"], r["origin_offset"])
                    for r in result.records
                })
        return found

    async def write(self, writes: Sequence[Write]) -> None:
        budget = self._max_request_bytes - len(_UPSERT) - 64 if self._max_request_bytes else 0
        chunks = chunk_rows([_row(w) for w in writes], max_rows=self._batch_size, max_bytes=budget)

        async def apply(tx: neo4j.AsyncManagedTransaction) -> None:
            for chunk in chunks:
                result = await tx.run(_UPSERT, rows=chunk)
                await result.consume()

        with translated_errors(classify, NAME):
            if self._concurrency == 1:
                async with self.driver.session() as session:
                    await session.execute_write(apply)
                return
            limit = asyncio.Semaphore(self._concurrency)

            async def send(chunk: list[dict[str, Any]]) -> None:
                async with limit:
                    await self.driver.execute_query(_UPSERT, rows=chunk)

            await asyncio.gather(*(send(chunk) for chunk in chunks))


def chunk_rows(
    rows: Sequence[dict[str, Any]], *, max_rows: int, max_bytes: int = 0
) -> list[list[dict[str, Any]]]:
    """Consecutive chunks of at most `max_rows` rows and (when > 0) about `max_bytes` of parameters.

    A single row larger than `max_bytes` travels alone.
    """
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        row_size = len(orjson.dumps(row)) if max_bytes else 0
        if current and (len(current) >= max_rows or (max_bytes and size + row_size > max_bytes)):
            chunks.append(current)
            current, size = [], 0
        current.append(row)
        size += row_size
    if current:
        chunks.append(current)
    return chunks


def _row(write: Write) -> dict[str, Any]:
    r = write.record
    return {
        "tenant": r["tenant"], "id": r["id"], "kind": r["kind"], "revision": r["revision"],
        "deleted": r["deleted"], "source": r["source"], "event_time_ms": epoch_ms(r["event_time"]),
        "rewrite": write.may_rewrite_equal, "origin_tp": write.origin_tp,
        "origin_offset": write.origin_offset,
        "links": [{"rel": link["rel"], "to": link["to"]} for link in r["links"]],
    }
