"""The Typesense adapter's error boundary: a 429 becomes RATE_LIMITED carrying the server's
Retry-After. The server is an httpx MockTransport (no network); the adapter is the real one."""

import httpx
import pytest

from ingest_stream.core.reasons import Reason
from ingest_stream.errors import SinkError
from ingest_stream.sinks.typesense import TypesenseSink


def answering(status: int, headers: dict[str, str]) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, headers=headers,
                                                              json={"message": "slow down"}))


async def test_a_429_is_rate_limited_with_the_servers_retry_after():
    sink = TypesenseSink("http://typesense.test:8108", api_key="k", timeout_s=1,
                         transport=answering(429, {"Retry-After": "12"}))
    with pytest.raises(SinkError) as caught:
        await sink.current_revisions(["acme:1"])
    assert caught.value.reason is Reason.RATE_LIMITED
    assert caught.value.retry_after_s == 12.0
    await sink.close()


async def test_a_429_without_retry_after_leaves_the_backoff_to_us():
    sink = TypesenseSink("http://typesense.test:8108", api_key="k", timeout_s=1, transport=answering(429, {}))
    with pytest.raises(SinkError) as caught:
        await sink.current_revisions(["acme:1"])
    assert (caught.value.reason, caught.value.retry_after_s) == (Reason.RATE_LIMITED, None)
    await sink.close()
