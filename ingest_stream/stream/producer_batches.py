"""The producer side: many records to many topic-partitions, sent as one Kafka record batch per
partition (what the source agent sends; the consumer side is `consumer_batches.py`).

`AIOKafkaProducer.send` costs a future, a partitioner call and an accumulator lookup per record;
the source agent sends three or more records per input record (one per sink topic, plus table
changelogs). aiokafka's own batch API (`create_batch` / `send_batch`) fills a record batch per
partition and creates one future per batch. Partitions are chosen by the producer's own
partitioner, exactly as `send` would, so a key lands where Faust or a plain producer put it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from ingest_stream.stream import faust_internals


@dataclass(frozen=True, slots=True)
class SentBatch:
    topic: str
    partition: int
    records: int
    delivery: asyncio.Future[Any]  # resolves to RecordMetadata of the batch's first record

    async def last_offset(self) -> int:
        metadata = await self.delivery
        return int(metadata.offset) + self.records - 1


class RecordBatches:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._default_partitioner = faust_internals.uses_default_partitioner(producer)
        self._open: dict[tuple[str, int], Any] = {}  # (topic, partition) -> BatchBuilder
        self._sent: list[SentBatch] = []
        self._ready_topics: set[str] = set()
        self._partitions: dict[str, list[int]] = {}
        self._key_hashes: dict[bytes, int] = {}  # one key goes to every sink topic: hash it once

    async def add(self, topic: str, key: bytes | None, value: bytes | None,
                  headers: Sequence[tuple[str, bytes]] = (), partition: int | None = None) -> None:
        if topic not in self._ready_topics:  # as send() does: the partitioner needs the metadata
            await faust_internals.wait_on_metadata(self._producer, topic)
            self._ready_topics.add(topic)
        if partition is None:
            partition = self._partition_for(topic, key, value)
        tp = (topic, partition)
        builder = self._open.get(tp)
        if builder is None:
            builder = self._open[tp] = self._producer.create_batch()
        while builder.append(timestamp=None, key=key, value=value, headers=list(headers)) is None:
            if builder.record_count() == 0:  # aiokafka always takes a batch's first record; be sure
                raise ValueError(f"a record for {topic} is larger than the producer's max batch size")
            await self._send(tp, builder)  # full: send it, start the next one
            builder = self._open[tp] = self._producer.create_batch()

    def _partition_for(self, topic: str, key: bytes | None, value: bytes | None) -> int:
        """The producer's partitioner's choice. Its default (murmur2 of the key, in pure Python,
        ~6 µs) is computed once per key and batch; any other partitioner is asked every time."""
        producer = self._producer
        if key is None or not self._default_partitioner:
            return faust_internals.partition_for(producer, topic, key, value)
        partitions = self._partitions.get(topic)
        if partitions is None:  # sorted by id, as DefaultPartitioner expects them
            partitions = sorted(faust_internals.partitions_for_topic(producer, topic))
            self._partitions[topic] = partitions
        hashed = self._key_hashes.get(key)
        if hashed is None:
            hashed = self._key_hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]

    async def send(self) -> list[SentBatch]:
        """Send every open batch; returns all batches sent (await their deliveries before acking)."""
        for tp, builder in list(self._open.items()):
            await self._send(tp, builder)
        self._open.clear()
        sent, self._sent = self._sent, []
        return sent

    async def _send(self, tp: tuple[str, int], builder: Any) -> None:
        builder.close()  # closed: nothing else joins it, and it does not linger
        delivery = await self._producer.send_batch(builder, tp[0], partition=tp[1])
        self._sent.append(SentBatch(tp[0], tp[1], builder.record_count(), delivery))
