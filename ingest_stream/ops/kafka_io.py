"""Small Kafka helpers for the operator tools: read a topic from the start to its end, make sure a
topic exists. The tools run outside the worker, with plain aiokafka clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
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


async def scan(bootstrap: str, topic: str) -> AsyncIterator[ConsumerRecord[Any, Any]]:
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
