"""Typesense sink: collection `ingest_records`, document id `tenant:<escaped id>`.

Typesense has no compare-and-set, so the guard reads current revisions first and the wiring writes
only newer documents; that is safe because one partition, one writer, owns each entity. A tombstone
removes the document from search and leaves its revision in `ingest_records_tombstones`, so older
revisions stay rejected after a delete.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlparse

import httpx
import orjson
import typesense
from typesense import exceptions as ts_errors

from ingest_stream.config import Settings
from ingest_stream.core.backoff import parse_retry_after
from ingest_stream.core.reasons import Reason
from ingest_stream.core.revision import Version
from ingest_stream.core.timefmt import epoch_ms
from ingest_stream.errors import SinkError
from ingest_stream.sinks.base import Write, translated_errors
from ingest_stream.sinks.errors import Rule, classifier

log = logging.getLogger(__name__)
NAME = "typesense"
HTTP_TOO_MANY_REQUESTS = 429
ERROR_RULES: Sequence[Rule] = (
    ((ts_errors.Timeout, httpx.TimeoutException, TimeoutError), Reason.SINK_TIMEOUT),
    ((ts_errors.ObjectUnprocessable, ts_errors.RequestMalformed, OverflowError),
     Reason.CONSTRAINT_VIOLATION),
    ((ts_errors.TypesenseClientError, httpx.TransportError, OSError), Reason.CONNECTION_ERROR),
)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status the typesense client raised with (its first argument), if any."""
    if isinstance(exc, ts_errors.TypesenseClientError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def _rate_limited(exc: BaseException) -> Reason | None:
    """429 has no exception type of its own in the client: it raises the base type with the status."""
    return Reason.RATE_LIMITED if _http_status(exc) == HTTP_TOO_MANY_REQUESTS else None


classify = classifier(NAME, ERROR_RULES, refine=_rate_limited)


def from_settings(settings: Settings) -> TypesenseSink:
    return TypesenseSink(settings.typesense.url, api_key=settings.typesense.api_key,
                         timeout_s=settings.sink.timeout_s)

COLLECTION = "ingest_records"
TOMBSTONES = "ingest_records_tombstones"
PROBE = "ingest_sink_probe"  # one document, rewritten by probe_write
TEXT_LIMIT = 32_768
# Ids per search: Typesense's largest `per_page`, so one search returns every hit of its ids (an id
# is in a collection at most once). multi_search (POST) keeps the long id filters off the URL.
_IDS_PER_FILTER = 250
_SEARCHES_PER_REQUEST = 50  # the server's default `limit_multi_searches`

_SCHEMAS: dict[str, dict[str, Any]] = {
    COLLECTION: {
        "name": COLLECTION,
        "fields": [
            {"name": "tenant", "type": "string", "facet": True},
            {"name": "record_id", "type": "string"},
            {"name": "kind", "type": "string", "facet": True},
            {"name": "source", "type": "string", "facet": True},
            {"name": "revision", "type": "int64"},
            {"name": "event_time", "type": "int64"},
            {"name": "text", "type": "string"},
            {"name": "origin_tp", "type": "string", "optional": True, "index": False},
            {"name": "origin_offset", "type": "int64", "optional": True, "index": False},
        ],
        "default_sorting_field": "event_time",
    },
    TOMBSTONES: {
        "name": TOMBSTONES,
        "fields": [
            {"name": "tenant", "type": "string", "facet": True},
            {"name": "revision", "type": "int64"},
            {"name": "origin_tp", "type": "string", "optional": True, "index": False},
            {"name": "origin_offset", "type": "int64", "optional": True, "index": False},
        ],
    },
    PROBE: {"name": PROBE, "fields": [{"name": "probed_at", "type": "int64"}]},
}


_IMPORTED = '{"success":true}'  # an import's result line for a document it took
_UNQUOTED = re.compile(r"[A-Za-z0-9._~-]*\Z")  # quote()'s always-safe characters, and safe='._-'


def document_id(key: str) -> str:
    """`tenant:id` with the id percent-encoded outside [A-Za-z0-9._-] (reversible, filter-safe)."""
    tenant, _, record_id = key.partition(":")
    if _UNQUOTED.match(record_id):  # what quote() would leave as it is (most ids): the key itself
        return key
    return f"{tenant}:{quote(record_id, safe='._-')}"


class ImportRejected(ts_errors.ObjectUnprocessable):
    """A document of an import batch was refused (the import call itself answered 200)."""


class TypesenseSink:
    name = NAME
    # One document per entity. The server applies one collection's imports in turn (one indexing
    # queue per collection); side by side, the revision searches and the HTTP work overlap them.
    parallel_batches = 4

    def __init__(self, url: str, *, api_key: str, timeout_s: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        parsed = urlparse(url)
        # Our own HTTP client: the typesense client raises on a 429 without its headers, and the
        # server's Retry-After is read here, on the way through.
        self._retry_after_s: float | None = None
        self._http = httpx.AsyncClient(timeout=timeout_s, transport=transport,
                                       event_hooks={"response": [self._on_response]})
        self._client = typesense.AsyncClient({
            "nodes": [{"host": parsed.hostname or "127.0.0.1", "port": parsed.port or 8108,
                       "protocol": parsed.scheme or "http"}],
            "api_key": api_key,
            "connection_timeout_seconds": timeout_s,
            "num_retries": 0,  # retries are ours (backoff + circuit), not the client's
            "healthcheck_interval_seconds": 1,  # one node: never sit out a recovered server
        }, http_client=self._http)

    async def _on_response(self, response: httpx.Response) -> None:
        """Notes the server's Retry-After; reads the body here and leaves the response holding it
        as plain bytes. httpx binds a response's stream to the response (a reference cycle each),
        which only the garbage collector frees: ~27 a second at full speed, the worker's only
        steady cyclic garbage, and what kept its collector's thresholds low (collector.py)."""
        if response.status_code == HTTP_TOO_MANY_REQUESTS:
            header = response.headers.get("Retry-After")
            self._retry_after_s = parse_retry_after(header, now=datetime.now(UTC))
        await response.aread()  # the client reads it next anyway (no request here streams)
        response.stream = httpx.ByteStream(response.content)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The sink boundary (translated_errors), plus the server's Retry-After on a rate limit."""
        self._retry_after_s = None
        try:
            with translated_errors(classify, NAME):
                yield
        except SinkError as error:
            if error.reason is Reason.RATE_LIMITED and self._retry_after_s is not None:
                error.retry_after_s = self._retry_after_s
            raise

    async def open(self) -> None:
        with self._errors():
            await self._ensure_collections()

    async def probe_write(self) -> None:
        with self._errors():
            document = {"id": "ingest-stream", "probed_at": int(time.time() * 1000)}
            await self._client.collections[PROBE].documents.upsert(document)  # type: ignore[arg-type]

    async def _ensure_collections(self) -> None:
        for name, schema in _SCHEMAS.items():
            try:
                await self._client.collections[name].retrieve()
            except ts_errors.ObjectNotFound:
                try:
                    await self._client.collections.create(schema)  # type: ignore[arg-type]
                    log.info("typesense: created collection %s", name)
                except ts_errors.ObjectAlreadyExists:
                    pass  # another worker won the race

    async def close(self) -> None:
        await self._client.api_call.aclose()
        await self._http.aclose()

    async def current_revisions(self, keys: Sequence[str]) -> dict[str, Version]:
        with self._errors():
            return await self._current_revisions(keys)

    async def _current_revisions(self, keys: Sequence[str]) -> dict[str, Version]:
        by_doc_id = {document_id(k): k for k in keys}
        doc_ids = list(by_doc_id)
        searches = []
        for start in range(0, len(doc_ids), _IDS_PER_FILTER):
            chunk = doc_ids[start:start + _IDS_PER_FILTER]
            id_filter = "id:[" + ",".join(f"`{d}`" for d in chunk) + "]"
            searches += [{"collection": name, "q": "*", "filter_by": id_filter,
                          "per_page": len(chunk), "include_fields": "id,revision,origin_tp,origin_offset"}
                         for name in (COLLECTION, TOMBSTONES)]
        found: dict[str, Version] = {}
        # As few round trips as the server allows: each one waits its turn in a busy event loop.
        for start in range(0, len(searches), _SEARCHES_PER_REQUEST):
            # Encoded and decoded here with orjson, as `_import` does: the client's multi_search
            # would json.dumps the request and json.loads every hit (its status errors stay its own).
            text = await self._client.api_call.post(
                "/multi_search", entity_type=dict, as_json=False,
                body=orjson.dumps({"searches": searches[start:start + _SEARCHES_PER_REQUEST]}))
            response: dict[str, Any] = orjson.loads(text)
            for result in response["results"]:
                if "error" in result:
                    raise ts_errors.TypesenseClientError(result["error"])
                for hit in result.get("hits", []):
                    doc = hit["document"]
                    key = by_doc_id[doc["id"]]
                    version = Version(int(doc["revision"]), doc.get("origin_tp"), doc.get("origin_offset"))
                    if key not in found or version.revision > found[key].revision:
                        found[key] = version
        return found

    async def write(self, writes: Sequence[Write]) -> None:
        with self._errors():
            await self._write(writes)

    async def _write(self, writes: Sequence[Write]) -> None:
        live = [_document(w) for w in writes if not w.record["deleted"]]
        deleted = [w for w in writes if w.record["deleted"]]
        if live:
            await self._import(COLLECTION, live)
        if deleted:
            # Delete first, then remember the tombstone's revision. The other way round, a crash in
            # between left the document in search for good: redelivered, the tombstone's revision
            # was already held, an equal revision, skipped. This way it is not held until the
            # document is gone, and a redelivered tombstone does both steps again.
            ids = ",".join(f"`{document_id(w.key)}`" for w in deleted)
            await self._client.collections[COLLECTION].documents.delete(
                {"filter_by": f"id:[{ids}]"})
            await self._import(TOMBSTONES, [{"id": document_id(w.key), "tenant": w.record["tenant"],
                                             "revision": w.revision, **_origin(w)} for w in deleted])

    async def _import(self, collection: str, documents: list[dict[str, Any]]) -> None:
        # JSONL made here with orjson: the client would json.dumps each document (and json.loads
        # each result line), the sink's largest share of the worker's CPU.
        body = b"\n".join(orjson.dumps(doc) for doc in documents)
        response: str = await self._client.collections[collection].documents.import_(
            body, {"action": "upsert"})
        if response == "\n".join([_IMPORTED] * len(documents)):  # all in (most batches): no parse
            return
        results = [orjson.loads(line) for line in response.splitlines()]
        if len(results) != len(documents):
            raise ImportRejected(f"{len(documents)} document(s) sent, {len(results)} result(s) back")
        refused = [(doc["id"], r.get("error")) for doc, r in zip(documents, results, strict=True)
                   if not r.get("success")]
        if refused:
            raise ImportRejected(f"{len(refused)} document(s) refused, first: {refused[0]}")


def _document(write: Write) -> dict[str, Any]:
    r = write.record
    return {
        "id": document_id(write.key),
        "tenant": r["tenant"],
        "record_id": r["id"],
        "kind": r["kind"],
        "source": r["source"],
        "revision": r["revision"],
        "event_time": epoch_ms(r["event_time"]),
        "text": searchable_text(r["attributes"])[:TEXT_LIMIT],
        **_origin(write),
    }


def _origin(write: Write) -> dict[str, Any]:
    """Optional fields must be left out rather than null."""
    origin: dict[str, Any] = {}
    if write.origin_tp is not None:
        origin["origin_tp"] = write.origin_tp
    if write.origin_offset is not None:
        origin["origin_offset"] = write.origin_offset
    return origin


def searchable_text(value: Any) -> str:
    """Every string and number inside the attributes, in document order, space separated."""
    parts: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int | float):
            parts.append(str(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return " ".join(parts)
