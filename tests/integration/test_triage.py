"""Issue 5: `dlqtriage` as the runbook uses it, against a DLQ holding every kind of failure we can
cause on real servers."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from ingest_stream.ops.devstack import DevStack
from tests.dataset import mixed_dataset, v2
from tests.integration.harness import (
    Kafka,
    SinkReader,
    WorkerProcess,
    assert_equal,
    eventually,
    headers_of,
    run_tool,
)
from tests.integration.test_pipeline import LIMIT, PRODUCER_HEADER, source_topics

FAST = {"INGEST_BREAKER_OPEN_S": "2", "INGEST_SINK_RETRY_BASE_S": "0.1", "INGEST_SINK_RETRY_CAP_S": "0.5",
        "INGEST_SINK_RETRY_ATTEMPTS": "3", "INGEST_SINK_TIMEOUT_S": "10", "INGEST_SINK_FAILURE_POLICY": "dlq"}


def dlqtriage(worker: WorkerProcess, *args: str, json_output: bool = True, expect_exit: int = 0) -> Any:
    return run_tool(worker, "ingest_stream.ops.dlqtriage", *args, json_output=json_output,
                    expect_exit=expect_exit)


def reasons_in_topic(kafka: Kafka, topic: str) -> Counter[str]:
    """Read independently (librdkafka), one count per failure (copies after a restart folded)."""
    seen = {(h["dlq.origin.topic"], h["dlq.origin.partition"], h["dlq.origin.offset"], h["dlq.stage"]):
            h["dlq.reason"] for h in map(headers_of, kafka.read_all(topic))}
    return Counter(seen.values())


def test_triage_summary_analyze_export_purge_and_redrive_after_a_fix(
        stack: DevStack, kafka: Kafka, sinks: SinkReader, make_worker, prefix: str, tmp_path: Path) -> None:
    data = mixed_dataset(prefix, max_record_bytes=LIMIT)
    refused_tenant = f"{prefix}-refused"
    constraint = f"test_refuse_{prefix}"
    sinks.execute(f"ALTER TABLE ingest_records ADD CONSTRAINT {constraint} "
                  f"CHECK (tenant <> '{refused_tenant}')")
    try:
        kafka.create_topics(source_topics(prefix))
        worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES=str(LIMIT), **FAST)
        worker.start()
        source = f"{prefix}.source.kafka"
        kafka.produce(source, [(m.key, m.value) for m in data.messages], headers=[PRODUCER_HEADER])
        refused = [(f"{refused_tenant}:c{i}".encode(), json.dumps(v2(refused_tenant, f"c{i}", 1)).encode())
                   for i in range(4)]
        kafka.produce(source, refused, headers=[PRODUCER_HEADER])
        eventually(lambda: _assert_reason(kafka, prefix, "CONSTRAINT_VIOLATION", 4), timeout_s=120,
                   context=worker.log_tail)
        # Typesense takes the refused tenant before it goes down: its only failures are Postgres's.
        eventually(lambda: assert_equal(len(sinks.search_documents([refused_tenant])), 4), timeout_s=60,
                   context=worker.log_tail)
        with stack.server_down("typesense"):  # connection errors / open circuit, for Typesense
            down_tenant = f"{prefix}-down"
            kafka.produce(source, [(f"{down_tenant}:d{i}".encode(),
                                    json.dumps(v2(down_tenant, f"d{i}", 1)).encode()) for i in range(10)])
            eventually(lambda: _assert_tenant_count(kafka, prefix, down_tenant, 10), timeout_s=120,
                       context=worker.log_tail)

        expected = reasons_in_topic(kafka, f"{prefix}.dlq")
        assert {"SCHEMA_DRIFT", "VALIDATION_FAIL", "OLDER_REVISION", "CONSTRAINT_VIOLATION"} <= set(expected)
        assert set(expected) & {"CONNECTION_ERROR", "CIRCUIT_OPEN", "SINK_TIMEOUT"}

        # summary: every failure, by reason, matching an independent read of the topic
        summary = dlqtriage(worker, "summary", "--json")
        assert summary["by_reason"] == dict(expected)
        assert summary["total"] == sum(expected.values())
        tenant_summary = dlqtriage(worker, "summary", "--tenant", refused_tenant, "--json")
        assert tenant_summary["groups"] == [{"reason": "CONSTRAINT_VIOLATION", "tenant": refused_tenant,
                                             "stage": "sink.postgres", "count": 4}]
        human = dlqtriage(worker, "summary", "--tenant", refused_tenant, json_output=False)
        assert "CONSTRAINT_VIOLATION" in human and "sink.postgres" in human

        # analyze: patterns per reason, producers from the header, an action each
        analysis = dlqtriage(worker, "analyze", "--json")
        assert {r["reason"]: r["count"] for r in analysis["reasons"]} == dict(expected)
        assert all(r["suggested_action"] and r["top_errors"] for r in analysis["reasons"])
        constraint_entry = next(r for r in analysis["reasons"] if r["reason"] == "CONSTRAINT_VIOLATION")
        assert constraint_entry["producers"] == {"integration-test": 4}
        assert sum(analysis["histogram"]["counts"].values()) == summary["total"]
        assert "suggested:" in dlqtriage(worker, "analyze", json_output=False)

        # sample, then export in both formats
        samples = dlqtriage(worker, "sample", "--reason", "SCHEMA_DRIFT", "--limit", "2", "--json")
        assert len(samples) == 2 and all(s["headers"]["dlq.reason"] == "SCHEMA_DRIFT" for s in samples)
        exported = dlqtriage(worker, "export", json_output=False).splitlines()
        assert len([line for line in exported if line.startswith("{")]) == summary["total"]
        rows = list(csv.DictReader(io.StringIO(dlqtriage(worker, "export", "--format", "csv", "--reason",
                                                         "CONSTRAINT_VIOLATION", json_output=False))))
        assert sorted(r["record_id"] for r in rows) == [f"c{i}" for i in range(4)]

        # purge: a dry run changes nothing; then archive + manifest, verified, and hidden
        older = expected["OLDER_REVISION"]
        dry = dlqtriage(worker, "purge", "--older-than", "0", "--reason", "OLDER_REVISION", "--dry-run",
                        "--json")
        assert dry["would_purge"] == older
        assert dlqtriage(worker, "summary", "--json")["total"] == summary["total"]
        purged = dlqtriage(worker, "purge", "--older-than", "0", "--reason", "OLDER_REVISION",
                           "--archive-dir", str(tmp_path / "archive"), "--json")
        assert purged["purged"] == older
        manifest = json.loads(Path(purged["manifest"]).read_text())
        archive = Path(purged["archive"])
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == manifest["sha256"] == purged["sha256"]
        with gzip.open(archive, "rt") as lines:
            archived = [json.loads(line) for line in lines]
        assert len(archived) == manifest["records"] == older
        assert {a["reason"] for a in archived} == {"OLDER_REVISION"}
        assert dlqtriage(worker, "verify", purged["manifest"], "--json")["ok"] is True
        after = dlqtriage(worker, "summary", "--json")
        assert after["total"] == summary["total"] - older and "OLDER_REVISION" not in after["by_reason"]
        assert dlqtriage(worker, "summary", "--status", "purged", "--json")["total"] == older
        archive.write_bytes(archive.read_bytes()[:-8])  # damaged: verify says so
        assert dlqtriage(worker, "verify", purged["manifest"], "--json", expect_exit=1)["ok"] is False

        # redrive after the fix: not retryable, so --force; applied once; a second run sends nothing
        sinks.execute(f"ALTER TABLE ingest_records DROP CONSTRAINT {constraint}")
        refusals = ("--tenant", refused_tenant, "--reason", "CONSTRAINT_VIOLATION")
        assert dlqtriage(worker, "redrive", *refusals, "--json")["skipped_not_retryable"] == 4
        done = dlqtriage(worker, "redrive", *refusals, "--force", "--json")
        assert done["sent_by_topic"] == {f"{prefix}.sink.postgres": 4}
        eventually(lambda: assert_equal(len(sinks.postgres([refused_tenant])), 4), timeout_s=60,
                   context=worker.log_tail)
        assert dlqtriage(worker, "redrive", *refusals, "--force", "--json")["sent"] == 0
        eventually(lambda: assert_equal(len(sinks.audit([refused_tenant])), 4), timeout_s=10)
    finally:
        sinks.execute(f"ALTER TABLE ingest_records DROP CONSTRAINT IF EXISTS {constraint}")


def test_triage_commands_fail_clearly(make_worker, prefix: str, kafka: Kafka) -> None:
    worker: WorkerProcess = make_worker()  # not started: the tools only need the broker
    out = dlqtriage(worker, "purge", "--reason", "OLDER_REVISION", json_output=False, expect_exit=1)
    assert "--older-than" in out
    out = dlqtriage(worker, "summary", "--reason", "NOPE", json_output=False, expect_exit=2)
    assert "unknown reason" in out
    assert dlqtriage(worker, "summary", "--json")["total"] == 0  # no DLQ topic yet: empty, not an error


def _assert_reason(kafka: Kafka, prefix: str, reason: str, count: int) -> None:
    assert reasons_in_topic(kafka, f"{prefix}.dlq")[reason] == count


def _assert_tenant_count(kafka: Kafka, prefix: str, tenant: str, count: int) -> None:
    tenants = [h.get("dlq.tenant") for h in map(headers_of, kafka.read_all(f"{prefix}.dlq"))]
    assert tenants.count(tenant) == count

