"""The per-record path of the processing stage, for any input: a forward or a dead letter that fits.

Property-based (hypothesis): arbitrary bytes, JSON values, near-valid records and headers. Every
hostile class of tests/hostile.py is checked by name too.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest_stream.config import MESSAGE_ENVELOPE_BYTES, PROJECT_ROOT, SOURCES
from ingest_stream.core.admission import Forward, admit
from ingest_stream.core.dlq import (
    VALUE_BYTES_HEADER,
    VALUE_SHA256_HEADER,
    VALUE_TRUNCATED_HEADER,
    Position,
    failure_headers,
    fit_letter,
    header_value,
    read_origin,
    record_size,
)
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.schemas import RecordValidator, Rejected
from tests.dataset import v2
from tests.hostile import CLASSES, Context, build

LIMIT = 16 * 1024
PREFIX = "ingest"
SOURCE_TOPICS = frozenset(f"{PREFIX}.source.{s}" for s in SOURCES)
HERE = Position(f"{PREFIX}.source.kafka", 2, 40, 1_700_000_000_000)
LETTER_LIMIT = LIMIT + MESSAGE_ENVELOPE_BYTES
VALIDATOR = RecordValidator.from_directory(PROJECT_ROOT / "schemas", max_record_bytes=LIMIT)


def letter_of(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], rejected: Rejected
              ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """The dead letter DeadLetters.publish would send for this rejection."""
    letter_headers = failure_headers(headers, reason=rejected.reason, stage=rejected.stage,
                                     error=rejected.error, attempts=1, origin=HERE, failed=None,
                                     failed_at=datetime(2026, 1, 1, tzinfo=UTC), identity=rejected.identity)
    return fit_letter(key, value, letter_headers, limit=LETTER_LIMIT)


def assert_total(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
    outcome = admit(VALIDATOR, value, headers, here=HERE, source_topics=SOURCE_TOPICS)
    if isinstance(outcome, Forward):
        assert len(outcome.encoded) <= LIMIT
        key = b"t:" + outcome.record["id"].encode()
        assert record_size(key, outcome.encoded, outcome.headers) <= LETTER_LIMIT
        assert read_origin(outcome.headers, topics=SOURCE_TOPICS) == HERE
        return
    assert isinstance(outcome, Rejected)
    assert outcome.reason in (Reason.SCHEMA_DRIFT, Reason.VALIDATION_FAIL)
    assert outcome.unexpected is None, outcome.error
    letter = letter_of(key, value, headers, outcome)
    assert record_size(*letter) <= LETTER_LIMIT


@pytest.mark.parametrize("kind", CLASSES)
def test_every_hostile_class_gets_the_outcome_the_contract_gives(kind):
    hostile = build(kind, Context("acme", f"id-{kind}", LIMIT, PREFIX, random.Random(kind)))
    outcome = admit(VALIDATOR, hostile.value, hostile.headers, here=HERE, source_topics=SOURCE_TOPICS)
    if hostile.lands:
        assert isinstance(outcome, Forward), outcome
        assert outcome.record == {**hostile.record, "links": [], "deleted": False}
        assert read_origin(outcome.headers, topics=SOURCE_TOPICS) == HERE  # never a producer's origin
    else:
        assert isinstance(outcome, Rejected)
        assert (outcome.reason.value, outcome.stage.value) == hostile.expect, outcome.error
        assert record_size(*letter_of(hostile.key, hostile.value, hostile.headers, outcome)) <= LETTER_LIMIT


json_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=30)
header_lists = st.lists(st.tuples(
    st.sampled_from(["ingest.origin.topic", "ingest.origin.partition", "ingest.origin.offset",
                     "ingest.origin.timestamp", "ingest.redrive", "ingest.replay", "dlq.reason", "x"])
    | st.text(max_size=12),
    st.binary(max_size=40) | st.none() | st.sampled_from(
        [b"ingest.legal.holds", b"ingest.source.kafka", b"0", b"-1", str(2**63).encode(), b"\xff"])),
    max_size=6)
fields = st.sampled_from(["schema_version", "tenant", "source", "id", "revision", "event_time", "priority",
                          "kind", "attributes", "links", "deleted", "rev", "ts", "data", "extra"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.binary(max_size=200) | st.none(), headers=header_lists,
       key=st.binary(max_size=20) | st.none())
def test_any_bytes_give_a_forward_or_a_letter_that_fits(value, headers, key):
    assert_total(key, value, headers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(fields, json_values, max_size=4), drop=st.lists(fields, max_size=2),
       headers=header_lists)
def test_any_near_valid_record_gives_a_forward_or_a_letter_that_fits(changes, drop, headers):
    record = {**v2("acme", "doc-1", 3), **changes}
    for name in drop:
        record.pop(name, None)
    assert_total(b"acme:doc-1", json.dumps(record).encode(), headers)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(min_value=0, max_value=3 * LETTER_LIMIT), headers=header_lists,
       key_size=st.integers(min_value=0, max_value=10_000))
def test_a_letter_always_fits_and_says_when_its_value_was_cut(size, headers, key_size):
    value = bytes(random.Random(size).randbytes(size))
    rejected = Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, "too large")
    key, kept, letter_headers = letter_of(b"k" * key_size, value, headers, rejected)
    assert record_size(key, kept, letter_headers) <= LETTER_LIMIT
    if kept == value:
        assert header_value(letter_headers, VALUE_TRUNCATED_HEADER) is None
    else:
        assert value.startswith(kept)
        assert header_value(letter_headers, VALUE_TRUNCATED_HEADER) == "true"
        assert header_value(letter_headers, VALUE_BYTES_HEADER) == str(size)
        assert header_value(letter_headers, VALUE_SHA256_HEADER) == hashlib.sha256(value).hexdigest()


@pytest.mark.parametrize(("headers", "expected"), [
    ([("ingest.origin.topic", b"ingest.source.s3"), ("ingest.origin.partition", b"1"),
      ("ingest.origin.offset", b"9")], Position("ingest.source.s3", 1, 9)),
    ([("ingest.origin.topic", b"ingest.legal.holds"), ("ingest.origin.partition", b"1"),
      ("ingest.origin.offset", b"9")], None),  # not one of our source topics
    ([("ingest.origin.topic", b"\xff"), ("ingest.origin.partition", b"1"),
      ("ingest.origin.offset", b"9")], None),
    ([("ingest.origin.topic", b"ingest.source.s3"), ("ingest.origin.partition", b"1"),
      ("ingest.origin.offset", str(2**63).encode())], None),
    ([("ingest.origin.topic", b"ingest.source.s3"), ("ingest.origin.partition", b"-1"),
      ("ingest.origin.offset", b"9")], None),
    ([("ingest.origin.topic", b"ingest.source.s3"), ("ingest.origin.partition", "١".encode()),
      ("ingest.origin.offset", b"9")], None),  # a digit to str.isdigit, not to Kafka
])
def test_an_origin_is_read_only_when_well_formed_and_ours(headers, expected):
    assert read_origin(headers, topics=SOURCE_TOPICS) == expected


def test_a_malformed_origin_timestamp_is_left_out_and_the_position_kept():
    headers = [("ingest.origin.topic", b"ingest.source.s3"), ("ingest.origin.partition", b"1"),
               ("ingest.origin.offset", b"9"), ("ingest.origin.timestamp", b"-1")]
    assert read_origin(headers, topics=SOURCE_TOPICS) == Position("ingest.source.s3", 1, 9, None)


def origin_of(topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [("ingest.origin.topic", topic.encode()), ("ingest.origin.partition", str(partition).encode()),
            ("ingest.origin.offset", str(offset).encode())]


def test_a_redriven_record_keeps_its_earlier_origin_a_fresh_one_gets_its_own_position():
    value = json.dumps(v2("acme", "doc-1", 3)).encode()
    earlier = origin_of(HERE.topic, HERE.partition, 9)  # HERE: ingest.source.kafka[2]@40
    fresh = admit(VALIDATOR, value, earlier, here=HERE, source_topics=SOURCE_TOPICS)
    redriven = admit(VALIDATOR, value, [*earlier, ("ingest.redrive", b"1:rd-1")], here=HERE,
                     source_topics=SOURCE_TOPICS)
    assert isinstance(fresh, Forward) and isinstance(redriven, Forward)
    assert read_origin(fresh.headers) == HERE
    assert read_origin(redriven.headers) == Position(HERE.topic, HERE.partition, 9)
    assert redriven.reprocessed and not fresh.reprocessed


@pytest.mark.parametrize("claimed", [
    origin_of("ingest.source.s3", 2, 9),  # another source topic
    origin_of(HERE.topic, 3, 9),  # another partition
    origin_of(HERE.topic, HERE.partition, 41),  # later than the record itself
])
def test_a_forged_redrive_header_can_only_claim_an_earlier_position_of_its_own_partition(claimed):
    """A producer can write ingest.redrive too: a claimed origin that would make the record look
    newer, or come from elsewhere, is not honoured."""
    value = json.dumps(v2("acme", "doc-1", 3)).encode()
    outcome = admit(VALIDATOR, value, [*claimed, ("ingest.redrive", b"1")], here=HERE,
                    source_topics=SOURCE_TOPICS)
    assert isinstance(outcome, Forward) and read_origin(outcome.headers) == HERE


def test_an_unexpected_exception_is_a_flagged_rejection_not_a_crash(monkeypatch):
    validator = RecordValidator.from_directory(PROJECT_ROOT / "schemas", max_record_bytes=LIMIT)

    def broken(raw: bytes) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(validator, "_check", broken)
    verdict = validator.check(b"{}")
    assert isinstance(verdict, Rejected)
    assert verdict.unexpected == "KeyError"
    assert verdict.reason is Reason.VALIDATION_FAIL


def test_a_file_line_is_held_to_its_locations_tenant_and_a_long_lines_stand_in_is_dead_lettered():
    value = json.dumps(v2("beta", "doc-1", 3)).encode()
    other = admit(VALIDATOR, value, [("ingest.adapter.tenant", b"acme")], here=HERE,
                  source_topics=SOURCE_TOPICS)
    assert isinstance(other, Rejected)
    assert (other.reason, other.stage) == (Reason.VALIDATION_FAIL, Stage.VALIDATE)
    assert "not the tenant of its location ('acme')" in other.error
    assert other.identity["tenant"] == "acme"  # the location's letter: dlqtriage --tenant acme finds it
    own = admit(VALIDATOR, value, [("ingest.adapter.tenant", b"beta")], here=HERE,
                source_topics=SOURCE_TOPICS)
    assert isinstance(own, Forward)
    stand_in = admit(VALIDATOR, b"", [("ingest.adapter.line_bytes", b"2000000"),
                                      ("ingest.adapter.tenant", b"acme")],
                     here=HERE, source_topics=SOURCE_TOPICS)
    assert isinstance(stand_in, Rejected) and stand_in.identity == {"tenant": "acme"}
    assert isinstance(stand_in, Rejected) and stand_in.reason is Reason.VALIDATION_FAIL
    assert "the line is 2000000 bytes" in stand_in.error
