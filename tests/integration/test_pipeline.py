"""Issue 1: the walking pipeline on real servers — mixed dataset end to end, and a SIGKILL restart."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ingest_stream.config import SOURCES
from tests.dataset import SINKS, Dataset, mixed_dataset, v2
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, eventually, headers_of

LIMIT = 64 * 1024
PRODUCER_HEADER = ("x-producer", b"integration-test")


def all_topics(prefix: str) -> list[str]:
    return ([f"{prefix}.source.{s}" for s in SOURCES] + [f"{prefix}.sink.{s}" for s in SINKS]
            + [f"{prefix}.dlq"])


def expected_postgres(data: Dataset) -> dict[Any, Any]:
    return {k: {"revision": e.revision, "deleted": e.deleted, "kind": e.kind, "attributes": e.attributes}
            for k, e in data.final.items()}


def expected_graph(data: Dataset) -> dict[Any, Any]:
    return {k: {"revision": e.revision, "deleted": e.deleted, "kind": e.kind} for k, e in data.final.items()}


def expected_edges(data: Dataset) -> set[tuple[str, str, str, str]]:
    return {(t, i, link["rel"], link["to"]) for (t, i), e in data.final.items() for link in e.links}


def expected_search(data: Dataset) -> dict[Any, int]:
    return {k: e.revision for k, e in data.final.items() if not e.deleted}


def dlq_entries(kafka: Kafka, topic: str) -> Counter[tuple[int, int, str, str]]:
    """(origin partition, origin offset, reason, stage) of every DLQ record."""
    entries: Counter[tuple[int, int, str, str]] = Counter()
    for message in kafka.read_all(topic):
        h = headers_of(message)
        entries[(int(h["dlq.origin.partition"]), int(h["dlq.origin.offset"]), h["dlq.reason"],
                 h["dlq.stage"])] += 1
    return entries


def assert_sinks_hold(sinks: SinkReader, data: Dataset) -> None:
    tenants = data.tenants
    assert sinks.postgres(tenants) == expected_postgres(data)
    assert sinks.graph_nodes(tenants) == expected_graph(data)
    assert sinks.graph_edges(tenants) == expected_edges(data)
    assert sinks.search_documents(tenants) == expected_search(data)


def produce(kafka: Kafka, prefix: str, data: Dataset) -> list[tuple[int, int]]:
    return kafka.produce(f"{prefix}.source.kafka",
                         [(m.key, m.value) for m in data.messages], headers=[PRODUCER_HEADER])


def test_mixed_dataset_end_to_end(kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = mixed_dataset(prefix, max_record_bytes=LIMIT)
    kafka.create_topics(all_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT))
    worker.start()
    positions = produce(kafka, prefix, data)
    expected_dlq = Counter((*positions[i], reason, stage) for i, reason, stage in data.dlq)

    def converged() -> None:
        assert_sinks_hold(sinks, data)
        assert dlq_entries(kafka, f"{prefix}.dlq") == expected_dlq

    eventually(converged, timeout_s=180, context=worker.log_tail)
    # Everything the worker read is acknowledged: committed == end on every topic it consumes.
    consumed = [f"{prefix}.source.kafka"] + [f"{prefix}.sink.{s}" for s in SINKS]
    eventually(lambda: _assert_no_lag(kafka, f"it-{prefix}", consumed), timeout_s=30)

    # The DLQ holds the original bytes and headers, with provenance.
    by_position = {positions[i]: data.messages[i] for i in range(len(positions))}
    for message in kafka.read_all(f"{prefix}.dlq"):
        h = headers_of(message)
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
            assert h["dlq.failed.topic"] == f"{prefix}.sink.{sink}"
            assert h["dlq.tenant"] in data.tenants and h["dlq.record_id"]
        else:
            assert message.value() == original.value
            assert "dlq.failed.topic" not in h
        if h["dlq.reason"] == "VALIDATION_FAIL":
            assert h["dlq.error"].startswith("$")  # the failing JSON path
    # Duplicates were dropped silently and counted; nothing older ever overwrote newer.
    assert worker.metric("ingest_duplicates_total", source="kafka") == data.duplicates
    assert sinks.postgres_overwrites_of_newer(data.tenants) == []
    assert worker.metric("ingest_dlq_total", reason="OLDER_REVISION") == sum(
        1 for _, reason, _ in data.dlq if reason == "OLDER_REVISION")


def test_sigkill_mid_stream_then_restart_loses_nothing(kafka: Kafka, sinks: SinkReader, make_worker,
                                                       prefix: str) -> None:
    data = mixed_dataset(prefix, max_record_bytes=LIMIT)
    bulk = f"{prefix}-bulk"
    data.tenants = (*data.tenants, bulk)
    for revision in range(8):
        for entity in range(1500):
            links = [{"rel": "NEXT", "to": f"e-{entity + 1}"}]
            data.add_record(v2(bulk, f"e-{entity}", revision, links=links))
    kafka.create_topics(all_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT))
    worker.start()
    positions = produce(kafka, prefix, data)

    # Kill as soon as the bulk tenant starts reaching Postgres: mid-stream.
    eventually(lambda: _assert_some_rows(sinks, bulk), timeout_s=120, interval_s=0.05,
               context=worker.log_tail)
    worker.kill()
    lag_at_kill = sum(kafka.lag(f"it-{prefix}", [f"{prefix}.source.kafka"]).values())
    assert lag_at_kill > 0, "the worker had finished before the kill: the test proves nothing"

    worker.start()
    expected_dlq = {(*positions[i], reason, stage) for i, reason, stage in data.dlq}

    def converged() -> None:
        assert_sinks_hold(sinks, data)
        assert set(dlq_entries(kafka, f"{prefix}.dlq")) == expected_dlq

    eventually(converged, timeout_s=300, interval_s=2, context=worker.log_tail)
    consumed = [f"{prefix}.source.kafka"] + [f"{prefix}.sink.{s}" for s in SINKS]
    eventually(lambda: _assert_no_lag(kafka, f"it-{prefix}", consumed), timeout_s=30)
    assert sinks.postgres_overwrites_of_newer(data.tenants) == []


def _assert_some_rows(sinks: SinkReader, tenant: str) -> None:
    assert len(sinks.postgres([tenant])) > 0


def _assert_no_lag(kafka: Kafka, group: str, topics: list[str]) -> None:
    lag = kafka.lag(group, topics)
    assert lag, "no committed offsets"
    assert {tp: n for tp, n in lag.items() if n} == {}
