"""Issue 20: the in-process fan-out's spill lanes under failure.

A sink that is down spills to its topic while the others are written in process; a worker killed
(-9) while a lane spills, or while it switches back, and a rebalance while a lane spills, lose
nothing, dead-letter nothing and never write an older revision over a newer one (the audit trigger
of `assert_converged`).
"""

from __future__ import annotations

import warnings

import pytest

from ingest_stream.ops.devstack import DevStack
from ingest_stream.stream.watchdog import STALL_EXIT_CODE
from tests.dataset import Dataset
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, assert_equal, eventually
from tests.integration.pipeline_helpers import assert_converged, consumed_topics, source_topics
from tests.integration.test_chaos import FAST_RECOVERY, bulk, sink_states

SPILLING, DIRECT = 1, 0
LANES = {**FAST_RECOVERY, "INGEST_SINK_FAILURE_POLICY": "hold", "INGEST_SINK_LANE_MAX_WAIT_S": "1"}
WATCHDOG = {"INGEST_STALL_TIMEOUT_S": "20", "INGEST_STALL_CHECK_INTERVAL_S": "2"}


def lane(worker: WorkerProcess, sink: str) -> float:
    return worker.metric("ingest_sink_lane_state", sink=sink)


def spilled(worker: WorkerProcess, sink: str) -> float:
    return worker.metric("ingest_sink_spilled_records_total", sink=sink)


def _assert_lane(worker: WorkerProcess, sink: str, mode: int) -> None:
    assert lane(worker, sink) == mode


def _assert_spilled(worker: WorkerProcess, sink: str, at_least: int) -> None:
    assert spilled(worker, sink) >= at_least


def _started_in_process(worker: WorkerProcess, kafka: Kafka, prefix: str, data: Dataset) -> WorkerProcess:
    """The worker started on the data's first 600 records, its Typesense lane in process."""
    kafka.create_topics(source_topics(prefix))
    worker.start()
    kafka.produce(f"{prefix}.source.kafka", [(m.key, m.value) for m in data.messages[:600]])
    eventually(lambda: _assert_lane(worker, "typesense", DIRECT), timeout_s=60, context=worker.log_tail)
    return worker


def test_a_down_sink_spills_while_the_others_go_on_and_a_kill_while_spilling_loses_nothing(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = bulk(prefix)  # 600 entities, 4 revisions each
    state = sink_states(sinks, data)
    source = f"{prefix}.source.kafka"
    worker = _started_in_process(make_worker(**LANES), kafka, prefix, data)

    with stack.server_down("typesense"):
        kafka.produce(source, [(m.key, m.value) for m in data.messages[600:1800]])
        eventually(lambda: _assert_lane(worker, "typesense", SPILLING), timeout_s=60, context=worker.log_tail)
        eventually(lambda: _assert_spilled(worker, "typesense", 1), timeout_s=60, context=worker.log_tail)
        # Postgres is written in process all along: its lane never left.
        assert lane(worker, "postgres") == DIRECT
        worker.kill()
        worker.start()
        kafka.produce(source, [(m.key, m.value) for m in data.messages[1800:]])
        for other in ("postgres", "neo4j"):  # complete while Typesense is still down
            eventually(lambda other=other: assert_equal(*state[other]()), timeout_s=120,
                       context=worker.log_tail)
        assert lane(worker, "typesense") == SPILLING  # restarted: it drains first, and the sink is down

    assert_converged(kafka, sinks, worker, prefix, data=data, dlq=set(), exits=set(), timeout_s=180,
                     interval_s=1, committed=consumed_topics(prefix))
    eventually(lambda: _assert_lane(worker, "typesense", DIRECT), timeout_s=60, context=worker.log_tail)


def test_a_kill_while_a_lane_switches_back_loses_nothing(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    data = bulk(prefix)
    source = f"{prefix}.source.kafka"
    # Switch back only once the topic is nearly drained, so that the switch is a window to hit.
    worker = _started_in_process(make_worker(**LANES, INGEST_SINK_LANE_SWITCH_BACKLOG="200"), kafka,
                                 prefix, data)

    with stack.server_down("typesense"):
        kafka.produce(source, [(m.key, m.value) for m in data.messages[600:1800]])
        eventually(lambda: _assert_spilled(worker, "typesense", 600), timeout_s=60, context=worker.log_tail)
    kafka.produce(source, [(m.key, m.value) for m in data.messages[1800:]])  # records while it recovers
    eventually(lambda: _assert_lane_left_spilling(worker), timeout_s=120, interval_s=0.01,
               context=worker.log_tail)
    worker.kill()
    worker.start()

    assert_converged(kafka, sinks, worker, prefix, data=data, dlq=set(), exits=set(), timeout_s=180,
                     interval_s=1, committed=consumed_topics(prefix))
    eventually(lambda: _assert_lane(worker, "typesense", DIRECT), timeout_s=60, context=worker.log_tail)


def _assert_lane_left_spilling(worker: WorkerProcess) -> None:
    assert lane(worker, "typesense") != SPILLING


@pytest.mark.filterwarnings("default:watchdog restarts")  # shown in the summary, not an error
def test_a_rebalance_while_a_lane_spills_loses_nothing(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    """A second worker joins while the first one's Typesense lane spills, and the first then leaves:
    partitions move with records spilled to the Typesense topic, which their new owner drains
    before it writes any of theirs in process.

    Under `hold` Faust's rebalance waits for the in-flight batch of the down sink's agent, so the
    rebalance begun during the outage completes once Typesense answers again (docs/design.md).

    The workers run as in production, watchdog on and restarted when it exits (70). Here the
    second rebalance's recovery can wait for good on changelog records dropped at the rebalance
    (docs/design.md, "a stall after a double rebalance": one drop path fixed, one not yet); a
    restart still passes, for nothing is lost, but it is reported in pytest's warnings summary
    with the stall's log."""
    data = bulk(prefix)
    source = f"{prefix}.source.kafka"
    first = _started_in_process(make_worker(**LANES, **WATCHDOG), kafka, prefix, data)
    first.supervise()

    second: WorkerProcess = make_worker(**LANES, **WATCHDOG)
    with stack.server_down("typesense"):
        kafka.produce(source, [(m.key, m.value) for m in data.messages[600:1200]])
        eventually(lambda: _assert_spilled(first, "typesense", 1), timeout_s=60, context=first.log_tail)
        second.start()  # the rebalance begins while the lane spills
        eventually(lambda: _assert_joined(second), timeout_s=60, context=second.log_tail)
        second.supervise()
    kafka.produce(source, [(m.key, m.value) for m in data.messages[1200:1800]])
    # Both write Postgres in process once the rebalance is done.
    eventually(lambda: _assert_at_revision(sinks, data.tenants, 600, 2), timeout_s=120,
               context=second.log_tail)
    assert first.stop() == 0  # another rebalance: the second takes every partition and what is left
    kafka.produce(source, [(m.key, m.value) for m in data.messages[1800:]])

    assert_converged(kafka, sinks, second, prefix, data=data, dlq=set(), exits={STALL_EXIT_CODE},
                     timeout_s=240, interval_s=1, committed=consumed_topics(prefix))
    eventually(lambda: _assert_lane(second, "typesense", DIRECT), timeout_s=60, context=second.log_tail)
    if first.exits or second.exits:  # passed, but said where CI shows it: the warnings summary
        stalls = [line for worker in (first, second)
                  for line in worker.log_path.read_text(errors="replace").splitlines() if "stall: " in line]
        warnings.warn("\n".join([f"watchdog restarts: first {first.exits}, second {second.exits}",
                                  *stalls]), stacklevel=1)


def _assert_joined(worker: WorkerProcess) -> None:
    assert "Joined group" in worker.log_tail(400)


def _assert_at_revision(sinks: SinkReader, tenants: tuple[str, ...], entities: int, revision: int) -> None:
    rows = sinks.postgres(tenants)
    assert len(rows) == entities and {row["revision"] for row in rows.values()} == {revision}
