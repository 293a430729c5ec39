"""Issue 2: sinks that survive — a sink server stopped mid-run, then brought back."""

from __future__ import annotations

import pytest

from ingest_stream.ops.devstack import DevStack
from tests.dataset import Dataset, v2
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, eventually
from tests.integration.test_pipeline import expected_postgres, expected_search, source_topics

FAST_RECOVERY = {
    "INGEST_BREAKER_OPEN_S": "2", "INGEST_SINK_RETRY_BASE_S": "0.1", "INGEST_SINK_RETRY_CAP_S": "1",
    "INGEST_SINK_TIMEOUT_S": "3",
}


def bulk(prefix: str, entities: int = 600, revisions: int = 4) -> Dataset:
    data = Dataset(tenants=(f"{prefix}-chaos",))
    for revision in range(revisions):
        for entity in range(entities):
            data.add_record(v2(data.tenants[0], f"e-{entity}", revision))
    return data


@pytest.mark.parametrize("down", ["typesense", "postgres"])
def test_a_sink_down_with_hold_policy_completes_with_no_dlq(
        down: str, stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = bulk(prefix)
    tenants = data.tenants
    state = {
        "postgres": lambda: (sinks.postgres(tenants), expected_postgres(data)),
        "typesense": lambda: (sinks.search_documents(tenants), expected_search(data)),
    }
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_SINK_FAILURE_POLICY="hold", **FAST_RECOVERY)
    worker.start()
    kafka.produce(f"{prefix}.source.kafka", [(m.key, m.value) for m in data.messages[:600]])
    eventually(lambda: _assert_some(state[down]()[0]), timeout_s=60, interval_s=0.1, context=worker.log_tail)

    with stack.server_down(down):
        kafka.produce(f"{prefix}.source.kafka", [(m.key, m.value) for m in data.messages[600:]])
        eventually(lambda: _assert_circuit(worker, down, 2), timeout_s=60, context=worker.log_tail)
        # The other sinks are not held back by this one's outage.
        for other in set(state) - {down}:
            eventually(lambda other=other: _assert_equal(*state[other]()), timeout_s=120,
                       context=worker.log_tail)

    eventually(lambda: _assert_equal(*state[down]()), timeout_s=120, context=worker.log_tail)
    eventually(lambda: _assert_circuit(worker, down, 0), timeout_s=30)
    assert worker.metric("ingest_circuit_transitions_total", sink=down, state="open") >= 1
    assert worker.metric("ingest_circuit_transitions_total", sink=down, state="closed") >= 1
    assert worker.metric("ingest_dlq_total") == 0
    if _topic_exists(kafka, f"{prefix}.dlq"):  # independent of the worker's own count
        assert kafka.read_all(f"{prefix}.dlq") == []


def _topic_exists(kafka: Kafka, topic: str) -> bool:
    from confluent_kafka.admin import AdminClient

    return topic in AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics


def _assert_some(found: dict[object, object]) -> None:
    assert found


def _assert_equal(actual: object, expected: object) -> None:
    assert actual == expected


def _assert_circuit(worker: WorkerProcess, sink: str, state: int) -> None:
    assert worker.metric("ingest_circuit_state", sink=sink) == state

