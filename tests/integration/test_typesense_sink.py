"""The Typesense sink against the real server: a delete interrupted between its two requests.

Typesense has no transactions: a tombstone is two requests (the document deleted, its revision
remembered). A worker killed between them must leave a state the redelivered tombstone completes.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import httpx
import orjson
import pytest

from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.record import with_defaults
from ingest_stream.core.revision import Version
from ingest_stream.errors import SinkError
from ingest_stream.metrics import Metrics
from ingest_stream.ops.devstack import DevStack
from ingest_stream.sinks.base import Write
from ingest_stream.sinks.guarded import BatchOutcome, GuardedSink
from ingest_stream.sinks.typesense import COLLECTION, ImportRejected, TypesenseSink, _document
from tests.dataset import v2
from tests.integration.harness import SinkReader


class KilledMidWrite(httpx.AsyncBaseTransport):
    """The real server, until `allowed` more requests have gone through; then every request fails
    as if the worker had died (nothing more reaches the server)."""

    def __init__(self) -> None:
        self._server = httpx.AsyncHTTPTransport()
        self.allowed: int | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.allowed is not None:
            if self.allowed <= 0:
                raise httpx.ConnectError("worker killed", request=request)
            self.allowed -= 1
        return await self._server.handle_async_request(request)

    async def aclose(self) -> None:
        await self._server.aclose()


def _write(tenant: str, revision: int, *, deleted: bool = False) -> Write:
    overrides = {"deleted": True, "attributes": {}} if deleted else {}
    record = with_defaults(v2(tenant, "doc", revision, **overrides))
    return Write(record, may_rewrite_equal=False, origin_tp="t:0", origin_offset=revision)


def _sink(stack: DevStack, transport: httpx.AsyncBaseTransport | None = None) -> TypesenseSink:
    return TypesenseSink(stack.typesense_url, api_key=stack.typesense_api_key, timeout_s=10,
                         transport=transport)


@pytest.mark.parametrize("requests_before_the_kill", [0, 1])
def test_a_tombstone_cut_between_its_requests_is_completed_when_redelivered(
        stack: DevStack, sinks: SinkReader, prefix: str, requests_before_the_kill: int) -> None:
    tenant = f"{prefix}-cut{requests_before_the_kill}"
    live, tombstone = _write(tenant, 1), _write(tenant, 2, deleted=True)

    async def scenario() -> BatchOutcome:
        killed = KilledMidWrite()
        first = _sink(stack, killed)
        await first.open()
        try:
            await first.write([live])
            killed.allowed = requests_before_the_kill
            with pytest.raises(SinkError):
                await first.write([tombstone])
        finally:
            await first.close()
        # The restarted worker: the tombstone is redelivered and goes through the guard again.
        second = _sink(stack)
        guarded = GuardedSink(second, metrics=Metrics(), backoff=BackoffPolicy(), failure_policy="hold",
                              timeout_s=10)
        try:
            outcome = await guarded.apply([tombstone])
            # ... and an older revision arriving later stays out.
            held = (await second.current_revisions([live.key])).get(live.key)
            assert held is not None and held.revision == 2
        finally:
            await second.close()
        return outcome

    assert asyncio.run(scenario()).applied == [tombstone]  # not skipped as already held
    assert sinks.search_documents([tenant]) == {}  # gone from search


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real server; the searches of each multi_search request are kept."""

    def __init__(self) -> None:
        self._server = httpx.AsyncHTTPTransport()
        self.multi_searches: list[list[dict[str, Any]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/multi_search":
            self.multi_searches.append(orjson.loads(await request.aread())["searches"])
        return await self._server.handle_async_request(request)

    async def aclose(self) -> None:
        await self._server.aclose()


# Ids the document id percent-encodes, one of each kind the filter syntax or the URL minds.
AWKWARD = ["with space", "back`tick", "com,ma", "[bracket]", "co:lon", "a&&b||c", "per%41cent", "A",
           "slash/and\\backslash", "é漢字🙂", "quote\"'", "-dash.dot_under"]


@pytest.mark.parametrize("ids", [250, 251])
def test_revisions_are_read_for_a_full_search_of_ids_and_one_more(
        stack: DevStack, prefix: str, ids: int) -> None:
    """250 ids fill one search of each collection (its largest per_page); 251 take two. Every third
    entity is a tombstone, so both collections answer; the last few were never written."""
    tenant = f"{prefix}-ids{ids}"
    keys = [f"{tenant}:{AWKWARD[i % len(AWKWARD)]}-{i}" for i in range(ids)]
    written = keys[:-len(AWKWARD)]
    live = [Write(with_defaults(v2(tenant, k.partition(":")[2], 1)), origin_tp="t:0", origin_offset=i)
            for i, k in enumerate(written)]
    tombstones = [Write(with_defaults(v2(tenant, w.record["id"], 2, deleted=True, attributes={})),
                        origin_tp="t:0", origin_offset=ids + i) for i, w in enumerate(live) if i % 3 == 0]

    async def scenario() -> tuple[dict[str, Version], list[list[dict[str, Any]]]]:
        recording = RecordingTransport()
        sink = _sink(stack, recording)
        await sink.open()
        try:
            await sink.write(live)
            await sink.write(tombstones)
            recording.multi_searches.clear()
            return await sink.current_revisions(keys), recording.multi_searches
        finally:
            await sink.close()

    found, requests = asyncio.run(scenario())
    assert found == {w.key: w.version for w in live} | {w.key: w.version for w in tombstones}
    assert len(requests) == 1  # one round trip
    assert sorted(int(search["per_page"]) for search in requests[0]) == (
        [250, 250] if ids == 250 else [1, 1, 250, 250])  # a search of each collection per 250 ids


def test_an_import_names_the_document_the_server_refused(stack: DevStack, prefix: str) -> None:
    """All taken: nothing raised, the documents are there. One refused (a revision that is not an
    int64): the batch raises, naming it, and the server kept the rest."""
    good = [_document(_write(f"{prefix}-imp", 1)), _document(_write(f"{prefix}-imp2", 1))]
    refused = {**_document(_write(f"{prefix}-imp3", 1)), "revision": "not-a-number"}

    async def scenario() -> tuple[str, dict[str, Version]]:
        sink = _sink(stack)
        await sink.open()
        try:
            await sink._import(COLLECTION, good)
            with pytest.raises(ImportRejected) as raised:
                await sink._import(COLLECTION, [good[0], refused, good[1]])
            return str(raised.value), await sink.current_revisions(
                [f"{prefix}-imp:doc", f"{prefix}-imp2:doc", f"{prefix}-imp3:doc"])
        finally:
            await sink.close()

    error, found = asyncio.run(scenario())
    assert "1 document(s) refused" in error and refused["id"] in error
    assert sorted(found) == [f"{prefix}-imp2:doc", f"{prefix}-imp:doc"]


def test_the_sinks_requests_leave_no_cyclic_garbage(stack: DevStack, prefix: str) -> None:
    """Its HTTP responses are freed as soon as they are read, not left to the garbage collector
    (the worker's collector runs rarely: collector.py)."""
    writes = [_write(f"{prefix}-gc{i}", 1) for i in range(3)]

    async def scenario() -> list[object]:
        sink = _sink(stack)
        await sink.open()
        try:
            await sink.write(writes)  # warm: the connection is made
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                await sink.write(writes)
                await sink.current_revisions([w.key for w in writes])
                await sink.write([_write(f"{prefix}-gc0", 2, deleted=True)])
                gc.collect()
                return [o for o in gc.garbage if type(o).__module__.startswith(("httpx", "httpcore"))]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
        finally:
            await sink.close()

    assert asyncio.run(scenario()) == []
