"""RecordBatches: one record batch per topic-partition, rolled over when full, offsets per batch.

The producer here is a stand-in with aiokafka's batch API shape (create_batch / send_batch /
_partition); the real producer and broker are exercised by every integration test."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from ingest_stream.stream.producer_batches import RecordBatches


@dataclass
class Builder:
    capacity: int
    records: list[tuple[bytes | None, bytes | None, list[Any]]] = field(default_factory=list)
    closed: bool = False

    def append(self, *, timestamp: Any, key: bytes | None, value: bytes | None, headers: list[Any]) -> Any:
        if self.closed or len(self.records) >= self.capacity:
            return None
        self.records.append((key, value, headers))
        return object()

    def close(self) -> None:
        self.closed = True

    def record_count(self) -> int:
        return len(self.records)


@dataclass
class Metadata:
    offset: int


class Client:
    def __init__(self) -> None:
        self.metadata_waits: list[str] = []

    async def _wait_on_metadata(self, topic: str) -> None:
        self.metadata_waits.append(topic)


class Producer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.client = Client()
        self.sent: list[tuple[str, int, Builder]] = []
        self.next_offset: dict[tuple[str, int], int] = {}

    _partitioner = None  # not aiokafka's default: RecordBatches asks _partition for every record

    def _partition(self, topic: str, partition: Any, key: bytes, value: Any, *_: Any) -> int:
        return key[0] % 4

    def create_batch(self) -> Builder:
        return Builder(self.capacity)

    async def send_batch(self, batch: Builder, topic: str, *, partition: int) -> asyncio.Future[Metadata]:
        assert batch.closed, "a batch is closed before it is sent (nothing joins it, it does not linger)"
        self.sent.append((topic, partition, batch))
        base = self.next_offset.get((topic, partition), 0)
        self.next_offset[(topic, partition)] = base + batch.record_count()
        future: asyncio.Future[Metadata] = asyncio.get_running_loop().create_future()
        future.set_result(Metadata(base))
        return future


async def test_records_are_grouped_per_partition_in_order_and_full_batches_roll_over() -> None:
    producer = Producer(capacity=2)
    batches = RecordBatches(producer)  # type: ignore[arg-type]
    for i in range(5):
        await batches.add("t", bytes([4]), f"v{i}".encode(), [("h", b"1")])  # key 4 -> partition 0
    await batches.add("t", bytes([1]), b"other")  # partition 1
    await batches.add("changelog", b"k", b"x", partition=3)  # explicit partition, not the partitioner
    sent = await batches.send()

    by_tp: dict[tuple[str, int], list[bytes | None]] = {}
    for topic, partition, builder in producer.sent:
        by_tp.setdefault((topic, partition), []).extend(value for _, value, _ in builder.records)
    assert by_tp == {("t", 0): [b"v0", b"v1", b"v2", b"v3", b"v4"], ("t", 1): [b"other"],
                     ("changelog", 3): [b"x"]}
    assert [b.records for b in sent if b.topic == "t" and b.partition == 0] == [2, 2, 1]
    assert [await b.last_offset() for b in sent if b.topic == "t" and b.partition == 0] == [1, 3, 4]
    assert producer.client.metadata_waits == ["t", "changelog"]  # once per topic
    assert await batches.send() == []  # nothing left open


async def test_a_record_larger_than_an_empty_batch_is_an_error_and_nothing_empty_is_sent() -> None:
    producer = Producer(capacity=0)
    batches = RecordBatches(producer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="larger than the producer's max batch size"):
        await batches.add("t", b"\x00", b"big")
    assert producer.sent == []


class Partitions:
    def __init__(self, count: int) -> None:
        self.count = count

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.count))


async def test_with_the_default_partitioner_a_key_lands_where_aiokafka_would_put_it() -> None:
    producer = Producer(capacity=10_000)
    producer._partitioner = DefaultPartitioner()  # type: ignore[assignment]
    producer._metadata = Partitions(7)  # type: ignore[attr-defined]
    batches = RecordBatches(producer)  # type: ignore[arg-type]
    keys = [f"tenant-{i % 3}:entity-{i}".encode() for i in range(500)]
    for key in keys:
        await batches.add("a", key, b"v")
        await batches.add("b", key, b"v")  # the cached hash, for a second topic
    await batches.send()
    landed = {(topic, key) : partition for topic, partition, builder in producer.sent
              for key, _, _ in builder.records}
    expected = {key: DefaultPartitioner()(key, list(range(7)), list(range(7))) for key in keys}
    assert {(t, k): expected[k] for t in ("a", "b") for k in keys} == landed  # type: ignore[index]
    assert len(set(expected.values())) == 7
