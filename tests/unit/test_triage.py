from datetime import UTC, datetime, timedelta

import pytest

from ingest_stream.core.dlq import DlqEnvelope, Position, failure_headers, header_value, read_origin
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.triage import (
    DeadLetter,
    RedrivePolicy,
    RedriveTargets,
    Selection,
    Status,
    StatusEntry,
    Verdict,
    fold_statuses,
    redrive_message,
    redrive_verdict,
)

WHEN = datetime(2026, 1, 10, tzinfo=UTC)
SOURCE = Position("ingest.source.kafka", 1, 40)
TARGETS = RedriveTargets(sources=frozenset({"ingest.source.kafka", "ingest.source.webhook"}),
                         sinks={s: f"ingest.sink.{s}" for s in ("postgres", "neo4j", "typesense")})


def letter(reason=Reason.CONNECTION_ERROR, stage=Stage.SINK_TYPESENSE, *, tenant="acme-corp",
           extra=(), failed_at=WHEN, offset=7, failed_offset=90) -> DeadLetter:
    failed = Position(f"ingest.sink.{stage.sink}", 2, failed_offset) if stage.sink else None
    headers = failure_headers(
        [("traceparent", b"00-1"), ("ingest.origin.topic", b"ingest.source.kafka"), *extra],
        reason=reason, stage=stage, error="boom", attempts=3, origin=SOURCE, failed=failed,
        failed_at=failed_at, identity={"tenant": tenant, "source": "kafka", "id": "doc-1"})
    return DeadLetter(0, offset, b"acme-corp:doc-1", b'{"id": "doc-1"}', tuple(headers),
                      DlqEnvelope.from_headers(headers))


def test_a_sink_failure_is_redriven_to_that_sink_only_with_lineage_headers():
    decision = redrive_verdict(letter(), RedrivePolicy(TARGETS))
    assert (decision.verdict, decision.topic) == (Verdict.SEND, "ingest.sink.typesense")
    out = redrive_message(letter(), "rd-1", decision.topic)
    assert out.topic == "ingest.sink.typesense"
    assert (out.key, out.value) == (b"acme-corp:doc-1", b'{"id": "doc-1"}')
    assert not any(k.startswith("dlq.") for k, _ in out.headers)
    assert header_value(out.headers, "traceparent") == "00-1"
    assert header_value(out.headers, "ingest.origin.topic") == "ingest.source.kafka"
    assert header_value(out.headers, "ingest.redrive") == "1"
    assert header_value(out.headers, "ingest.redrive.id") == "rd-1"


def test_a_processing_failure_is_redriven_to_its_source_topic():
    failed = letter(Reason.VALIDATION_FAIL, Stage.VALIDATE)
    decision = redrive_verdict(failed, RedrivePolicy(TARGETS, force=True))
    assert (decision.verdict, decision.topic) == (Verdict.SEND, "ingest.source.kafka")


def test_the_redrive_count_grows_and_replaces_the_previous_lineage():
    again = letter(extra=[("ingest.redrive", b"2"), ("ingest.redrive.id", b"rd-0")])
    assert again.redrives == 2
    out = redrive_message(again, "rd-9", "ingest.sink.typesense")
    assert [v for k, v in out.headers if k == "ingest.redrive"] == [b"3"]
    assert [v for k, v in out.headers if k == "ingest.redrive.id"] == [b"rd-9"]


@pytest.mark.parametrize(("reason", "force", "redrives", "verdict"), [
    (Reason.CONNECTION_ERROR, False, 0, Verdict.SEND),
    (Reason.CIRCUIT_OPEN, False, 2, Verdict.SEND),
    (Reason.CONSTRAINT_VIOLATION, False, 0, Verdict.NOT_RETRYABLE),
    (Reason.CONSTRAINT_VIOLATION, True, 0, Verdict.SEND),
    (Reason.CONNECTION_ERROR, False, 3, Verdict.PARK),
    (Reason.CONSTRAINT_VIOLATION, True, 3, Verdict.PARK),
])
def test_redrive_verdict(reason, force, redrives, verdict):
    extra = [("ingest.redrive", str(redrives).encode())] if redrives else []
    policy = RedrivePolicy(TARGETS, force=force, max_redrives=3)
    assert redrive_verdict(letter(reason, extra=extra), policy).verdict is verdict


def test_selection_filters_on_every_field():
    a = letter()
    assert Selection().matches(a, Status.OPEN)
    assert not Selection().matches(a, Status.REDRIVEN)  # open ones by default
    assert Selection(statuses=frozenset()).matches(a, Status.REDRIVEN)
    assert Selection(tenant="acme-corp").matches(a, Status.OPEN)
    assert not Selection(tenant="other").matches(a, Status.OPEN)
    retryable = frozenset({Reason.CONNECTION_ERROR, Reason.CIRCUIT_OPEN})
    assert Selection(reasons=retryable).matches(a, Status.OPEN)
    assert not Selection(reasons=frozenset({Reason.SCHEMA_DRIFT})).matches(a, Status.OPEN)
    assert Selection(stage=Stage.SINK_TYPESENSE).matches(a, Status.OPEN)
    assert not Selection(stage=Stage.SINK_POSTGRES).matches(a, Status.OPEN)
    assert Selection(record_id="doc-1").matches(a, Status.OPEN)
    assert not Selection(record_id="doc-2").matches(a, Status.OPEN)
    assert Selection(failed_before=WHEN + timedelta(seconds=1)).matches(a, Status.OPEN)
    assert not Selection(failed_before=WHEN).matches(a, Status.OPEN)
    assert Selection(failed_after=WHEN).matches(a, Status.OPEN)
    assert not Selection(failed_after=WHEN + timedelta(days=1)).matches(a, Status.OPEN)


def test_statuses_fold_to_the_latest_per_letter_and_tombstones_clear():
    entries = [
        (b"0:1", StatusEntry(Status.REDRIVEN, "2026-01-01T00:00:00Z", "rd-1").encode()),
        (b"0:2", StatusEntry(Status.PARKED, "2026-01-01T00:00:00Z", note="x").encode()),
        (b"0:1", StatusEntry(Status.PURGED, "2026-01-02T00:00:00Z").encode()),
        (b"0:2", None),
    ]
    assert fold_statuses(entries) == {"0:1": StatusEntry(Status.PURGED, "2026-01-02T00:00:00Z")}


def test_a_republished_copy_is_the_same_failure_and_a_failure_after_a_redrive_is_not():
    first = letter(offset=7)
    copy = letter(offset=8)  # the same headers, published again after a restart
    # The fan-out re-sent after a restart: the sink topic holds the record twice, both fail.
    refanned = letter(offset=9, failed_offset=91)
    after_redrive = letter(offset=10, extra=[("ingest.redrive", b"1"), ("ingest.redrive.id", b"r1")])
    refanned_after_redrive = letter(offset=11, failed_offset=92,
                                    extra=[("ingest.redrive", b"1"), ("ingest.redrive.id", b"r1")])
    # The same letter redriven again (another run): the same count, another id, a new failure.
    redriven_again = letter(offset=12, extra=[("ingest.redrive", b"1"), ("ingest.redrive.id", b"r2")])
    assert first.failure == copy.failure == refanned.failure
    assert after_redrive.failure != first.failure
    assert after_redrive.failure == refanned_after_redrive.failure
    assert redriven_again.failure != after_redrive.failure


def test_summary_counts_every_reason_by_tenant_and_stage():
    from ingest_stream.core.triage import summarize

    letters = [(letter(reason, stage, tenant=tenant, failed_at=WHEN + timedelta(minutes=i)), Status.OPEN)
               for i, (reason, stage, tenant) in enumerate([
                   (Reason.SCHEMA_DRIFT, Stage.VALIDATE, "a"), (Reason.SCHEMA_DRIFT, Stage.VALIDATE, "a"),
                   (Reason.VALIDATION_FAIL, Stage.VALIDATE, "b"),
                   (Reason.OLDER_REVISION, Stage.SINK_POSTGRES, "a"),
                   (Reason.CONSTRAINT_VIOLATION, Stage.SINK_POSTGRES, "a"),
                   (Reason.SINK_TIMEOUT, Stage.SINK_TYPESENSE, "a"),
                   (Reason.CONNECTION_ERROR, Stage.SINK_NEO4J, "b"),
                   (Reason.RATE_LIMITED, Stage.SINK_TYPESENSE, "b"),
                   (Reason.CIRCUIT_OPEN, Stage.SINK_TYPESENSE, "b")])]
    result = summarize(letters)
    assert result["total"] == 9
    assert result["by_reason"] == {r.value: (2 if r is Reason.SCHEMA_DRIFT else 1) for r in Reason}
    assert result["groups"][0] == {"reason": "SCHEMA_DRIFT", "tenant": "a", "stage": "validate", "count": 2}
    assert result["retryable_share"] == round(4 / 9, 4)
    assert (result["oldest"], result["newest"]) == ("2026-01-10T00:00:00.000Z", "2026-01-10T00:08:00.000Z")
    assert result["by_status"] == {"open": 9}


def test_error_patterns_group_messages_that_differ_only_in_values():
    from ingest_stream.core.triage import error_pattern

    assert error_pattern("$.revision: -3 is less than the minimum of 0") == error_pattern(
        "$.revision: -17 is less than the minimum of 0")
    assert error_pattern("'abc' is not a 'date-time'") == error_pattern("'2025-13-01' is not a 'date-time'")
    assert error_pattern("no answer in 10.0s") != error_pattern("connection refused")


def test_analysis_gives_top_errors_sources_producers_histogram_and_an_action_per_reason():
    from ingest_stream.core.triage import analyze

    letters = [letter(Reason.VALIDATION_FAIL, Stage.VALIDATE, failed_at=WHEN + timedelta(hours=h % 3),
                      extra=[("x-producer", b"billing")]) for h in range(6)]
    letters.append(letter(Reason.CONNECTION_ERROR, failed_at=WHEN))
    result = analyze(letters)
    assert result["total"] == 7
    first = result["reasons"][0]
    assert (first["reason"], first["count"], first["retryable"]) == ("VALIDATION_FAIL", 6, False)
    assert first["top_errors"] == [{"pattern": "boom", "count": 6}]
    assert first["producers"] == {"billing": 6} and first["origin_topics"] == {"ingest.source.kafka": 6}
    assert "producer" in first["suggested_action"]
    assert result["reasons"][1]["suggested_action"].endswith("then redrive")
    assert result["histogram"] == {"bucket": "hour", "counts": {
        "2026-01-10T00:00Z": 3, "2026-01-10T01:00Z": 2, "2026-01-10T02:00Z": 2}}


def test_a_letter_document_keeps_the_exact_bytes():
    import base64

    from ingest_stream.core.triage import letter_document

    doc = letter_document(letter(), Status.OPEN)
    assert base64.b64decode(doc["value_b64"]) == b'{"id": "doc-1"}'
    assert base64.b64decode(doc["key_b64"]) == b"acme-corp:doc-1"
    assert doc["value"] == '{"id": "doc-1"}'
    assert ["traceparent", base64.b64encode(b"00-1").decode()] in doc["headers"]
    assert (doc["reason"], doc["stage"], doc["status"]) == ("CONNECTION_ERROR", "sink.typesense", "open")


def test_a_forged_origin_is_not_laundered_through_a_letter_and_its_redrive():
    """A producer's ingest.origin.* headers are not copied into the letter, and a redrive sends
    the letter's own origin (where the record entered), never theirs."""
    forged = [("ingest.origin.topic", b"ingest.source.webhook"), ("ingest.origin.partition", b"0"),
              ("ingest.origin.offset", b"9223372036854775807")]
    bad = letter(Reason.SCHEMA_DRIFT, Stage.VALIDATE, extra=forged)
    assert header_value(bad.headers, "ingest.origin.offset") is None
    out = redrive_message(bad, "rd-1", "ingest.source.kafka")
    assert read_origin(out.headers) == SOURCE
    assert [k for k, _ in out.headers].count("ingest.origin.offset") == 1
