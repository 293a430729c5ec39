from datetime import UTC, datetime

import pytest

from ingest_stream.core.dlq import (
    DlqEnvelope,
    Position,
    failure_headers,
    header_value,
    origin_headers,
    read_origin,
)
from ingest_stream.core.reasons import Reason, Stage

ORIGIN = Position("ingest.source.kafka", 2, 41, 1735689600000)
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_headers_keep_the_originals_and_add_the_contract_ones():
    original = [("traceparent", b"00-abc"), ("dlq.reason", b"STALE")]
    headers = failure_headers(
        original, reason=Reason.OLDER_REVISION, stage=Stage.SINK_NEO4J, error="$.revision: older",
        attempts=1, origin=ORIGIN, failed=Position("ingest.sink.neo4j", 1, 9), failed_at=WHEN,
        identity={"tenant": "acme-corp", "source": "kafka", "id": "doc-1"})
    assert headers[0] == ("traceparent", b"00-abc")
    assert [v for k, v in headers if k == "dlq.reason"] == [b"OLDER_REVISION"]  # the stale one is gone
    expected = {
        "dlq.reason": "OLDER_REVISION", "dlq.retryable": "false", "dlq.stage": "sink.neo4j",
        "dlq.error": "$.revision: older", "dlq.attempts": "1", "dlq.tenant": "acme-corp",
        "dlq.source": "kafka", "dlq.record_id": "doc-1", "dlq.origin.topic": "ingest.source.kafka",
        "dlq.origin.partition": "2", "dlq.origin.offset": "41", "dlq.origin.timestamp": "1735689600000",
        "dlq.failed.topic": "ingest.sink.neo4j", "dlq.failed.partition": "1", "dlq.failed.offset": "9",
        "dlq.failed_at": "2025-01-02T03:04:05.000Z",
    }
    for name, value in expected.items():
        assert header_value(headers, name) == value, name


@pytest.mark.parametrize("reason", list(Reason))
def test_retryable_flag_follows_the_contract(reason):
    headers = failure_headers([], reason=reason, stage=Stage.VALIDATE, error="e", attempts=1,
                              origin=ORIGIN, failed=None, failed_at=WHEN, identity={})
    retryable = reason in {Reason.SINK_TIMEOUT, Reason.CONNECTION_ERROR, Reason.RATE_LIMITED,
                           Reason.CIRCUIT_OPEN}
    assert header_value(headers, "dlq.retryable") == ("true" if retryable else "false")
    assert header_value(headers, "dlq.failed.topic") is None


def test_error_is_capped_at_1_kib_without_breaking_utf8():
    headers = failure_headers([], reason=Reason.VALIDATION_FAIL, stage=Stage.VALIDATE, error="é" * 2000,
                              attempts=1, origin=ORIGIN, failed=None, failed_at=WHEN, identity={})
    raw = dict(headers)["dlq.error"]
    assert len(raw) <= 1024
    raw.decode("utf-8")


def test_envelope_round_trip():
    headers = failure_headers([], reason=Reason.CONNECTION_ERROR, stage=Stage.SINK_POSTGRES, error="down",
                              attempts=5, origin=ORIGIN, failed=Position("ingest.sink.postgres", 0, 3),
                              failed_at=WHEN, identity={"tenant": "t"})
    envelope = DlqEnvelope.from_headers(headers)
    assert envelope.reason is Reason.CONNECTION_ERROR
    assert envelope.retryable
    assert envelope.stage.sink == "postgres"
    assert envelope.attempts == 5
    assert envelope.origin == ORIGIN
    assert envelope.failed == Position("ingest.sink.postgres", 0, 3)
    assert envelope.failed_at == WHEN
    assert envelope.tenant == "t"
    assert envelope.record_id is None


def test_origin_headers_round_trip():
    assert read_origin([*origin_headers(ORIGIN), ("other", b"x")]) == ORIGIN
    assert read_origin([("other", b"x")]) is None


def test_redriven_and_replayed_records_are_reprocessed():
    from ingest_stream.core.dlq import reprocessed

    assert reprocessed([("ingest.redrive", b"2:rd-1")])
    assert reprocessed([("x", b"y"), ("ingest.replay", b"plan-7")])
    assert not reprocessed([("ingest.origin.topic", b"t"), ("dlq.reason", b"OLDER_REVISION")])
    assert not reprocessed([])
