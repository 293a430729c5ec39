"""Small Kafka helpers for the operator tools and adapters: read a topic from the start to its end,
make sure a topic exists, keep the latest value per key in a compacted topic. Plain aiokafka
clients, outside Faust."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

TOPIC_ALREADY_EXISTS = 36
FETCH_WAIT_MS = 500


class ToolError(RuntimeError):
    """What an operator tool reports as its one-line error (exit status 1)."""


async def ensure_topic(bootstrap: str, name: str, *, partitions: int = 1,
                       configs: dict[str, str] | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        response = await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs or {})])
        for topic, code, *message in response.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise ToolError(f"cannot create topic {topic}: error {code} {message}")
    finally:
        await admin.close()


async def scan(bootstrap: str, topic: str) -> AsyncGenerator[ConsumerRecord[Any, Any], None]:
    """Every record of `topic`, partition by partition interleaved, from the start to the end.

    Reading continues past the reported end offsets until a fetch comes back empty: some
    Kafka-protocol brokers (Tansu) report an end short of records already readable.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", group_id=None)
    try:
        await consumer.start()
        if topic not in await consumer.topics():
            return
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while True:
            batches = await consumer.getmany(timeout_ms=FETCH_WAIT_MS, max_records=5000)
            for records in batches.values():
                for record in records:
                    yield record
            if not batches and all([await consumer.position(tp) >= ends[tp] for tp in partitions]):
                return
    finally:
        await consumer.stop()


class CompactedStore:
    """Latest JSON value per key in a compacted topic; a None value deletes."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._declared = False

    async def load(self) -> dict[str, bytes]:
        latest: dict[str, bytes] = {}
        async for record in scan(self.bootstrap, self.topic):
            if record.key is None:
                continue
            if record.value is None:
                latest.pop(record.key.decode(), None)
            else:
                latest[record.key.decode()] = record.value
        return latest

    async def put(self, key: str, value: bytes | None) -> None:
        if not self._declared:  # once per store, not on every write
            await ensure_topic(self.bootstrap, self.topic, configs={"cleanup.policy": "compact"})
            self._declared = True
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        try:
            await producer.start()
            await producer.send_and_wait(self.topic, key=key.encode(), value=value)
        finally:
            await producer.stop()
