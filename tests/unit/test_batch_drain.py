"""BatchDrainConsumer around a seek: the rest of a fetch from the old position is not delivered,
and the read offset follows the seek from the first record fetched after it.

A real Faust app and consumer (nothing started, nothing connects). The conductor's callback is
recorded. The seeks are what `IngestConsumerThread` records as aiokafka seeks, and each fetch carries
the seek counts it was fetched under."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from ingest_stream.stream.consumer_batches import IngestApp, Seek, StreamFlowControl
from ingest_stream.stream.topics import RawBytesSchema

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
    consumer.highwater = lambda tp: 0  # no broker: the fetch's end offset is only monitored
    app.flow_control.resume()  # the streams run (Faust's flow control starts suspended)
    return consumer


def _records(tp: TP, offsets: range) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, None, b"v", None, 0, 1, ())
            for offset in offsets]


async def _deliver(consumer: Any, offsets: range, *, fetched_under: int) -> None:
    """One fetch of `offsets` from SRC, fetched when SRC had been seeked `fetched_under` times."""
    consumer._fetch_seek_counts = {SRC: fetched_under}
    await consumer._deliver({SRC: _records(SRC, offsets)}, None)


def _seek(consumer: Any, offset: int) -> None:
    seeks = consumer._thread.seeks
    seeks[SRC] = Seek(seeks[SRC].number + 1 if SRC in seeks else 1, offset)


async def test_records_fetched_before_a_seek_are_not_delivered(consumer: Any) -> None:
    await _deliver(consumer, range(680, 690), fetched_under=0)
    _seek(consumer, 35)  # a rebalance's seek to the committed offset, in the middle of a fetch
    await _deliver(consumer, range(690, 700), fetched_under=0)  # the rest of that fetch
    assert consumer.delivered == list(range(680, 690))


async def test_after_a_seek_back_the_refetched_records_are_delivered_from_the_seek_position(
        consumer: Any) -> None:
    await _deliver(consumer, range(680, 690), fetched_under=0)  # read offset 689
    _seek(consumer, 35)
    await _deliver(consumer, range(35, 40), fetched_under=1)
    assert consumer.delivered[10:] == [35, 36, 37, 38, 39]
    assert consumer._read_offset[SRC] == 39
    assert not consumer._gap[SRC], "a gap counts as acked: none may open over records not processed"


async def test_a_seek_of_another_partition_does_not_hold_back_this_one(consumer: Any) -> None:
    consumer._thread.seeks[TP("src", 1)] = Seek(1, 0)
    await _deliver(consumer, range(0, 3), fetched_under=0)
    assert consumer.delivered == [0, 1, 2]


async def test_without_a_seek_records_below_the_read_offset_are_dropped_as_already_delivered(
        consumer: Any) -> None:
    await _deliver(consumer, range(8, 12), fetched_under=0)
    await _deliver(consumer, range(9, 14), fetched_under=0)
    # As in Faust, the one at the read offset passes (after a seek that offset is the next to read).
    assert consumer.delivered == [8, 9, 10, 11, 11, 12, 13]


async def test_records_of_acking_topics_wait_for_the_streams_to_resume(consumer: Any) -> None:
    """Faust clears the streams' queues when it resumes them: delivered before, a record is lost."""
    consumer.app.topics.acks_enabled_for = lambda topic: True
    consumer.app.flow_control.suspend()  # a rebalance's recovery: consumer running, streams not yet
    delivering = asyncio.ensure_future(_deliver(consumer, range(0, 3), fetched_under=0))
    for _ in range(100):
        await asyncio.sleep(0)
    assert consumer.delivered == [] and not delivering.done()
    consumer.app.flow_control.resume()
    await asyncio.wait_for(delivering, 5)
    assert consumer.delivered == [0, 1, 2]


async def test_perform_seek_leaves_read_offsets_to_the_drain_loop_and_seeks_uncommitted_ones_to_the_start(
        consumer: Any) -> None:
    """Faust would set the read offsets once every partition is seeked, and would not seek a partition
    without a commit: records delivered from it meanwhile (and discarded by a stream not yet resumed)
    were then never read again."""
    other = TP("src", 1)
    await _deliver(consumer, range(35, 50), fetched_under=0)  # delivered after the seek, before its end
    seeked_to_start: list[Any] = []

    async def seek_to_committed() -> dict[TP, int | None]:
        return {SRC: 35, other: None}

    async def seek_to_start(partitions: list[Any]) -> None:
        seeked_to_start.extend(partitions)

    consumer.app.topics.acks_enabled_for = lambda topic: topic == "src"  # not a changelog
    consumer.seek_to_committed = seek_to_committed
    consumer._thread.seek_to_start = seek_to_start
    await consumer.perform_seek()
    assert consumer._read_offset[SRC] == 49
    assert seeked_to_start == [other]
    assert consumer._committed_offset[SRC] == 35


async def test_changelog_partitions_without_a_commit_are_not_seeked_to_the_start(consumer: Any) -> None:
    changelog = TP("app-table-changelog", 0)  # never committed: recovery reads it from its own offsets
    seeked_to_start: list[Any] = []

    async def seek_to_committed() -> dict[TP, int | None]:
        return {changelog: None}

    async def seek_to_start(partitions: list[Any]) -> None:
        seeked_to_start.extend(partitions)

    consumer.app.topics.acks_enabled_for = lambda topic: topic == "src"
    consumer.seek_to_committed = seek_to_committed
    consumer._thread.seek_to_start = seek_to_start
    await consumer.perform_seek()
    assert seeked_to_start == []


async def test_a_seek_before_a_revocation_does_not_reset_the_read_offset_after_it(consumer: Any) -> None:
    """Seeked to 35 but revoked before any record; assigned here again later, where another worker
    committed 900, without a seek of its own: the old target must not come back."""
    consumer.app.topics.acks_enabled_for = lambda topic: True
    _seek(consumer, 35)
    await consumer.on_partitions_revoked({SRC})
    await _deliver(consumer, range(900, 903), fetched_under=1)
    assert consumer.delivered == [900, 901, 902]
    assert not consumer._gap[SRC], "a gap from 36 to 899 would count as acked"


async def test_resuming_streams_that_run_already_keeps_their_queues(consumer: Any) -> None:
    """Faust resumes the streams a second time after seeking; its resume clears their queues."""
    app = consumer.app
    assert isinstance(app.flow_control, StreamFlowControl)
    queue = app.FlowControlQueue(maxsize=10, clear_on_resume=True)
    queue.put_nowait("delivered after the seek")
    app.flow_control.resume()  # running already
    assert queue.qsize() == 1
    app.flow_control.suspend()  # a rebalance: what is queued belongs to the old assignment
    app.flow_control.resume()
    assert queue.qsize() == 0


async def test_resumes_leave_the_held_topics_paused(consumer: Any) -> None:
    """Faust's recovery resumes every assigned partition after a rebalance; what backpressure holds
    (a drain, a pause, a disabled source) stays paused."""
    held, other = TP("held", 0), TP("src", 0)
    consumer._active_partitions = set()  # as after an assignment with both partitions paused
    consumer.pause_partitions({held, other})
    consumer.resume_partitions([held])  # nothing held yet: Faust's own resume
    assert consumer._paused_partitions == {other}
    consumer.pause_partitions({held})
    consumer.hold_from_resumes(lambda: {"held"})
    consumer.resume_partitions([held, other])
    assert consumer._paused_partitions == {held}
    assert consumer._get_active_partitions() == {other}


def _stream_of(topic: Any) -> Any:
    """The channel an agent's stream reads (`aiter(topic)`: a clone the conductor delivers to)."""
    return topic.clone(is_iterator=True)


async def _read_by(consumer: Any, *channels: Any) -> None:
    """Register `channels` as the streams reading SRC, as the conductor does on an assignment."""
    for channel in channels:
        consumer.app.topics.add(channel)
    await consumer.app.topics.on_partitions_assigned({SRC})


async def test_a_raw_bytes_stream_gets_its_events_straight_into_its_queue(consumer: Any) -> None:
    """The fetch bypasses the conductor's per-message path; each event holds a reference on its
    message (the stream's ack releases it), exactly as the conductor would leave it."""
    channel = _stream_of(consumer.app.topic("src", schema=RawBytesSchema()))
    await _read_by(consumer, channel)
    await _deliver(consumer, range(5, 9), fetched_under=0)
    events = [channel.queue.get_nowait() for _ in range(channel.queue.qsize())]
    assert [(e.message.offset, e.value, e.message.refcount) for e in events] == [
        (5, b"v", 1), (6, b"v", 1), (7, b"v", 1), (8, b"v", 1)]
    assert consumer.delivered == [], "not through the conductor"
    assert consumer._read_offset[SRC] == 8


async def test_a_partition_read_by_two_streams_goes_through_the_conductor(consumer: Any) -> None:
    first = _stream_of(consumer.app.topic("src", schema=RawBytesSchema()))
    second = _stream_of(consumer.app.topic("src", schema=RawBytesSchema()))
    await _read_by(consumer, first, second)
    await _deliver(consumer, range(0, 3), fetched_under=0)
    assert consumer.delivered == [0, 1, 2]
    assert first.queue.empty() and second.queue.empty()


async def test_a_stream_that_decodes_its_own_way_goes_through_the_conductor(consumer: Any) -> None:
    await _read_by(consumer, _stream_of(consumer.app.topic("src", value_type=str)))
    await _deliver(consumer, range(0, 3), fetched_under=0)
    assert consumer.delivered == [0, 1, 2]


async def test_a_full_stream_queue_holds_the_fetch_until_there_is_room(consumer: Any) -> None:
    app = consumer.app  # (`App.topic` drops its `maxsize`)
    channel = _stream_of(app.conf.Topic(app, topics=["src"], schema=RawBytesSchema(), maxsize=2))
    await _read_by(consumer, channel)
    delivering = asyncio.ensure_future(_deliver(consumer, range(0, 4), fetched_under=0))
    await _until(lambda: channel.queue.full())
    read = [channel.queue.get_nowait().message.offset]
    await _until(lambda: channel.queue.full())
    assert not delivering.done(), "the fourth record has no room yet"
    while not delivering.done() or not channel.queue.empty():
        read.append((await asyncio.wait_for(channel.queue.get(), 5)).message.offset)
    assert read == [0, 1, 2, 3]


async def _until(condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not condition():
        assert loop.time() < give_up, "condition not met in time"
        await asyncio.sleep(0.001)


CHANGELOG = TP("app-dedupe-changelog", 0)


def _seeks_back(consumer: Any) -> list[dict[TP, int]]:
    seeked: list[dict[TP, int]] = []

    async def seek_back(positions: dict[TP, int]) -> None:
        seeked.append(dict(positions))

    async def perform_seek() -> None:  # the streams' own seek to their committed offsets
        seeked.append({SRC: -1})

    consumer._thread.seek_back = seek_back
    consumer.perform_seek = perform_seek
    consumer.app.topics.acks_enabled_for = lambda topic: topic == "src"
    return seeked


async def test_a_fetch_dropped_while_the_flow_is_suspended_reads_the_changelogs_again(consumer: Any) -> None:
    """A recovery seeks its changelog partitions, a fetch from there returns before the flow is
    resumed: dropped as Faust drops it, and the changelog partition is seeked back to its first
    record (CI: the recovery waited for those records for good, every stream paused)."""
    seeked = _seeks_back(consumer)
    fetch = {SRC: _records(SRC, range(10, 20)), CHANGELOG: _records(CHANGELOG, range(299, 450))}

    async def wait_next_records(_timeout: float) -> Any:
        consumer._fetch_seek_counts = {SRC: 0, CHANGELOG: 0}
        return fetch, None

    consumer._wait_next_records = wait_next_records
    consumer.flow_active = False
    await consumer._fetch_and_deliver(timeout=1.0)
    assert consumer.delivered == []
    assert seeked == [{SRC: -1}, {CHANGELOG: 299}]  # the stream by perform_seek, the changelog back


async def test_a_changelog_seeked_since_the_fetch_is_left_where_that_seek_put_it(consumer: Any) -> None:
    seeked = _seeks_back(consumer)
    consumer._thread.seeks[CHANGELOG] = Seek(1, 120)  # the recovery seeked after this fetch began

    async def wait_next_records(_timeout: float) -> Any:
        consumer._fetch_seek_counts = {CHANGELOG: 0}
        return {CHANGELOG: _records(CHANGELOG, range(50, 60))}, None

    consumer._wait_next_records = wait_next_records
    consumer.flow_active = False
    await consumer._fetch_and_deliver(timeout=1.0)
    assert seeked == [{SRC: -1}]


async def test_a_rebalance_mid_fetch_reads_the_rest_of_a_changelog_again(consumer: Any) -> None:
    seeked = _seeks_back(consumer)
    consumer._fetch_seek_counts = {CHANGELOG: 0}
    generation = consumer.app.consumer_generation_id
    delivered = consumer.delivered

    async def record_then_rebalance(message: Any) -> None:
        delivered.append(message.offset)
        if len(delivered) == 3:
            consumer.app.consumer_generation_id = generation + 1  # a rebalance starts meanwhile

    consumer.callback = record_then_rebalance
    await consumer._deliver({CHANGELOG: _records(CHANGELOG, range(299, 310))}, None)
    assert delivered == [299, 300, 301]
    assert seeked == [{CHANGELOG: 302}]  # the rest, from the first record not handed over


async def test_a_changelog_seeked_before_the_dropped_fetch_goes_back_to_that_seek_not_an_old_read_offset(
        consumer: Any) -> None:
    """As CI found it: the recovery's second seek (to 299) came before the fetch, nothing was handed
    over since, and the read offset still held where the first seek's reading had got (500)."""
    seeked = _seeks_back(consumer)
    consumer._thread.seeks[CHANGELOG] = Seek(2, 299)
    consumer._read_offset_seeks[CHANGELOG] = 1
    consumer._read_offset[CHANGELOG] = 500

    async def wait_next_records(_timeout: float) -> Any:
        consumer._fetch_seek_counts = {CHANGELOG: 2}
        return {CHANGELOG: _records(CHANGELOG, range(299, 450))}, None

    consumer._wait_next_records = wait_next_records
    consumer.flow_active = False
    await consumer._fetch_and_deliver(timeout=1.0)
    assert seeked == [{SRC: -1}, {CHANGELOG: 299}]
