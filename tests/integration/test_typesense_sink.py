"""The Typesense sink against the real server: a delete interrupted between its two requests.

Typesense has no transactions: a tombstone is two requests (the document deleted, its revision
remembered). A worker killed between them must leave a state the redelivered tombstone completes.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.record import with_defaults
from ingest_stream.errors import SinkError
from ingest_stream.metrics import Metrics
from ingest_stream.ops.devstack import DevStack
from ingest_stream.sinks.base import Write
from ingest_stream.sinks.guarded import BatchOutcome, GuardedSink
from ingest_stream.sinks.typesense import TypesenseSink
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
