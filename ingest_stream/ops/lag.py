"""Consumer lag, measured from outside the consumer: committed offsets of a group against the
partitions' end offsets, and lag in seconds as now minus the timestamp of the first uncommitted
record (0 when caught up, so an idle source is not "late"). Used by `ingest-stream lag` and by the
worker's backpressure timer, so both report the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

PEEK_ROUNDS = 3
PEEK_WAIT_MS = 300


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group has not committed here
    end: int
    records: int
    seconds: float


class LagProbe:
    def __init__(self, bootstrap: str, group: str, clock: Callable[[], float] = time.time) -> None:
        self._bootstrap = bootstrap
        self._group = group
        self._clock = clock
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap)
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None,
                                          enable_auto_commit=False, auto_offset_reset="earliest",
                                          fetch_max_wait_ms=100, max_partition_fetch_bytes=256 * 1024)
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def measure(self, topics: Sequence[str]) -> list[PartitionLag]:
        assert self._admin is not None and self._consumer is not None, "start() first"
        consumer = self._consumer
        existing = await consumer.topics()
        tps = [TopicPartition(topic, p) for topic in topics if topic in existing
               for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        offsets = await self._admin.list_consumer_group_offsets(self._group, partitions=tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        next_offsets = {}
        for tp in tps:
            meta = offsets.get(tp)
            committed = meta.offset if meta is not None and meta.offset >= 0 else None
            next_offsets[tp] = max(committed if committed is not None else 0, starts[tp])
        first_waiting = await self._peek(next_offsets)
        now = self._clock()
        measured: list[PartitionLag] = []
        for tp in tps:
            meta = offsets.get(tp)
            committed = meta.offset if meta is not None and meta.offset >= 0 else None
            peeked = first_waiting.get(tp)
            # A broker may report an end short of readable records (Tansu): what was read counts.
            end = max(ends[tp], peeked[1] if peeked else 0)
            records = max(0, end - next_offsets[tp])
            seconds = max(0.0, now - peeked[0]) if records and peeked else 0.0
            measured.append(PartitionLag(tp.topic, tp.partition, committed, end, records, seconds))
        return measured

    async def _peek(self, positions: dict[TopicPartition, int]) -> dict[TopicPartition, tuple[float, int]]:
        """Per partition with records at or after its position: the first one's timestamp (s)
        and one past the last offset read. A few short fetches; partitions without data are absent."""
        assert self._consumer is not None
        consumer = self._consumer
        if consumer.assignment() != set(positions):
            consumer.assign(list(positions))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        found: dict[TopicPartition, tuple[float, int]] = {}
        for _ in range(PEEK_ROUNDS):
            batches = await consumer.getmany(timeout_ms=PEEK_WAIT_MS)
            if not batches and found:
                break
            for tp, records in batches.items():
                first_ts = found[tp][0] if tp in found else records[0].timestamp / 1000
                found[tp] = (first_ts, records[-1].offset + 1)
        return found
