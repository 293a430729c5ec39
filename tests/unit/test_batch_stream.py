"""BatchStream.unacked_batches around a rebalance: stale events are skipped and never acked.

A real Faust app, channel and events; no broker (nothing is started that connects). The consumer's
`ack` is recorded: an ack of a skipped stale record would let the commit pass it unprocessed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from faust.events import Event
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from ingest_stream.stream.consumer_batches import BatchStream, IngestApp


@pytest.fixture
async def app() -> Any:  # made inside the running loop: Faust's events bind to it
    app = IngestApp("test-batch-stream", broker="kafka://127.0.0.1:1", Stream=BatchStream, store="memory://")
    app.consumer_generation_id = 2
    app.flow_control.resume()
    return app


async def _queue(app: Any, channel: Any, offsets_and_generations: list[tuple[int, int]]) -> None:
    for offset, generation in offsets_and_generations:
        message = ConsumerMessage("src", 0, offset, 0.0, None, None, b"v", None, None,
                                  generation_id=generation)
        await channel.queue.put(Event(app, None, b"v", {}, message))


async def _first_batch(app: Any, channel: Any) -> list[int]:
    async for batch in app.stream(channel).unacked_batches(10, 0.05):
        return [event.message.offset for event in batch]
    raise AssertionError("no batch")


def _record_acks(app: Any) -> list[int]:
    acked: list[int] = []
    app.consumer.ack = lambda message: acked.append(message.offset) or True
    return acked


async def test_events_of_a_previous_generation_are_skipped_without_an_ack(app: Any) -> None:
    acked = _record_acks(app)
    channel = app.topic("src", value_serializer="raw").clone(is_iterator=True)
    await _queue(app, channel, [(1, 1), (2, 1), (3, 2), (4, 2)])
    assert await _first_batch(app, channel) == [3, 4]
    assert acked == []


async def test_events_read_while_the_flow_is_suspended_are_skipped_without_an_ack(app: Any) -> None:
    acked = _record_acks(app)
    channel = app.topic("src", value_serializer="raw").clone(is_iterator=True)
    await _queue(app, channel, [(1, 2), (2, 2)])
    app.flow_control.suspend()  # a rebalance in progress
    reading = asyncio.ensure_future(_first_batch(app, channel))
    for _ in range(1000):  # until the stream has taken both (it yields to the loop while waiting)
        if channel.queue.empty():
            break
        await asyncio.sleep(0)
    assert channel.queue.empty() and not reading.done()
    app.consumer_generation_id = 3  # the new assignment
    app.flow_control.resume()
    await _queue(app, channel, [(1, 3)])  # read again after the assignment's seek
    assert await asyncio.wait_for(reading, 5) == [1]
    assert acked == []


async def test_a_batch_marks_its_partitions_as_processing_for_fausts_slow_stream_check(app: Any) -> None:
    channel = app.topic("src", value_serializer="raw").clone(is_iterator=True)
    await _queue(app, channel, [(5, 2)])
    assert await _first_batch(app, channel) == [5]
    assert TP("src", 0) in app.monitor.stream_inbound_time


async def test_ack_batch_acks_every_event_and_reports_one_past_the_highest_offset(app: Any) -> None:
    acked = _record_acks(app)
    channel = app.topic("src", value_serializer="raw").clone(is_iterator=True)
    await _queue(app, channel, [(7, 2), (8, 2), (9, 2)])
    stream = app.stream(channel)
    async for batch in stream.unacked_batches(10, 0.05):
        assert stream.ack_batch(batch) == {TP("src", 0): 10}
        break
    assert acked == [7, 8, 9]
