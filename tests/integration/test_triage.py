"""Issue 5: `dlqtriage` as the runbook uses it, against a DLQ holding every kind of failure we can
cause on real servers."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from ingest_stream.core.dlq import Position, failure_headers, fit_letter
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.ops.devstack import DevStack
from tests.dataset import mixed_dataset, v2
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, assert_equal, eventually, headers_of
from tests.integration.pipeline_helpers import LIMIT, PRODUCER_HEADER, dlqtriage, source_topics

FAST = {"INGEST_BREAKER_OPEN_S": "2", "INGEST_SINK_RETRY_BASE_S": "0.1", "INGEST_SINK_RETRY_CAP_S": "0.5",
        "INGEST_SINK_RETRY_ATTEMPTS": "3", "INGEST_SINK_TIMEOUT_S": "10", "INGEST_SINK_FAILURE_POLICY": "dlq"}


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
                           "--archive-dir", str(tmp_path / "archive"), "--yes", "--json")
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
        done = dlqtriage(worker, "redrive", *refusals, "--force", "--yes", "--json")
        assert done["sent_by_topic"] == {f"{prefix}.sink.postgres": 4}
        eventually(lambda: assert_equal(len(sinks.postgres([refused_tenant])), 4), timeout_s=60,
                   context=worker.log_tail)
        assert dlqtriage(worker, "redrive", *refusals, "--force", "--yes", "--json")["sent"] == 0
        eventually(lambda: assert_equal(len(sinks.audit([refused_tenant])), 4), timeout_s=10)
    finally:
        sinks.execute(f"ALTER TABLE ingest_records DROP CONSTRAINT IF EXISTS {constraint}")


def test_triage_commands_fail_clearly(make_worker, prefix: str, kafka: Kafka) -> None:
    worker: WorkerProcess = make_worker()  # not started: the tools only need the broker
    out = dlqtriage(worker, "purge", "--reason", "OLDER_REVISION", json_output=False, expect_exit=1)
    assert "--older-than" in out
    out = dlqtriage(worker, "purge", "--older-than", "0", json_output=False, expect_exit=1)
    assert "purge needs --yes without a terminal" in out  # nothing purged unasked
    out = dlqtriage(worker, "redrive", "--force", json_output=False, expect_exit=1)
    assert "redrive --force needs --yes without a terminal" in out
    out = dlqtriage(worker, "summary", "--reason", "NOPE", json_output=False, expect_exit=2)
    assert "unknown reason" in out
    assert dlqtriage(worker, "summary", "--json")["total"] == 0  # no DLQ topic yet: empty, not an error


def _assert_reason(kafka: Kafka, prefix: str, reason: str, count: int) -> None:
    assert reasons_in_topic(kafka, f"{prefix}.dlq")[reason] == count


def _assert_tenant_count(kafka: Kafka, prefix: str, tenant: str, count: int) -> None:
    tenants = [h.get("dlq.tenant") for h in map(headers_of, kafka.read_all(f"{prefix}.dlq"))]
    assert tenants.count(tenant) == count



# --- issue 16: hostile and truncated dead letters ------------------------------------------------
# What a terminal acts on: C0 but newline, DEL, C1, bidi overrides and isolates, line separators.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
ATTACK = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202e"


def _letter(origin: Position, *, reason: Reason = Reason.VALIDATION_FAIL, stage: Stage = Stage.VALIDATE,
            failed: Position | None = None, value: bytes = b'{"id": "x"}', original_headers: tuple = (),
            error: str = "boom", tenant: str = "t", limit: int = 20_000
            ) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """A dead letter as the worker writes it (core/dlq.py): a value past `limit` becomes a prefix."""
    headers = failure_headers(list(original_headers), reason=reason, stage=stage, error=error, attempts=1,
                              origin=origin, failed=failed, failed_at=datetime.now(UTC),
                              identity={"tenant": tenant, "id": "doc"})
    key, letter_value, letter_headers = fit_letter(b"t:doc", value, headers, limit=limit)
    assert key is not None
    return key, letter_value, letter_headers


def test_redrive_writes_only_this_apps_topics_and_truncated_letters_only_whole(
        make_worker, prefix: str, kafka: Kafka, tmp_path: Path) -> None:
    worker: WorkerProcess = make_worker(INGEST_MAX_RECORD_BYTES="100000")  # not started: broker only
    source, holds, dlq = f"{prefix}.source.kafka", f"{prefix}.legal.holds", f"{prefix}.dlq"
    kafka.create_topics([source, holds, dlq], partitions=1)
    # Originals in the source topic: one the redrive can send (under the limit + its 64 KiB
    # envelope), another of the same size, one past what the redrive's producer may send.
    big, other, too_big = (b'{"b": "' + bytes([c]) * size + b'"}' for c, size in
                           ((ord("a"), 150_000), (ord("o"), 150_000), (ord("z"), 300_000)))
    (_, big_at), (_, other_at), (_, too_big_at) = kafka.produce(source, [(b"t:doc", v) for v in (big, other,
                                                                                                too_big)])

    def at(offset: int) -> Position:
        return Position(source, 0, offset)

    hostile_value = ("=HYPERLINK(\"http://x\") " + ATTACK).encode()  # (bytes not UTF-8: in x-bin)
    letters = {  # each its own origin: a letter is one failure (`DeadLetter.failure`)
        "whole": _letter(at(big_at), value=big),  # truncated; its original is where it says
        "mismatch": _letter(at(other_at), value=big),  # truncated; another record at its origin
        "gone": _letter(at(big_at + 1000), value=big),  # truncated; no record at its origin
        "too_big": _letter(at(too_big_at), value=too_big),  # truncated; too large to send
        "legal_holds": _letter(Position(holds, 0, 0), reason=Reason.CONNECTION_ERROR),
        "status_topic": _letter(at(100), stage=Stage.SINK_POSTGRES, reason=Reason.CONNECTION_ERROR,
                                failed=Position(f"{dlq}.status", 0, 0)),
        "hostile": _letter(at(101), reason=Reason.SCHEMA_DRIFT, value=hostile_value, tenant=ATTACK,
                           error="=cmd|' /C calc'!A0 " + ATTACK,
                           original_headers=(("x-bin", b"\xff\x1b[2J"), ("x-esc", ATTACK.encode()))),
        "huge": _letter(at(102), value=b'{"h": "' + b"h" * 200_000 + b'"}', limit=400_000),  # too large
        "garbled": (b"k", b"v", [("dlq.reason", b"\xff\xfe"), ("dlq.origin.topic", ATTACK.encode())]),
    }
    assert [name for name, (_, _, h) in letters.items() if ("dlq.value_truncated", b"true") in h] == [
        "whole", "mismatch", "gone", "too_big"]
    ids = {}
    for name, (key, value, headers) in letters.items():
        (partition, offset), = kafka.produce(dlq, [(key, value)], headers_each=[headers])
        ids[name] = f"{partition}:{offset}"

    summary = dlqtriage(worker, "summary", "--json")
    assert (summary["total"], summary["unreadable"]) == (8, 1)
    assert not RAW_CONTROL.search(dlqtriage(worker, "summary", json_output=False).replace("\n", ""))

    # sample and analyze for people: nothing from a letter reaches the terminal raw
    shown = dlqtriage(worker, "sample", "--full", "--limit", "20", json_output=False)
    assert not RAW_CONTROL.search(shown.replace("\n", ""))
    first = dlqtriage(worker, "sample", "--limit", "1", json_output=False)  # stops reading early
    assert first.count("--- ") == 1 and "Task was destroyed" not in first and "Error" not in first, first
    assert "\\x1b]0;owned\\x07" in shown and "x-bin: \\xff\\x1b[2J" in shown
    assert shown.count("TRUNCATED: the value is the first") == 4
    assert f"of {len(big)} bytes" in shown and f"whole record is at {source}[0]@{big_at}" in shown
    assert not RAW_CONTROL.search(dlqtriage(worker, "analyze", json_output=False).replace("\n", ""))
    samples = {s["id"]: s for s in dlqtriage(worker, "sample", "--limit", "20", "--json")}
    assert samples[ids["whole"]]["truncated"]["original_bytes"] == len(big)
    assert samples[ids["hostile"]]["truncated"] is None
    assert samples[ids["hostile"]]["headers"]["dlq.tenant"] == ATTACK  # JSON: the text, escaped by JSON

    # export: no cell a spreadsheet would evaluate
    exported = dlqtriage(worker, "export", "--format", "csv", "--reason", "SCHEMA_DRIFT", json_output=False)
    rows = list(csv.DictReader(io.StringIO(exported)))
    hostile_row, = (r for r in rows if r["id"] == ids["hostile"])
    assert hostile_row["error"].startswith("'=cmd") and hostile_row["value"].startswith("'=HYPERLINK")
    assert not [c for r in rows for c in r.values() if c[:1] in ("=", "+", "-", "@", "\t", "\r")]

    # redrive, --force or not: this app's topics only, and a truncated letter only as its original
    dry = dlqtriage(worker, "redrive", "--force", "--dry-run", "--json")
    assert (dry["sent"], dry["refused"]) == (2, 6)
    done = dlqtriage(worker, "redrive", "--force", "--yes", "--json")
    assert done["sent_by_topic"] == {source: 2}
    problems = {r["id"]: r["problem"] for r in done["refusals"]}
    assert set(problems) == {ids[n] for n in ("mismatch", "gone", "too_big", "legal_holds", "status_topic",
                                              "huge")}
    assert "checksum mismatch" in problems[ids["mismatch"]]
    assert f"original no longer in {source}[0]@{big_at + 1000}: retention removed it" in problems[ids["gone"]]
    assert f"the original is {len(too_big)} bytes, more than" in problems[ids["too_big"]]
    assert repr(holds) in problems[ids["legal_holds"]] and f"{dlq}.status" in problems[ids["status_topic"]]
    assert "more than the" in problems[ids["huge"]]
    human = dlqtriage(worker, "redrive", "--force", "--yes", json_output=False)
    assert "refused 6" in human and "checksum mismatch" in human

    redriven = [m for m in kafka.read_all(source) if "ingest.redrive" in headers_of(m)]
    assert sorted(m.value() for m in redriven) == sorted([big, hostile_value])  # the whole original
    assert kafka.read_all(holds) == []
    assert dlqtriage(worker, "summary", "--status", "redriven", "--json")["total"] == 2
    assert dlqtriage(worker, "summary", "--json")["total"] == 6  # refused: still open


def test_verify_reads_only_the_archive_beside_its_manifest(make_worker, tmp_path: Path) -> None:
    worker: WorkerProcess = make_worker()
    outside = tmp_path / "outside.jsonl.gz"
    outside.write_bytes(gzip.compress(b'{"id": "0:1"}\n'))
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    archives = tmp_path / "archives"
    archives.mkdir()
    for name in (str(outside), "../outside.jsonl.gz"):
        manifest = archives / "m.manifest.json"
        manifest.write_text(json.dumps({"archive": name, "sha256": digest, "records": 1}))
        out = dlqtriage(worker, "verify", str(manifest), json_output=False, expect_exit=1)
        assert "not inside the manifest's directory; refused" in out
