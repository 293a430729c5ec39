"""BatchDrainConsumer._deliver after a seek: the rest of a fetch from the old position is not delivered.

A real Faust app and consumer (nothing started, nothing connects). The conductor's callback is
recorded. The seek counts are those `IngestConsumerThread` keeps and tags each fetch with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from ingest_stream.stream.batching import IngestApp

SRC = TP("src", 0)


@pytest.fixture
async def consumer() -> Any:  # made inside the running loop: Faust's services bind to it
    app = IngestApp("test-batch-drain", broker="kafka://127.0.0.1:1", store="memory://")
    consumer = app.consumer
    delivered: list[int] = []

    async def record(message: Any) -> None:
        delivered.append(message.offset)

    consumer.callback = record
    consumer.delivered = delivered
    return consumer


async def _fetch(offsets: range) -> AsyncIterator[tuple[TP, Any]]:
    for offset in offsets:
        yield SRC, ConsumerMessage("src", 0, offset, 0.0, None, None, b"v", None, None)


def _seek(consumer: Any, offset: int) -> None:
    """What a seek to the committed offset leaves behind: the partition's seek count moved on and
    Faust's read offset at the new position."""
    consumer._thread.seek_counts[SRC] += 1
    consumer._read_offset[SRC] = offset


async def test_records_fetched_before_a_seek_are_not_delivered_and_leave_the_read_offset(
        consumer: Any) -> None:
    consumer._fetch_seek_counts = {SRC: 0}  # fetched from the old position (690...)
    _seek(consumer, 35)  # then the rebalance's seek to the committed offset
    await consumer._deliver(_fetch(range(690, 700)))
    assert consumer.delivered == []
    assert consumer._read_offset[SRC] == 35


async def test_after_a_stale_fetch_the_refetched_records_from_the_seek_position_are_delivered(
        consumer: Any) -> None:
    consumer._fetch_seek_counts = {SRC: 0}
    _seek(consumer, 35)
    await consumer._deliver(_fetch(range(690, 700)))
    consumer._fetch_seek_counts = {SRC: 1}  # fetched after the seek
    await consumer._deliver(_fetch(range(35, 40)))
    assert consumer.delivered == [35, 36, 37, 38, 39]
    assert consumer._read_offset[SRC] == 39


async def test_a_seek_of_another_partition_does_not_hold_back_this_one(consumer: Any) -> None:
    consumer._fetch_seek_counts = {SRC: 0}
    consumer._thread.seek_counts[TP("src", 1)] += 1
    await consumer._deliver(_fetch(range(0, 3)))
    assert consumer.delivered == [0, 1, 2]


async def test_records_below_the_read_offset_are_still_dropped_as_already_delivered(consumer: Any) -> None:
    consumer._fetch_seek_counts = {SRC: 0}
    consumer._read_offset[SRC] = 10
    await consumer._deliver(_fetch(range(8, 12)))
    assert consumer.delivered == [10, 11]
