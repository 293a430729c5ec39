"""`ingest-stream reconcile`: do the sinks hold the same entities, at the same revisions?

Per tenant: live and deleted entities in each sink (aggregate queries: one GROUP BY in Postgres,
one in the graph, facet counts in Typesense) and open dead letters by reason; then an id diff in
windows of `PAGE` ids: Postgres and the graph are read by keyset pagination (`id > after ORDER BY
id`, code point order on both sides), Typesense is looked up by document id for the ids of each
window (it cannot sort by a string field the schema did not declare sortable), and its documents
that neither other sink holds are found by streaming its export. The merge itself is
`core/reconcile.py`. Memory: a window of pages and the samples, never a whole table.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO
from urllib.parse import unquote

import asyncpg
import httpx
import neo4j
import orjson
from aiokafka.errors import KafkaError
from neo4j import AsyncGraphDatabase

from ingest_stream.config import Neo4jFlavor, Settings
from ingest_stream.core.reconcile import DEFAULT_SAMPLE, Diff, Entry, typesense_entry, window_end
from ingest_stream.core.triage import Selection
from ingest_stream.ops.dead_letters import DeadLetterStore
from ingest_stream.ops.kafka_io import ToolError
from ingest_stream.ops.output import format_table, printable, run_command, write_json
from ingest_stream.sinks.typesense import COLLECTION, TOMBSTONES, document_id

PROG = "ingest-stream reconcile"
PAGE = 1000
_IDS_PER_FILTER = 100  # as the sink: per Typesense search (its per_page cap is 250)
_SEARCHES_PER_REQUEST = 50  # the server's default `limit_multi_searches`

_PG_COUNTS = """
SELECT tenant, count(*) FILTER (WHERE NOT deleted) AS live, count(*) FILTER (WHERE deleted) AS deleted
FROM ingest_records WHERE ($1::text IS NULL OR tenant = $1) GROUP BY tenant
"""
_PG_PAGE = """
SELECT id, revision, deleted FROM ingest_records
WHERE tenant = $1 AND id COLLATE "C" > $2 ORDER BY id COLLATE "C" LIMIT $3
"""
_PG_HAVE = "SELECT id FROM ingest_records WHERE tenant = $1 AND id = ANY($2::text[])"
_PG_ENTRIES = "SELECT id, revision, deleted FROM ingest_records WHERE tenant = $1 AND id = ANY($2::text[])"
# Nodes without a revision are link targets not ingested (yet): not entities of the graph sink.
_GRAPH_COUNTS = """
MATCH (n:Record) WHERE n.revision IS NOT NULL AND ($tenant IS NULL OR n.tenant = $tenant)
RETURN n.tenant AS tenant, n.deleted AS deleted, count(n) AS entities
"""
_GRAPH_PAGE = """
MATCH (n:Record) WHERE n.tenant = $tenant AND n.revision IS NOT NULL AND n.id > $after
RETURN n.id AS id, n.revision AS revision, n.deleted AS deleted ORDER BY n.id LIMIT $limit
"""
_GRAPH_ENTRIES = """
UNWIND $ids AS i MATCH (n:Record {tenant: $tenant, id: i}) WHERE n.revision IS NOT NULL
RETURN n.id AS id, n.revision AS revision, n.deleted AS deleted
"""
_GRAPH_HAVE = """
UNWIND $ids AS i MATCH (n:Record {tenant: $tenant, id: i}) WHERE n.revision IS NOT NULL RETURN n.id AS id
"""

ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, neo4j.exceptions.Neo4jError,
    neo4j.exceptions.DriverError, httpx.HTTPError, KafkaError, ToolError, OSError, TimeoutError)


class Readers:
    """One connection to each configured sink, read-only."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sinks = list(settings.sinks)
        self._pg: asyncpg.Connection | None = None
        self._graph: neo4j.AsyncDriver | None = None
        self._http: httpx.AsyncClient | None = None

    async def open(self) -> None:
        s = self.settings
        if "postgres" in self.sinks:
            self._pg = await asyncpg.connect(s.postgres.dsn, timeout=s.sink.timeout_s,
                                             command_timeout=max(s.sink.timeout_s, 60.0))
        if "neo4j" in self.sinks:
            self._graph = AsyncGraphDatabase.driver(s.neo4j.uri, auth=(s.neo4j.user, s.neo4j.password),
                                                    connection_timeout=s.sink.timeout_s)
        if "typesense" in self.sinks:
            self._http = httpx.AsyncClient(base_url=s.typesense.url.rstrip("/"),
                                           timeout=max(s.sink.timeout_s, 60.0),
                                           headers={"X-TYPESENSE-API-KEY": s.typesense.api_key})

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
        # FalkorDB stops answering new connections after a driver's close() (sinks/neo4j.py)
        if self._graph is not None and self.settings.neo4j.flavor is not Neo4jFlavor.FALKORDB:
            await self._graph.close()
        if self._http is not None:
            await self._http.aclose()

    @property
    def pg(self) -> asyncpg.Connection:
        assert self._pg is not None
        return self._pg

    @property
    def graph(self) -> neo4j.AsyncDriver:
        assert self._graph is not None
        return self._graph

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    async def _cypher(self, query: str, **params: Any) -> list[Any]:
        result = await self.graph.execute_query(query, params, routing_=neo4j.RoutingControl.READ)
        return list(result.records)

    async def _ts(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code == 404:  # collection not created yet: nothing held
            return None
        if response.status_code >= 400:
            raise ToolError(f"typesense: {method} {path}: HTTP {response.status_code} "
                            f"{response.text[:200]}")
        return response.json()

    # --- aggregates ---------------------------------------------------------------------------
    async def counts(self, tenant: str | None) -> dict[str, dict[str, dict[str, int]]]:
        """sink -> tenant -> {"live": n, "deleted": n}"""
        found: dict[str, dict[str, dict[str, int]]] = {}
        if "postgres" in self.sinks:
            rows = await self.pg.fetch(_PG_COUNTS, tenant)
            found["postgres"] = {r["tenant"]: {"live": r["live"], "deleted": r["deleted"]} for r in rows}
        if "neo4j" in self.sinks:
            graph: dict[str, dict[str, int]] = {}
            for r in await self._cypher(_GRAPH_COUNTS, tenant=tenant):
                held = graph.setdefault(r["tenant"], {"live": 0, "deleted": 0})
                held["deleted" if r["deleted"] else "live"] += int(r["entities"])
            found["neo4j"] = graph
        if "typesense" in self.sinks:
            search: dict[str, dict[str, int]] = {}
            for collection, kind in ((COLLECTION, "live"), (TOMBSTONES, "deleted")):
                for name, count in (await self._ts_tenant_counts(collection, tenant)).items():
                    search.setdefault(name, {"live": 0, "deleted": 0})[kind] = count
            found["typesense"] = search
        return found

    async def _ts_tenant_counts(self, collection: str, tenant: str | None) -> dict[str, int]:
        params: dict[str, Any] = {"q": "*", "per_page": 0, "facet_by": "tenant",
                                  "max_facet_values": 100_000}
        if tenant is not None:
            params["filter_by"] = f"tenant:=`{tenant}`"
        body = await self._ts("GET", f"/collections/{collection}/documents/search", params=params)
        if body is None:
            return {}
        if tenant is not None:
            return {tenant: int(body["found"])} if body["found"] else {}
        counts = body.get("facet_counts") or [{}]
        return {c["value"]: int(c["count"]) for c in counts[0].get("counts", [])}

    # --- pages ----------------------------------------------------------------------------------
    async def pg_page(self, tenant: str, after: str, limit: int) -> list[Entry]:
        rows = await self.pg.fetch(_PG_PAGE, tenant, after, limit)
        return [Entry(r["id"], int(r["revision"]), bool(r["deleted"])) for r in rows]

    async def graph_page(self, tenant: str, after: str, limit: int) -> list[Entry]:
        rows = await self._cypher(_GRAPH_PAGE, tenant=tenant, after=after, limit=limit)
        return [Entry(r["id"], int(r["revision"]), bool(r["deleted"])) for r in rows]

    async def entries(self, tenant: str, ids: Sequence[str]) -> dict[str, dict[str, Entry]]:
        """sink -> id -> what it holds, for these ids of one tenant."""
        held: dict[str, dict[str, Entry]] = {}
        if "postgres" in self.sinks:
            rows = await self.pg.fetch(_PG_ENTRIES, tenant, list(ids))
            held["postgres"] = {r["id"]: Entry(r["id"], int(r["revision"]), bool(r["deleted"])) for r in rows}
        if "neo4j" in self.sinks:
            rows = await self._cypher(_GRAPH_ENTRIES, tenant=tenant, ids=list(ids))
            held["neo4j"] = {r["id"]: Entry(r["id"], int(r["revision"]), bool(r["deleted"])) for r in rows}
        if "typesense" in self.sinks:
            held["typesense"] = await self.typesense_lookup(tenant, ids)
        return held

    async def typesense_lookup(self, tenant: str, ids: Sequence[str]) -> dict[str, Entry]:
        """What Typesense holds for these ids of one tenant (the higher of document and tombstone)."""
        by_doc = {document_id(f"{tenant}:{i}"): i for i in ids}
        doc_ids = list(by_doc)
        searches = []
        for start in range(0, len(doc_ids), _IDS_PER_FILTER):
            chunk = doc_ids[start:start + _IDS_PER_FILTER]
            id_filter = "id:[" + ",".join(f"`{d}`" for d in chunk) + "]"
            searches += [{"collection": name, "q": "*", "filter_by": id_filter, "per_page": len(chunk),
                          "include_fields": "id,revision"} for name in (COLLECTION, TOMBSTONES)]
        live: dict[str, Entry] = {}
        dead: dict[str, Entry] = {}
        for start in range(0, len(searches), _SEARCHES_PER_REQUEST):
            body = await self._ts("POST", "/multi_search",
                                  json={"searches": searches[start:start + _SEARCHES_PER_REQUEST]})
            for search, result in zip(searches[start:], (body or {}).get("results", []), strict=False):
                if "error" in result:
                    if result.get("code") == 404:
                        continue
                    raise ToolError(f"typesense: {result['error']}")
                tombstone = search["collection"] == TOMBSTONES
                for hit in result.get("hits", []):
                    record_id = by_doc[hit["document"]["id"]]
                    (dead if tombstone else live)[record_id] = Entry(
                        record_id, int(hit["document"]["revision"]), tombstone)
        held = {}
        for record_id in ids:
            entry = typesense_entry(live.get(record_id), dead.get(record_id))
            if entry is not None:
                held[record_id] = entry
        return held

    async def typesense_export(self, collection: str, tenant: str) -> AsyncIterator[list[str]]:
        """The record ids of a tenant's documents in a collection, in chunks of PAGE (unsorted)."""
        params = {"filter_by": f"tenant:=`{tenant}`", "include_fields": "id"}
        prefix = f"{document_id(tenant + ':')}"
        async with self.http.stream("GET", f"/collections/{collection}/documents/export",
                                    params=params) as response:
            if response.status_code == 404:
                return
            if response.status_code >= 400:
                await response.aread()
                raise ToolError(f"typesense: export {collection}: HTTP {response.status_code} "
                                f"{response.text[:200]}")
            chunk: list[str] = []
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                doc_id: str = orjson.loads(line)["id"]
                chunk.append(unquote(doc_id.removeprefix(prefix)))
                if len(chunk) >= PAGE:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

    async def pg_have(self, tenant: str, ids: Sequence[str]) -> set[str]:
        return {r["id"] for r in await self.pg.fetch(_PG_HAVE, tenant, list(ids))}

    async def graph_have(self, tenant: str, ids: Sequence[str]) -> set[str]:
        return {r["id"] for r in await self._cypher(_GRAPH_HAVE, tenant=tenant, ids=list(ids))}


class Progress:
    """A line on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._on = out.isatty()

    def show(self, text: str) -> None:
        if self._on:
            self._out.write(f"\r\x1b[K{printable(text)}")
            self._out.flush()

    def done(self) -> None:
        if self._on:
            self._out.write("\r\x1b[K")
            self._out.flush()


async def diff_tenant(readers: Readers, tenant: str, *, page: int = PAGE, limit: int = DEFAULT_SAMPLE,
                      progress: Progress | None = None) -> Diff:
    sinks = readers.sinks
    result = Diff(sinks=sinks, limit=limit)
    after = ""
    while True:
        pages: dict[str, list[Entry]] = {}
        if "postgres" in sinks:
            pages["postgres"] = await readers.pg_page(tenant, after, page)
        if "neo4j" in sinks:
            pages["neo4j"] = await readers.graph_page(tenant, after, page)
        end = window_end(list(pages.values()), page)
        if end is not None:  # the window is complete up to `end`; later ids come in the next one
            pages = {name: [e for e in entries if e.id <= end] for name, entries in pages.items()}
        if "typesense" in sinks:
            ids = sorted({e.id for entries in pages.values() for e in entries})
            held = await readers.typesense_lookup(tenant, ids) if ids else {}
            pages["typesense"] = [held[i] for i in ids if i in held]
        result.feed(pages)
        if progress is not None:
            progress.show(f"reconcile {tenant}: {result.compared} id(s) compared")
        if end is None:
            break
        after = end
    if "typesense" in sinks:
        await _typesense_only(readers, tenant, result)
    return result


async def recheck(readers: Readers, tenant: str, first: Diff, *, page: int = PAGE) -> Diff:
    """`first` after its mismatched ids were read again from every sink (Diff.settled)."""
    again = Diff(sinks=readers.sinks, limit=first.limit)
    suspects = sorted(first.suspects)
    for start in range(0, len(suspects), page):
        ids = suspects[start:start + page]
        held = await readers.entries(tenant, ids)
        for entity_id in ids:
            again.observe(entity_id, {sink: held[sink].get(entity_id) for sink in readers.sinks})
    return first.settled(again)


async def _typesense_only(readers: Readers, tenant: str, result: Diff) -> None:
    """Documents (or tombstones) Typesense holds for ids no other sink holds: the window merge
    above looked Typesense up only for the ids the other sinks have."""
    others = [s for s in readers.sinks if s != "typesense"]
    for collection in (COLLECTION, TOMBSTONES):
        async for chunk in readers.typesense_export(collection, tenant):
            known: set[str] = set()
            if "postgres" in others:
                known |= await readers.pg_have(tenant, chunk)
            if "neo4j" in others:
                known |= await readers.graph_have(tenant, chunk)
            unknown = [i for i in chunk if i not in known]
            if not unknown:
                continue
            held = await readers.typesense_lookup(tenant, unknown)
            for record_id in sorted(unknown):
                entry = held.get(record_id)
                if entry is None:
                    continue
                if collection == TOMBSTONES and not entry.deleted:
                    continue  # also a live document: counted with the live collection
                result.observe(record_id, {"typesense": entry, **{s: None for s in others}})


async def open_dead_letters(settings: Settings, tenant: str | None) -> dict[str, Counter[str]]:
    """tenant -> reason -> open dead letters ("" for a letter without a tenant)."""
    store = DeadLetterStore(settings)
    found: dict[str, Counter[str]] = {}
    async for letter, _status in store.selected(Selection(tenant=tenant)):
        found.setdefault(letter.envelope.tenant or "", Counter())[letter.envelope.reason.value] += 1
    return found


async def reconcile(settings: Settings, *, tenant: str | None, limit: int = DEFAULT_SAMPLE,
                    page: int = PAGE, settle_s: float = 0.0, progress: Progress | None = None
                    ) -> dict[str, Any]:
    """Per tenant: counts, open dead letters and the id diff. With `settle_s`, the ids that
    disagree are read again that long after (once for every tenant): a record on its way through
    the sinks is in one before the others, so only what still disagrees is a mismatch."""
    readers = Readers(settings)
    try:
        await readers.open()
        counts = await readers.counts(tenant)
        letters = await open_dead_letters(settings, tenant)
        tenants = sorted({t for by_tenant in counts.values() for t in by_tenant} | set(letters)
                         if tenant is None else {tenant})
        diffs = {name: await diff_tenant(readers, name, page=page, limit=limit, progress=progress)
                 if name else Diff(sinks=readers.sinks, limit=limit) for name in tenants}
        if settle_s > 0 and any(diff.mismatches for diff in diffs.values()):
            if progress is not None:
                progress.show(f"reconcile: reading the mismatched ids again in {settle_s:g}s")
            await asyncio.sleep(settle_s)
            diffs = {name: await recheck(readers, name, diff, page=page) if diff.mismatches else diff
                     for name, diff in diffs.items()}
        report: list[dict[str, Any]] = []
        for name, diff in diffs.items():
            report.append({
                "tenant": name,
                "sinks": {s: counts.get(s, {}).get(name, {"live": 0, "deleted": 0}) for s in readers.sinks},
                "dead_letters": dict(sorted(letters.get(name, Counter()).items())),
                **diff.as_dict(),
            })
    finally:
        if progress is not None:
            progress.done()
        await readers.close()
    return {"sinks": readers.sinks, "settle_s": settle_s, "tenants": report,
            "mismatches": sum(t["mismatches"] for t in report)}


def print_report(document: dict[str, Any], out: TextIO) -> None:
    sinks = document["sinks"]
    rows = [(t["tenant"] or "(none)", *(f"{t['sinks'][s]['live']}/{t['sinks'][s]['deleted']}" for s in sinks),
             sum(t["dead_letters"].values()), t["compared"], t["mismatches"]) for t in document["tenants"]]
    print(format_table(("TENANT", *(f"{s.upper()} LIVE/DEL" for s in sinks), "OPEN DLQ", "IDS",
                        "MISMATCHES"), rows), file=out)
    for t in document["tenants"]:
        name = printable(t["tenant"] or "(none)")
        if t["dead_letters"]:
            reasons = ", ".join(f"{reason} {n}" for reason, n in t["dead_letters"].items())
            print(f"{name}: open dead letters: {reasons}", file=out)
        problems = [(f"missing in {s}", m) for s, m in t["missing"].items()] + [
            ("revision differs", t["revision_differs"]), ("deleted differs", t["deleted_differs"])]
        for what, mismatch in problems:
            if mismatch["count"]:
                more = " ..." if mismatch["count"] > len(mismatch["sample"]) else ""
                ids = ", ".join(printable(i) for i in mismatch["sample"])
                print(f"{name}: {what}: {mismatch['count']} id(s): {ids}{more}", file=out)
        if t["in_flight"]:
            print(f"{name}: {t['in_flight']} difference(s) were gone when read again "
                  f"{document['settle_s']:g}s later (records on their way through the sinks)", file=out)
    total = document["mismatches"]
    print(f"{len(document['tenants'])} tenant(s); "
          + ("all sinks agree" if total == 0 else f"{total} mismatch(es)"), file=out)


def run_reconcile(*, tenant: str | None, as_json: bool, settle_s: float, limit: int = DEFAULT_SAMPLE) -> int:
    async def main() -> int:
        settings = Settings.from_env()
        document = await reconcile(settings, tenant=tenant, limit=limit, settle_s=settle_s,
                                   progress=Progress(sys.stderr))
        if as_json:
            write_json(document, sys.stdout)
        else:
            print_report(document, sys.stdout)
        return 1 if document["mismatches"] else 0

    return run_command(PROG, main, errors=ERRORS, interrupted="nothing was changed")
