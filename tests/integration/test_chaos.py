"""Issue 3: sinks that survive — a sink server stopped mid-run, then brought back."""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest

from ingest_stream.ops.devstack import DevStack
from ingest_stream.stream.watchdog import STALL_EXIT_CODE
from tests.dataset import Dataset, mixed_dataset, v2, with_bulk_tenant
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, assert_equal, eventually, headers_of
from tests.integration.pipeline_helpers import (
    LIMIT,
    assert_converged,
    consumed_topics,
    dlq_entries,
    dlqtriage,
    expected_graph,
    expected_postgres,
    expected_search,
    produce_dataset,
    source_topics,
)

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


def sink_states(sinks: SinkReader, data: Dataset) -> dict[str, Any]:
    """Per sink: a function returning (what the sink holds, what it should hold)."""
    tenants = data.tenants
    return {
        "postgres": lambda: (sinks.postgres(tenants), expected_postgres(data)),
        "neo4j": lambda: (sinks.graph_nodes(tenants), expected_graph(data)),
        "typesense": lambda: (sinks.search_documents(tenants), expected_search(data)),
    }


SERVER_OF = {"postgres": "postgres", "neo4j": "graph", "typesense": "typesense"}


@pytest.mark.parametrize("down", ["typesense", "postgres", "neo4j"])
def test_a_sink_down_with_hold_policy_completes_with_no_dlq(
        down: str, stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = bulk(prefix)
    state = sink_states(sinks, data)
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_SINK_FAILURE_POLICY="hold", **FAST_RECOVERY)
    worker.start()
    kafka.produce(f"{prefix}.source.kafka", [(m.key, m.value) for m in data.messages[:600]])
    eventually(lambda: _assert_some(state[down]()[0]), timeout_s=60, interval_s=0.1, context=worker.log_tail)

    with stack.server_down(SERVER_OF[down]):
        kafka.produce(f"{prefix}.source.kafka", [(m.key, m.value) for m in data.messages[600:]])
        eventually(lambda: _assert_circuit(worker, down, 2), timeout_s=60, context=worker.log_tail)
        # Still ready (Kubernetes): the sources go on while this sink's agent holds.
        assert readiness(worker) == (200, [])
        health = worker.get_json("/health/detailed")
        assert health["status"] == "degraded"
        assert health["sinks"][down]["circuit"] in ("open", "half-open")
        assert health["sinks"][down]["last_error"]["reason"] in ("CONNECTION_ERROR", "CIRCUIT_OPEN",
                                                                 "SINK_TIMEOUT")
        # The other sinks are not held back by this one's outage.
        for other in set(state) - {down}:
            eventually(lambda other=other: assert_equal(*state[other]()), timeout_s=120,
                       context=worker.log_tail)

    eventually(lambda: assert_equal(*state[down]()), timeout_s=120, context=worker.log_tail)
    eventually(lambda: _assert_circuit(worker, down, 0), timeout_s=30)
    assert worker.get_json("/health/detailed")["sinks"][down]["circuit"] == "closed"
    # Its lane spilled to its topic meanwhile, and is back in process once that topic is drained.
    assert worker.metric("ingest_sink_spilled_records_total", sink=down) > 0
    eventually(lambda: _assert_lane_direct(worker, down), timeout_s=60, context=worker.log_tail)
    assert readiness(worker) == (200, [])
    assert worker.metric("ingest_circuit_transitions_total", sink=down, state="open") >= 1
    assert worker.metric("ingest_circuit_transitions_total", sink=down, state="closed") >= 1
    assert worker.metric("ingest_dlq_total") == 0
    if _topic_exists(kafka, f"{prefix}.dlq"):  # independent of the worker's own count
        assert kafka.read_all(f"{prefix}.dlq") == []


def test_a_sink_down_with_dlq_policy_dead_letters_its_records_and_a_redrive_completes_it(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = bulk(prefix)
    state = sink_states(sinks, data)
    source = f"{prefix}.source.kafka"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_SINK_FAILURE_POLICY="dlq", INGEST_SINK_RETRY_ATTEMPTS="5",
                                        **FAST_RECOVERY)
    worker.start()
    kafka.produce(source, [(m.key, m.value) for m in data.messages[:600]])
    eventually(lambda: _assert_count(sinks.search_documents(data.tenants), 600), timeout_s=60,
               interval_s=0.2, context=worker.log_tail)

    with stack.server_down("typesense"):
        during = kafka.produce(source, [(m.key, m.value) for m in data.messages[600:]])
        expected = Counter((source, partition, offset, "sink.typesense") for partition, offset in during)
        # Exactly the records Typesense missed are dead-lettered, for Typesense only.
        eventually(lambda: assert_equal(_dlq_positions(kafka, prefix), expected), timeout_s=180,
                   interval_s=2, context=worker.log_tail)
        for other in ("postgres", "neo4j"):  # the graph server may still be writing the last batches
            eventually(lambda other=other: assert_equal(*state[other]()), timeout_s=120,
                       context=worker.log_tail)
    reasons = {entry[3] for entry in dlq_entries(kafka, f"{prefix}.dlq")}
    assert reasons <= {"CONNECTION_ERROR", "CIRCUIT_OPEN", "SINK_TIMEOUT"}, reasons
    assert worker.metric("ingest_circuit_transitions_total", sink="typesense", state="open") >= 1
    postgres_writes = len(sinks.audit(data.tenants))

    summary = dlqtriage(worker, "summary", "--tenant", data.tenants[0], "--json")
    assert summary["total"] == len(expected)
    assert {g["stage"] for g in summary["groups"]} == {"sink.typesense"}
    assert summary["retryable_share"] == 1.0
    dry = dlqtriage(worker, "redrive", "--tenant", data.tenants[0], "--dry-run", "--json")
    assert dry["sent"] == len(expected)
    assert dlqtriage(worker, "summary", "--json")["total"] == len(expected)  # the dry run changed nothing

    done = dlqtriage(worker, "redrive", "--tenant", data.tenants[0],
                     "--reason", "CONNECTION_ERROR,CIRCUIT_OPEN,SINK_TIMEOUT", "--json")
    assert done["sent_by_topic"] == {f"{prefix}.sink.typesense": len(expected)}
    eventually(lambda: assert_equal(*state["typesense"]()), timeout_s=120, context=worker.log_tail)
    eventually(lambda: _assert_circuit(worker, "typesense", 0), timeout_s=30)
    assert worker.metric("ingest_circuit_transitions_total", sink="typesense", state="closed") >= 1
    assert worker.metric("ingest_sink_spilled_records_total", sink="typesense") > 0
    eventually(lambda: _assert_lane_direct(worker, "typesense"), timeout_s=60, context=worker.log_tail)
    # The redrive went to Typesense only: no sink was written again, nothing came back to the DLQ.
    assert len(sinks.audit(data.tenants)) == postgres_writes
    assert _dlq_positions(kafka, prefix) == expected
    # Running it again sends nothing: each dead letter is redriven once.
    assert dlqtriage(worker, "redrive", "--tenant", data.tenants[0], "--json")["sent"] == 0
    assert dlqtriage(worker, "summary", "--json", "--status", "redriven")["total"] == len(expected)


def _dlq_positions(kafka: Kafka, prefix: str) -> Counter[tuple[str, int, int, str]]:
    """How many dead letters each (origin topic, partition, offset, stage) has."""
    found: Counter[tuple[str, int, int, str]] = Counter()
    for (topic, partition, offset, _reason, stage), count in dlq_entries(kafka, f"{prefix}.dlq").items():
        found[(topic, partition, offset, stage)] += count
    return found


def _assert_count(found: dict[object, object], count: int) -> None:
    assert len(found) == count


def _topic_exists(kafka: Kafka, topic: str) -> bool:
    from confluent_kafka.admin import AdminClient

    return topic in AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics


def _assert_some(found: dict[object, object]) -> None:
    assert found



def _assert_circuit(worker: WorkerProcess, sink: str, state: int) -> None:
    assert worker.metric("ingest_circuit_state", sink=sink) == state


def _assert_lane_direct(worker: WorkerProcess, sink: str) -> None:
    assert worker.metric("ingest_sink_lane_state", sink=sink) == 0



def test_a_constraint_violation_goes_straight_to_the_dlq_for_that_sink_only(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    """An operator's own CHECK constraint on the table refuses some records: no retry, one dead
    letter each for Postgres, and the other sinks take them."""
    tenant = f"{prefix}-refusals"
    refused = {f"refused-{i}" for i in range(3)}
    ids = [f"ok-{i}" for i in range(40)] + sorted(refused)
    constraint = f"test_refuse_{prefix}"
    sinks.execute(f"ALTER TABLE ingest_records ADD CONSTRAINT {constraint} "
                  f"CHECK (tenant <> '{tenant}' OR id NOT LIKE 'refused-%')")
    try:
        kafka.create_topics(source_topics(prefix))
        worker: WorkerProcess = make_worker(INGEST_SINK_FAILURE_POLICY="hold", **FAST_RECOVERY)
        worker.start()
        positions = kafka.produce(f"{prefix}.source.kafka", [
            (f"{tenant}:{i}".encode(), json.dumps(v2(tenant, i, 1)).encode()) for i in ids])
        by_id = dict(zip(ids, positions, strict=True))
        expected = Counter((f"{prefix}.source.kafka", *by_id[i], "CONSTRAINT_VIOLATION", "sink.postgres")
                           for i in refused)
        eventually(lambda: assert_equal(dlq_entries(kafka, f"{prefix}.dlq"), expected), timeout_s=90,
                   context=worker.log_tail)
        everyone = {(tenant, i): 1 for i in ids}
        eventually(lambda: assert_equal(sinks.search_documents([tenant]), everyone), timeout_s=60)
        eventually(lambda: assert_equal(_revisions(sinks.graph_nodes([tenant])), everyone), timeout_s=60)
        accepted = {k: v for k, v in everyone.items() if k[1] not in refused}
        assert _revisions(sinks.postgres([tenant])) == accepted
        for message in kafka.read_all(f"{prefix}.dlq"):
            assert headers_of(message)["dlq.attempts"] == "1"  # not retried
            assert headers_of(message)["dlq.retryable"] == "false"
    finally:
        sinks.execute(f"ALTER TABLE ingest_records DROP CONSTRAINT {constraint}")


def test_a_hung_sink_times_out_is_retried_then_dead_lettered(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    tenant = f"{prefix}-hung"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(
        INGEST_SINK_FAILURE_POLICY="dlq", INGEST_SINK_RETRY_ATTEMPTS="3", INGEST_SINK_TIMEOUT_S="1",
        INGEST_SINK_RETRY_BASE_S="0.1", INGEST_SINK_RETRY_CAP_S="0.5",
        # Keep the circuit closed, so every attempt reaches the frozen server and times out.
        INGEST_BREAKER_FAILURE_THRESHOLD="1000", INGEST_BREAKER_WINDOW="1000")
    worker.start()
    records = [(f"{tenant}:h{i}".encode(), json.dumps(v2(tenant, f"h{i}", 1)).encode()) for i in range(20)]
    kafka.produce(f"{prefix}.source.kafka", records[:1])  # every sink is open and warm before the freeze
    for read in (sinks.search_documents, sinks.postgres, sinks.graph_nodes):
        eventually(lambda read=read: _assert_count(read([tenant]), 1), timeout_s=60, context=worker.log_tail)
    with stack.server_paused("typesense"):
        positions = kafka.produce(f"{prefix}.source.kafka", records[1:])
        expected = Counter((f"{prefix}.source.kafka", p, o, "SINK_TIMEOUT", "sink.typesense")
                           for p, o in positions)
        eventually(lambda: assert_equal(dlq_entries(kafka, f"{prefix}.dlq"), expected), timeout_s=120,
                   context=worker.log_tail)
    for message in kafka.read_all(f"{prefix}.dlq"):
        assert headers_of(message)["dlq.attempts"] == "3"
        assert headers_of(message)["dlq.retryable"] == "true"
    assert worker.metric("ingest_retry_total", sink="typesense", reason="SINK_TIMEOUT") >= 3
    # Postgres and the graph were not held back by the hung search server.
    assert len(sinks.postgres([tenant])) == 20
    assert len(sinks.graph_nodes([tenant])) == 20


def _assert_progress(sinks: SinkReader, tenant: str, writes: int, kafka: Kafka, prefix: str) -> None:
    if len(sinks.audit([tenant])) < writes:
        lag = kafka.lag(f"it-{prefix}", [f"{prefix}.source.kafka"])
        assert not lag or sum(lag.values()) == 0, f"fewer than {writes} writes, source lag {lag}"


def _revisions(found: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], int]:
    return {k: v["revision"] for k, v in found.items()}


def test_kill_loop_sigkill_at_random_moments_loses_nothing_and_writes_nothing_older(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = mixed_dataset(prefix, max_record_bytes=LIMIT)
    loop = f"{prefix}-loop"
    with_bulk_tenant(data, loop, revisions=6)
    source = f"{prefix}.source.kafka"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT), INGEST_STALL_TIMEOUT_S="20",
                                        INGEST_STALL_CHECK_INTERVAL_S="2")
    worker.start()
    worker.supervise()  # a stall exit (70) is restarted like an orchestrator would; the kills are ours
    positions = produce_dataset(kafka, prefix, data)

    rng = random.Random(int(prefix[1:], 16))  # the seed is in the test's prefix: a failure can be replayed
    kills_mid_stream = 0
    for _ in range(4):
        # A random moment: after a random amount of progress since the restart (or the end).
        target = len(sinks.audit([loop])) + rng.randint(1, 1500)
        eventually(lambda target=target: _assert_progress(sinks, loop, target, kafka, prefix),
                   timeout_s=120, interval_s=0.05, context=worker.log_tail)
        worker.kill()
        # Mid-stream: records not yet committed on the source topic or on a sink topic.
        kills_mid_stream += sum(kafka.lag(f"it-{prefix}", consumed_topics(prefix)).values()) > 0
        worker.start()
    assert kills_mid_stream >= 2, "the run ended before the kills: the test proves little"

    expected_dlq = {(source, *positions[i], reason, stage) for i, reason, stage in data.dlq}

    # Every letter expected and nothing spurious; never an older revision over a newer; only stall
    # exits (restarted).
    assert_converged(kafka, sinks, worker, prefix, data=data, dlq=expected_dlq, exits={STALL_EXIT_CODE},
                     timeout_s=300, interval_s=2)
    # Copies re-published after a kill are one failure each to the operator.
    summary = dlqtriage(worker, "summary", "--json")
    assert summary["total"] == len(expected_dlq)
    assert set(worker.exits) <= {STALL_EXIT_CODE}, worker.exits
    print(f"kills mid-stream: {kills_mid_stream}; DLQ copies re-published: {summary['repeats']}; "
          f"stall restarts: {len(worker.exits)}")


def readiness(worker: WorkerProcess) -> tuple[int, list[str]]:
    """`GET /health/ready`: its status and what it waits for."""
    url = f"http://127.0.0.1:{worker.web_port}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.load(response)["waiting_for"]
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)["waiting_for"]
