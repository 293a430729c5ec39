"""Issue 16: no record stops the pipeline. Every hostile class of tests/hostile.py, between good
records, through one worker on the real servers: the worker never exits, every good (and odd but
valid) record lands in all three sinks, every hostile one is dead-lettered once with its reason,
and nothing reaches a topic the records name in forged headers."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

from aiokafka import AIOKafkaProducer

from tests.dataset import v2
from tests.hostile import CLASSES, Context, Hostile, batch, build, good, with_header_name_bytes
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, headers_of
from tests.integration.pipeline_helpers import assert_converged, source_topics

LIMIT = 32 * 1024


def test_every_hostile_class_is_dead_lettered_or_lands_and_the_worker_goes_on(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    tenant = f"{prefix}-acme"
    rng = random.Random(16)
    records: list[Hostile] = []
    for index, kind in enumerate(CLASSES * 2):  # each class twice, a good record before each
        records.append(good(Context(tenant, f"good-{index}", LIMIT, prefix, rng)))
        records.append(build(kind, Context(tenant, f"{kind}-{index}", LIMIT, prefix, rng)))
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT))
    worker.start()
    worker.supervise(restart_on=())  # records any exit: there must be none
    source = f"{prefix}.source.kafka"
    positions = kafka.produce(source, [(r.key, r.value) for r in records],
                              headers_each=[r.headers for r in records])

    landing = {(r.record["tenant"], r.record["id"]): r.record["revision"] for r in records if r.record}
    expected_dlq = Counter((source, *positions[i], *r.expect) for i, r in enumerate(records) if r.expect)

    assert_converged(kafka, sinks, worker, prefix, revisions=landing, dlq=expected_dlq, exits=(),
                     timeout_s=180)
    assert worker.process is not None and worker.process.poll() is None, "the worker is not running"

    # Each letter fits, points at the source position (never at a forged origin), and a cut value
    # says so; nothing was written to the topics forged headers name.
    by_position = {positions[i]: r for i, r in enumerate(records)}
    for message in kafka.read_all(f"{prefix}.dlq"):
        h = headers_of(message)
        original = by_position[(int(h["dlq.origin.partition"]), int(h["dlq.origin.offset"]))]
        assert h["dlq.origin.topic"] == source
        if original.value is not None and len(original.value) > LIMIT + 64 * 1024:
            assert h["dlq.value_truncated"] == "true"
            assert int(h["dlq.value_bytes"]) == len(original.value)
            assert original.value.startswith(message.value())
        else:
            assert "dlq.value_truncated" not in h
            assert message.value() == original.value
    for topic in (f"{prefix}.legal.holds", f"{prefix}.dlq.status"):
        assert topic not in kafka_topics(kafka), f"{topic} was created"
    assert worker.metric("ingest_unexpected_errors_total") == 0


def kafka_topics(kafka: Kafka) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics)


def test_a_header_name_that_is_not_utf8_does_not_stop_the_consumer(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    """aiokafka's reader raises on such a name, for the whole fetch: the worker stopped on it after
    every restart. Read leniently, both records of the batch land."""
    tenant = f"{prefix}-acme"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker()
    worker.start()
    worker.supervise(restart_on=())
    first, second = v2(tenant, "named-oddly", 1), v2(tenant, "after-it", 1)
    raw = with_header_name_bytes(batch((json.dumps(first).encode(), [("ZZ", b"v")]),
                                       (json.dumps(second).encode(), [])), b"ZZ", b"\xff\xfe")
    asyncio.run(send_raw_batch(kafka.bootstrap, f"{prefix}.source.kafka", raw))
    expected = {(tenant, "named-oddly"): 1, (tenant, "after-it"): 1}
    assert_converged(kafka, sinks, worker, prefix, revisions=expected, exits=(), timeout_s=120)


async def send_raw_batch(bootstrap: str, topic: str, raw: bytes) -> None:
    """Send a record batch's bytes as they are (aiokafka's batch API, its built buffer replaced)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        carrier = producer.create_batch()
        carrier.append(key=None, value=b"placeholder", timestamp=None)
        carrier._buffer = raw
        await (await producer.send_batch(carrier, topic, partition=0))
    finally:
        await producer.stop()


def test_batches_compressed_with_every_codec_a_producer_may_use_are_read(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    """Without its codecs installed, aiokafka raised on an lz4, snappy or zstd batch in the fetcher:
    the worker stopped on it after every restart."""
    tenant = f"{prefix}-acme"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker()
    worker.start()
    worker.supervise(restart_on=())
    codecs = ("gzip", "snappy", "lz4", "zstd")
    for codec in codecs:
        record = v2(tenant, f"by-{codec}", 1)
        value = json.dumps(record).encode()
        kafka.produce(f"{prefix}.source.kafka", [(f"{tenant}:by-{codec}".encode(), value)], compression=codec)
    expected = {(tenant, f"by-{codec}"): 1 for codec in codecs}
    assert_converged(kafka, sinks, worker, prefix, revisions=expected, exits=(), timeout_s=120)
