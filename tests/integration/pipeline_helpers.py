"""What the integration modules share beyond the harness's machinery: the topics of a test's
prefix, what the sinks and the DLQ should hold for a dataset, and `assert_converged`, the check
that the pipeline has finished with a test's records.

Like the harness, nothing here checks results through the product's own Kafka or sink code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ingest_stream.config import SOURCES
from tests.dataset import SINKS, Dataset
from tests.integration.harness import (
    Kafka,
    SinkReader,
    WorkerProcess,
    assert_equal,
    eventually,
    headers_of,
    run_tool,
)

LIMIT = 64 * 1024  # INGEST_MAX_RECORD_BYTES for the mixed dataset (its oversized records exceed it)
PRODUCER_HEADER = ("x-producer", b"integration-test")

DlqEntry = tuple[str, int, int, str, str]  # (origin topic, partition, offset, reason, stage)


def source_topics(prefix: str) -> list[str]:
    """What an upstream producer's platform would create; the worker creates the rest itself."""
    return [f"{prefix}.source.{s}" for s in SOURCES]


def consumed_topics(prefix: str) -> list[str]:
    """The topics the worker's group consumes for the Kafka source: it, then one per sink."""
    return [f"{prefix}.source.kafka"] + [f"{prefix}.sink.{s}" for s in SINKS]


def produce_dataset(kafka: Kafka, prefix: str, data: Dataset) -> list[tuple[int, int]]:
    """The dataset's messages to the Kafka source, in order, each with PRODUCER_HEADER."""
    return kafka.produce(f"{prefix}.source.kafka",
                         [(m.key, m.value) for m in data.messages], headers=[PRODUCER_HEADER])


def dlqtriage(worker: WorkerProcess, *args: str, json_output: bool = True, expect_exit: int = 0) -> Any:
    return run_tool(worker, "ingest_stream.ops.dlqtriage", *args, json_output=json_output,
                    expect_exit=expect_exit)


# --- what the sinks and the DLQ hold -------------------------------------------------------------
def expected_postgres(data: Dataset) -> dict[Any, Any]:
    return {k: {"revision": e.revision, "deleted": e.deleted, "kind": e.kind, "attributes": e.attributes}
            for k, e in data.final.items()}


def expected_graph(data: Dataset) -> dict[Any, Any]:
    return {k: {"revision": e.revision, "deleted": e.deleted, "kind": e.kind} for k, e in data.final.items()}


def expected_edges(data: Dataset) -> set[tuple[str, str, str, str]]:
    return {(t, i, link["rel"], link["to"]) for (t, i), e in data.final.items() for link in e.links}


def expected_search(data: Dataset) -> dict[Any, int]:
    return {k: e.revision for k, e in data.final.items() if not e.deleted}


def dlq_entries(kafka: Kafka, topic: str) -> Counter[DlqEntry]:
    """(origin topic, partition, offset, reason, stage) of every DLQ record."""
    entries: Counter[DlqEntry] = Counter()
    for message in kafka.read_all(topic):
        h = headers_of(message)
        entries[(h["dlq.origin.topic"], int(h["dlq.origin.partition"]), int(h["dlq.origin.offset"]),
                 h["dlq.reason"], h["dlq.stage"])] += 1
    return entries


def assert_sinks_hold(sinks: SinkReader, data: Dataset) -> None:
    """Every sink holds exactly the dataset's final state: rows, nodes, edges, documents."""
    tenants = data.tenants
    assert_equal(sinks.postgres(tenants), expected_postgres(data), "postgres rows")
    assert_equal(sinks.graph_nodes(tenants), expected_graph(data), "graph nodes")
    assert_equal(sinks.graph_edges(tenants), expected_edges(data), "graph edges")
    assert_equal(sinks.search_documents(tenants), expected_search(data), "search documents")


def assert_sinks_hold_revisions(sinks: SinkReader, revisions: Mapping[tuple[str, str], int]) -> None:
    """Postgres, the graph and search hold exactly these (tenant, id) at these revisions, for the
    tenants named."""
    tenants = sorted({tenant for tenant, _ in revisions})
    expected = dict(revisions)
    assert_equal({k: v["revision"] for k, v in sinks.postgres(tenants).items()}, expected, "postgres")
    assert_equal({k: v["revision"] for k, v in sinks.graph_nodes(tenants).items()}, expected, "graph")
    assert_equal(sinks.search_documents(tenants), expected, "search")


def assert_no_lag(kafka: Kafka, group: str, topics: Sequence[str]) -> None:
    """The group has committed every record of these topics (committed == end everywhere)."""
    lag = kafka.lag(group, topics)
    assert lag, "no committed offsets"
    assert {tp: n for tp, n in lag.items() if n} == {}


# --- converged --------------------------------------------------------------------------------
def assert_converged(
        kafka: Kafka, sinks: SinkReader, worker: WorkerProcess, prefix: str, *,
        timeout_s: float,
        interval_s: float = 0.5,
        data: Dataset | None = None,
        revisions: Mapping[tuple[str, str], int] | None = None,
        dlq: Counter[DlqEntry] | set[DlqEntry] | None = None,
        exits: Collection[int] | None = None,
        committed: Sequence[str] = (),
        commit_timeout_s: float = 30,
) -> None:
    """The pipeline has finished with the test's records. Within `timeout_s` (re-checked every
    `interval_s`; a failure ends with the worker's log tail):

    - the sinks hold exactly `data`'s final state (`assert_sinks_hold`) or, given `revisions`
      instead, exactly these records at these revisions (`assert_sinks_hold_revisions`);
    - unless `dlq` is None, the `<prefix>.dlq` topic holds exactly these letters: a Counter, each
      as many times as counted; a set, copies folded (a killed worker may publish one again);
    - unless `exits` is None, the worker exited only with these codes (none, if empty).

    Then, within `commit_timeout_s`, the group `it-<prefix>` has committed every record of the
    `committed` topics; and no revision ever replaced a newer one in Postgres (the test's audit
    trigger), nor did the worker exit otherwise meanwhile.
    """
    assert (data is None) != (revisions is None), "what the sinks should hold: data or revisions"
    tenants = data.tenants if data is not None else sorted({tenant for tenant, _ in revisions or {}})

    def check_exits() -> None:
        if exits is not None:
            assert set(worker.exits) <= set(exits), f"the worker exited: {worker.exits}"

    def converged() -> None:
        check_exits()
        if data is not None:
            assert_sinks_hold(sinks, data)
        else:
            assert_sinks_hold_revisions(sinks, revisions or {})
        if isinstance(dlq, Counter):
            assert_equal(dlq_entries(kafka, f"{prefix}.dlq"), dlq, "dlq entries")
        elif dlq is not None:
            assert_equal(set(dlq_entries(kafka, f"{prefix}.dlq")), dlq, "dlq entries")

    eventually(converged, timeout_s=timeout_s, interval_s=interval_s, context=worker.log_tail)
    if committed:
        eventually(lambda: assert_no_lag(kafka, f"it-{prefix}", committed), timeout_s=commit_timeout_s,
                   interval_s=interval_s, context=worker.log_tail)
    assert sinks.postgres_overwrites_of_newer(tenants) == [], "an older revision replaced a newer one"
    check_exits()
