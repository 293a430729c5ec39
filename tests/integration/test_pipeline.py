"""Issue 1: the walking pipeline on real servers — mixed dataset end to end, and a SIGKILL restart."""

from __future__ import annotations

import json
import time
from collections import Counter

from ingest_stream.core.timefmt import epoch_ms
from ingest_stream.stream.watchdog import STALL_EXIT_CODE
from tests.dataset import Dataset, mixed_dataset, v2, with_bulk_tenant
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, eventually, headers_of
from tests.integration.pipeline_helpers import (
    LIMIT,
    PRODUCER_HEADER,
    assert_converged,
    consumed_topics,
    produce_dataset,
    source_topics,
)


def test_mixed_dataset_end_to_end(kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = mixed_dataset(prefix, max_record_bytes=LIMIT)
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT))
    worker.start()
    positions = produce_dataset(kafka, prefix, data)
    source = f"{prefix}.source.kafka"
    expected_dlq = Counter((source, *positions[i], reason, stage) for i, reason, stage in data.dlq)
    # A foreign record written straight to a sink topic is dead-lettered there; the worker survives.
    sink_topic = f"{prefix}.sink.postgres"
    [(partition, offset)] = kafka.produce(sink_topic, [(b"x:y", b'{"not": "a record"}')])
    expected_dlq[(sink_topic, partition, offset, "SCHEMA_DRIFT", "sink.postgres")] += 1

    # The sinks hold the dataset and the DLQ exactly its letters and the foreign record's; everything
    # the worker read is acknowledged (committed == end on every topic it consumes); nothing older
    # ever overwrote newer.
    assert_converged(kafka, sinks, worker, prefix, data=data, dlq=expected_dlq, timeout_s=180,
                     committed=consumed_topics(prefix))

    # The DLQ holds the original bytes and headers, with provenance.
    by_position = {positions[i]: data.messages[i] for i in range(len(positions))}
    for message in kafka.read_all(f"{prefix}.dlq"):
        h = headers_of(message)
        if h["dlq.origin.topic"] == sink_topic:
            assert message.value() == b'{"not": "a record"}'
            assert h["dlq.failed.topic"] == sink_topic
            continue
        origin = (int(h["dlq.origin.partition"]), int(h["dlq.origin.offset"]))
        original = by_position[origin]
        assert h["dlq.origin.topic"] == f"{prefix}.source.kafka"
        assert h["x-producer"] == "integration-test"
        assert h["dlq.error"]
        assert h["dlq.retryable"] == "false"
        assert int(h["dlq.attempts"]) >= 1
        assert "dlq.failed_at" in h and "dlq.origin.timestamp" in h
        if h["dlq.stage"].startswith("sink."):
            sink = h["dlq.stage"].removeprefix("sink.")
            # Spilled: where it failed in the sink topic; written in process: its origin.
            failed = (h["dlq.failed.topic"], h["dlq.failed.partition"], h["dlq.failed.offset"])
            origin_at = (h["dlq.origin.topic"], h["dlq.origin.partition"], h["dlq.origin.offset"])
            assert failed[0] == f"{prefix}.sink.{sink}" or failed == origin_at
            assert h["dlq.tenant"] in data.tenants and h["dlq.record_id"]
        else:
            assert message.value() == original.value
            assert "dlq.failed.topic" not in h
        if h["dlq.reason"] == "VALIDATION_FAIL":
            assert h["dlq.error"].startswith("$")  # the failing JSON path
    # Checkpoints (read from the table's changelog): per tenant and partition, the last offset and
    # the latest event time of the records forwarded.
    assert _checkpoints(kafka, prefix) == _expected_checkpoints(prefix, data, positions)
    # Duplicates were dropped silently and counted.
    assert worker.metric("ingest_duplicates_total", source="kafka") == data.duplicates
    assert worker.metric("ingest_dlq_total", reason="OLDER_REVISION") == sum(
        1 for _, reason, _ in data.dlq if reason == "OLDER_REVISION")


def test_sigkill_mid_stream_then_restart_loses_nothing(kafka: Kafka, sinks: SinkReader, make_worker,
                                                       prefix: str) -> None:
    data = mixed_dataset(prefix, max_record_bytes=LIMIT)
    bulk = f"{prefix}-bulk"
    with_bulk_tenant(data, bulk, revisions=8)
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT), INGEST_STALL_TIMEOUT_S="20",
                                        INGEST_STALL_CHECK_INTERVAL_S="2")
    worker.start()
    positions = produce_dataset(kafka, prefix, data)

    # Kill as soon as the bulk tenant starts reaching Postgres: mid-stream.
    eventually(lambda: _assert_some_rows(sinks, bulk), timeout_s=120, interval_s=0.05,
               context=worker.log_tail)
    worker.kill()
    lag_at_kill = sum(kafka.lag(f"it-{prefix}", [f"{prefix}.source.kafka"]).values())
    assert lag_at_kill > 0, "the worker had finished before the kill: the test proves nothing"

    worker.start()
    # Like an orchestrator: a worker that detects a stall exits (70) and is started again.
    worker.supervise()
    source = f"{prefix}.source.kafka"
    expected_dlq = {(source, *positions[i], reason, stage) for i, reason, stage in data.dlq}

    # Room for a watchdog restart (20 s to detect, then a restart) if the committer is stuck. Only
    # stall exits were restarted; report them (a Faust stream stall seen after restarts).
    assert_converged(kafka, sinks, worker, prefix, data=data, dlq=expected_dlq, exits={STALL_EXIT_CODE},
                     timeout_s=300, interval_s=2, committed=consumed_topics(prefix), commit_timeout_s=120)
    print(f"stall restarts after the SIGKILL: {len(worker.exits)}")


def test_a_second_worker_joins_then_the_first_leaves_mid_stream(kafka: Kafka, sinks: SinkReader, make_worker,
                                                                prefix: str) -> None:
    """Rebalances both ways while records flow: partitions and their dedupe tables move to a new
    worker, then all of them to it when the first stops. Nothing lost, nothing older written, no
    spurious dead letter, every offset committed."""
    data = mixed_dataset(prefix, max_record_bytes=LIMIT)
    with_bulk_tenant(data, f"{prefix}-bulk", revisions=4)
    kafka.create_topics(source_topics(prefix))
    half = len(data.messages) // 2
    source = f"{prefix}.source.kafka"
    # Like an orchestrator: a worker whose watchdog sees a partition stalled exits 70 and is started
    # again, so a stall still converges and the test says what else went wrong; then it fails on the
    # stall itself (a rebalance used to leave a partition that never committed again, README).
    watchdog = {"INGEST_STALL_TIMEOUT_S": "20", "INGEST_STALL_CHECK_INTERVAL_S": "2"}
    first: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT), **watchdog)
    first.start()
    first.supervise()
    positions = kafka.produce(source, [(m.key, m.value) for m in data.messages[:half]],
                              headers=[PRODUCER_HEADER])
    eventually(lambda: _assert_forwarded_some(first), timeout_s=60, context=first.log_tail)

    second: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT), **watchdog)
    second.start()
    second.supervise()
    # Only once the newcomer owns source partitions: otherwise the first could finish everything.
    eventually(lambda: _assert_owns(second, source), timeout_s=120, context=second.log_tail)
    positions += kafka.produce(source, [(m.key, m.value) for m in data.messages[half:]],
                               headers=[PRODUCER_HEADER])
    # The group rebalanced: the newcomer owns source partitions and forwards records from them.
    eventually(lambda: _assert_forwarded_some(second), timeout_s=120, context=second.log_tail)
    assert first.stop() == 0, first.log_tail()

    expected_dlq = {(source, *positions[i], reason, stage) for i, reason, stage in data.dlq}

    assert_converged(kafka, sinks, second, prefix, data=data, dlq=expected_dlq, timeout_s=240, interval_s=2,
                     committed=consumed_topics(prefix), commit_timeout_s=60)
    assert (first.exits, second.exits) == ([], []), "a worker stalled (exit 70) and was restarted"


def _assert_owns(worker: WorkerProcess, topic: str) -> None:
    owned = [line for line in worker.log_tail(400).splitlines()
             if "partitions owned after the rebalance" in line]
    assert owned and f"{topic}[" in owned[-1], owned[-1:] or "no rebalance logged yet"


def _assert_forwarded_some(worker: WorkerProcess) -> None:
    assert worker.metric("ingest_records_total", source="kafka", outcome="forwarded") > 0


def _checkpoints(kafka: Kafka, prefix: str) -> dict[str, tuple[int, int]]:
    latest: dict[str, tuple[int, int]] = {}
    for message in kafka.read_all(f"it-{prefix}-checkpoints-kafka-changelog"):
        value = json.loads(message.value())
        value = json.loads(value) if isinstance(value, str) else value
        latest[message.key().decode().strip('"')] = (value["offset"], value["event_time_ms"])
    return latest


def _expected_checkpoints(prefix: str, data: Dataset, positions: list[tuple[int, int]]
                          ) -> dict[str, tuple[int, int]]:
    expected: dict[str, tuple[int, int]] = {}
    for (partition, offset), message in zip(positions, data.messages, strict=True):
        if message.rejected or message.duplicate:
            continue
        record = json.loads(message.value)
        event_ms = epoch_ms(record.get("event_time") or record["ts"])
        key = f"{record['tenant']}:kafka:{partition}"
        previous = expected.get(key, (-1, event_ms))
        expected[key] = (max(previous[0], offset), max(previous[1], event_ms))
    return expected


def _assert_some_rows(sinks: SinkReader, tenant: str) -> None:
    assert len(sinks.postgres([tenant])) > 0


def test_dedupe_keys_expire_and_are_evicted(kafka: Kafka, sinks: SinkReader, make_worker,
                                            prefix: str) -> None:
    tenant = f"{prefix}-ttl"
    records = [(f"{tenant}:d{i}".encode(), json.dumps(v2(tenant, f"d{i}", 1)).encode()) for i in range(5)]
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_DEDUPE_TTL_S="1", INGEST_DEDUPE_EVICT_INTERVAL_S="0.5")
    worker.start()
    kafka.produce(f"{prefix}.source.kafka", records)
    eventually(lambda: _assert_evicted(worker, 5), timeout_s=60, context=worker.log_tail)
    # The same bytes again after the TTL: new to the dedupe table, an equal revision to the sinks.
    kafka.produce(f"{prefix}.source.kafka", records)
    eventually(lambda: _assert_forwarded(worker, 10), timeout_s=60, context=worker.log_tail)
    assert worker.metric("ingest_duplicates_total", source="kafka") == 0
    assert {k: v["revision"] for k, v in sinks.postgres([tenant]).items()} == {
        (tenant, f"d{i}"): 1 for i in range(5)}


def _assert_evicted(worker: WorkerProcess, count: int) -> None:
    assert worker.metric("ingest_dedupe_evicted_total", source="kafka") >= count


def _assert_forwarded(worker: WorkerProcess, count: int) -> None:
    assert worker.metric("ingest_records_total", source="kafka", outcome="forwarded") == count


def test_records_trickling_in_one_by_one_all_arrive(kafka: Kafka, sinks: SinkReader, make_worker,
                                                    prefix: str) -> None:
    """One record at a time, with pauses: the producer's metadata refreshes in between (a stall
    here once parked a changelog batch forever, and every commit behind it)."""
    tenant = f"{prefix}-trickle"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker()
    worker.start()
    for i in range(12):
        record = v2(tenant, f"d{i}", 1)
        kafka.produce(f"{prefix}.source.kafka", [(f"{tenant}:d{i}".encode(), json.dumps(record).encode())])
        if i == 6:  # an older revision: the DLQ topic is first written mid-trickle
            older = json.dumps(v2(tenant, "d0", 0)).encode()
            kafka.produce(f"{prefix}.source.kafka", [(f"{tenant}:d0".encode(), older)])
        time.sleep(0.4)  # pacing the producer, not waiting for a result
    expected = {(tenant, f"d{i}"): 1 for i in range(12)}
    assert_converged(kafka, sinks, worker, prefix, revisions=expected, timeout_s=60,
                     committed=[f"{prefix}.source.kafka"])
