"""Issue 16, redrive: a letter's headers choose among this app's topics only, and a truncated
letter is never sent as its prefix."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from ingest_stream.core.dlq import (
    VALUE_BYTES_HEADER,
    VALUE_SHA256_HEADER,
    VALUE_TRUNCATED_HEADER,
    DlqEnvelope,
    Position,
    failure_headers,
)
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.triage import (
    DeadLetter,
    RedrivePolicy,
    RedriveTargets,
    Status,
    StatusEntry,
    Truncation,
    Verdict,
    fold_statuses,
    original_problem,
    redrive_message,
    redrive_verdict,
    truncation_of,
)

WHEN = datetime(2026, 1, 10, tzinfo=UTC)
SOURCE = Position("ingest.source.kafka", 1, 40)
TARGETS = RedriveTargets(sources=frozenset({"ingest.source.kafka", "ingest.source.webhook"}),
                         sinks={"postgres": "ingest.sink.postgres", "typesense": "ingest.sink.typesense"})
ORIGINAL = b'{"id": "doc-1", "attributes": {"body": "' + b"x" * 5000 + b'"}}'
DIGEST = hashlib.sha256(ORIGINAL).hexdigest()


def letter(reason: Reason = Reason.CONNECTION_ERROR, stage: Stage = Stage.VALIDATE, *,
           origin: Position = SOURCE, failed: Position | None = None, extra: tuple = (),
           value: bytes = b'{"id": "doc-1"}') -> DeadLetter:
    headers = [*failure_headers(
        [("traceparent", b"00-1")], reason=reason, stage=stage, error="boom", attempts=1, origin=origin,
        failed=failed, failed_at=WHEN, identity={"tenant": "acme-corp", "id": "doc-1"}), *extra]
    return DeadLetter(0, 7, b"acme-corp:doc-1", value, tuple(headers), DlqEnvelope.from_headers(headers))


def truncated(**kwargs: object) -> DeadLetter:
    flags = ((VALUE_TRUNCATED_HEADER, b"true"), (VALUE_BYTES_HEADER, str(len(ORIGINAL)).encode()),
             (VALUE_SHA256_HEADER, DIGEST.encode()))
    return letter(extra=flags, value=ORIGINAL[:100], **kwargs)  # type: ignore[arg-type]


# --- the target: this app's source and sink topics, nothing else --------------------------------
@pytest.mark.parametrize("topic", ["ingest.legal.holds", "ingest.dlq.status", "ingest.dlq",
                                   "ingest-stream-dedupe-changelog", "ingest.sink.postgres",
                                   "other.source.kafka"])
@pytest.mark.parametrize("force", [False, True])
def test_a_processing_letter_naming_any_topic_but_a_source_topic_is_refused(topic, force):
    decision = redrive_verdict(letter(origin=Position(topic, 0, 1)), RedrivePolicy(TARGETS, force=force))
    assert decision.verdict is Verdict.REFUSED
    assert topic in (decision.problem or "") and "not a source topic" in (decision.problem or "")


def test_a_refused_target_wins_over_parking_and_over_not_retryable():
    foreign = Position("ingest.legal.holds", 0, 1)
    parked = letter(origin=foreign, extra=(("ingest.redrive", b"5"),))
    assert redrive_verdict(parked, RedrivePolicy(TARGETS)).verdict is Verdict.REFUSED
    not_retryable = letter(Reason.SCHEMA_DRIFT, origin=foreign)
    assert redrive_verdict(not_retryable, RedrivePolicy(TARGETS)).verdict is Verdict.REFUSED


def test_a_source_letter_goes_to_its_own_source_topic():
    webhook = letter(origin=Position("ingest.source.webhook", 2, 9))
    decision = redrive_verdict(webhook, RedrivePolicy(TARGETS))
    assert (decision.verdict, decision.topic) == (Verdict.SEND, "ingest.source.webhook")
    assert decision.problem is None


def test_a_sink_letter_goes_to_the_sink_its_stage_names_and_nowhere_else():
    at_sink = Position("ingest.sink.postgres", 3, 12)
    ok = letter(stage=Stage.SINK_POSTGRES, failed=at_sink)
    assert redrive_verdict(ok, RedrivePolicy(TARGETS)).topic == "ingest.sink.postgres"
    # no failed position (an older letter): still that sink's topic, never the source topic
    assert redrive_verdict(letter(stage=Stage.SINK_POSTGRES), RedrivePolicy(TARGETS)).topic == (
        "ingest.sink.postgres")
    # a failed topic that is not the stage's sink topic: another sink's, or a foreign one
    for topic in ("ingest.sink.typesense", "ingest.dlq.status", "ingest.legal.holds"):
        wrong = letter(stage=Stage.SINK_POSTGRES, failed=Position(topic, 0, 1))
        decision = redrive_verdict(wrong, RedrivePolicy(TARGETS, force=True))
        assert decision.verdict is Verdict.REFUSED and topic in (decision.problem or "")


def test_a_sink_this_app_does_not_run_is_refused():
    neo4j = letter(stage=Stage.SINK_NEO4J, failed=Position("ingest.sink.neo4j", 0, 1))
    decision = redrive_verdict(neo4j, RedrivePolicy(TARGETS, force=True))
    assert decision.verdict is Verdict.REFUSED and "INGEST_SINKS" in (decision.problem or "")


def test_a_sink_letter_with_a_forged_origin_still_goes_to_its_sink_only():
    forged = letter(stage=Stage.SINK_TYPESENSE, origin=Position("ingest.legal.holds", 0, 3),
                    failed=Position("ingest.sink.typesense", 0, 4))
    decision = redrive_verdict(forged, RedrivePolicy(TARGETS))
    assert (decision.verdict, decision.topic) == (Verdict.SEND, "ingest.sink.typesense")


# --- truncated letters -------------------------------------------------------------------------
def test_a_truncated_letter_is_sent_only_as_its_re_read_original():
    decision = redrive_verdict(truncated(), RedrivePolicy(TARGETS))
    assert decision.verdict is Verdict.SEND
    assert decision.truncation == Truncation(len(ORIGINAL), DIGEST)
    assert decision.original_at == (SOURCE,)
    with pytest.raises(ValueError, match="prefix"):
        redrive_message(truncated(), "rd-1", "ingest.source.kafka")
    out = redrive_message(truncated(), "rd-1", "ingest.source.kafka", original=ORIGINAL)
    assert out.value == ORIGINAL
    assert not any(k.startswith("dlq.") for k, _ in out.headers)


def test_a_truncated_sink_letter_is_re_read_from_the_sink_topic_first_then_the_source():
    at_sink = Position("ingest.sink.postgres", 3, 12)
    decision = redrive_verdict(truncated(stage=Stage.SINK_POSTGRES, failed=at_sink), RedrivePolicy(TARGETS))
    assert decision.original_at == (at_sink, SOURCE)
    # a forged origin is never read from
    forged = truncated(stage=Stage.SINK_POSTGRES, failed=at_sink, origin=Position("ingest.legal.holds", 0, 1))
    assert redrive_verdict(forged, RedrivePolicy(TARGETS)).original_at == (at_sink,)


def test_a_truncated_letter_larger_than_the_sender_can_send_is_refused_before_reading():
    decision = redrive_verdict(truncated(), RedrivePolicy(TARGETS, max_value_bytes=len(ORIGINAL) - 1))
    assert decision.verdict is Verdict.REFUSED and str(len(ORIGINAL)) in (decision.problem or "")
    assert redrive_verdict(truncated(), RedrivePolicy(TARGETS, max_value_bytes=len(ORIGINAL))).verdict is (
        Verdict.SEND)


def test_a_whole_letter_larger_than_the_sender_can_send_is_refused():
    big = letter(value=b"v" * 1000)
    decision = redrive_verdict(big, RedrivePolicy(TARGETS, max_value_bytes=999))
    assert decision.verdict is Verdict.REFUSED and "1000 bytes, more than the 999" in (decision.problem or "")
    assert redrive_verdict(big, RedrivePolicy(TARGETS, max_value_bytes=1000)).verdict is Verdict.SEND


def test_a_truncated_letter_with_a_position_kafka_cannot_have_is_refused():
    bad = truncated(origin=Position("ingest.source.kafka", 0, -1))
    decision = redrive_verdict(bad, RedrivePolicy(TARGETS))
    assert decision.verdict is Verdict.REFUSED and "re-read" in (decision.problem or "")


@pytest.mark.parametrize("flags", [
    ((VALUE_TRUNCATED_HEADER, b"true"),),  # the flag alone
    ((VALUE_TRUNCATED_HEADER, b"\xff\xfe"), (VALUE_BYTES_HEADER, b"10"), (VALUE_SHA256_HEADER, b"zz")),
    ((VALUE_BYTES_HEADER, b"-5"), (VALUE_SHA256_HEADER, DIGEST.encode())),
    ((VALUE_BYTES_HEADER, b"1" * 40), (VALUE_SHA256_HEADER, DIGEST.encode())),
    ((VALUE_SHA256_HEADER, DIGEST.encode()),),
])
def test_garbled_truncation_headers_refuse_the_letter_and_its_value_is_never_sent(flags):
    garbled = letter(extra=flags)
    with pytest.raises(ValueError, match=r"dlq\.value_"):
        truncation_of(garbled)
    decision = redrive_verdict(garbled, RedrivePolicy(TARGETS, force=True))
    assert decision.verdict is Verdict.REFUSED and "truncated" in (decision.problem or "")
    with pytest.raises(ValueError, match="prefix"):
        redrive_message(garbled, "rd-1", "ingest.source.kafka")


def test_an_explicit_false_flag_is_a_whole_value():
    whole = letter(extra=((VALUE_TRUNCATED_HEADER, b"false"),))
    assert truncation_of(whole) is None
    assert redrive_message(whole, "rd-1", "ingest.source.kafka").value == b'{"id": "doc-1"}'


def test_the_re_read_original_must_be_the_one_the_letter_was_cut_from():
    truncation = Truncation(len(ORIGINAL), DIGEST)
    assert original_problem(truncation, SOURCE, ORIGINAL) is None
    assert original_problem(truncation, SOURCE, None) == (
        "original no longer in ingest.source.kafka[1]@40: retention removed it")
    assert "checksum mismatch" in (original_problem(truncation, SOURCE, ORIGINAL[:-1] + b"y") or "")
    assert "checksum mismatch" in (original_problem(truncation, SOURCE, ORIGINAL[:100]) or "")


# --- hostile headers elsewhere -----------------------------------------------------------------
@pytest.mark.parametrize(("raw", "count"), [(b"2", 2), (b"-7", 1), (b"\xff", 1), (b"\xd9\xa3", 1),
                                            (b"9" * 30, 1)])
def test_a_garbled_redrive_count_counts_as_redriven_once_never_less(raw, count):
    assert letter(extra=(("ingest.redrive", raw),)).redrives == count


def test_garbage_in_the_status_topic_is_skipped_not_fatal():
    good = StatusEntry(Status.REDRIVEN, "2026-01-01T00:00:00Z", "rd-1")
    entries = [(b"0:1", good.encode()), (b"0:1", b"not json"), (b"0:2", b"[1, 2]"),
               (b"0:3", b'{"status": "exploded", "at": "x"}'), (b"0:4", b'{"status": "open", "at": 5}'),
               (b"\xff", good.encode()), (b"0:5", b'{"status": "parked", "at": "t", "note": []}')]
    assert fold_statuses(entries) == {"0:1": good}
