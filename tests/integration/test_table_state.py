"""`ingest-stream checkpoints` and `dedupe-stats`: what the worker's tables hold, read from their
changelogs, agree with what was sent (the operators' checkpoint and idempotency questions)."""

from __future__ import annotations

import json

from tests.dataset import v2
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, assert_equal, eventually, run_tool
from tests.integration.pipeline_helpers import source_topics


def test_checkpoints_and_dedupe_stats_answer_from_the_tables(kafka: Kafka, sinks: SinkReader, make_worker,
                                                             prefix: str) -> None:
    tenant, other = f"{prefix}-acme", f"{prefix}-beta"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker()
    worker.start()
    records = [v2(tenant, f"doc-{i}", 1) for i in range(6)] + [v2(other, "doc-0", 1)]
    sent = [(f"{r['tenant']}:{r['id']}".encode(), json.dumps(r).encode()) for r in records]
    positions = kafka.produce(f"{prefix}.source.kafka", [*sent, sent[0]])  # the last: a duplicate
    eventually(lambda: assert_equal(len(sinks.postgres([tenant, other])), 7), timeout_s=120,
               context=worker.log_tail)

    # the last offset forwarded per tenant and partition (the duplicate is not forwarded)
    expected: dict[tuple[str, int], int] = {}
    for record, (partition, offset) in zip(records, positions, strict=False):
        key = (record["tenant"], partition)
        expected[key] = max(expected.get(key, -1), offset)

    def checkpoints_agree() -> None:
        rows = run_tool(worker, "ingest_stream.cli", "checkpoints", "--json")
        assert_equal({(r["tenant"], r["partition"]): r["offset"] for r in rows}, expected, "checkpoints")
        assert {r["source"] for r in rows} == {"kafka"}

    eventually(checkpoints_agree, timeout_s=60, context=worker.log_tail)
    mine = run_tool(worker, "ingest_stream.cli", "checkpoints", "--tenant", other, "--json")
    assert [(r["tenant"], r["event_time"]) for r in mine] == [(other, "2025-01-01T00:01:00.000Z")]

    stats = {row["source"]: row for row in run_tool(worker, "ingest_stream.cli", "dedupe-stats", "--json")}
    assert stats["kafka"]["keys"] == 7 and stats["kafka"]["expired_not_evicted"] == 0
    assert stats["kafka"]["ttl_s"] == 7 * 24 * 3600 and stats["kafka"]["oldest_first_seen"]
    assert stats["webhook"]["keys"] == 0 and stats["webhook"]["oldest_first_seen"] is None
    assert worker.metric("ingest_duplicates_total", source="kafka") == 1
    table = run_tool(worker, "ingest_stream.cli", "checkpoints", json_output=False)
    assert table.splitlines()[0].split()[:3] == ["TENANT", "SOURCE", "TOPIC"] and other in table
