"""Issue 16: what `dlqtriage` prints cannot drive the operator's terminal, whatever a dead letter
holds; hostile letters are shown, not crashed on."""

from __future__ import annotations

import hashlib
import io
import json
import re
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
from ingest_stream.core.triage import DeadLetter, Status, analyze, summarize
from ingest_stream.ops.dead_letters import sample_document
from ingest_stream.ops.dlqtriage import print_analysis, print_samples
from ingest_stream.ops.output import format_table, json_text, printable

# What a terminal acts on: C0 but newline, DEL, C1, bidi overrides and isolates, line separators.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
ATTACK = "\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\r\x08\u2028"


@pytest.mark.parametrize(("text", "shown"), [
    ("\x1b[31m", "\\x1b[31m"), ("a\nb\tc\rd", "a\\nb\\tc\\rd"), ("\x00\x7f", "\\x00\\x7f"),
    ("\x9b", "\\x9b"), ("\u202eabc", "\\u202eabc"), ("\u2066x\u2069", "\\u2066x\\u2069"),
    ("\ud800", "\\ud800"), ("café 日本 \\x1b", "café 日本 \\x1b"), (42, "42"),
])
def test_printable_escapes_control_characters_like_repr_and_keeps_the_rest(text, shown):
    assert printable(text) == shown


def test_json_output_escapes_what_json_leaves_raw_and_stays_the_same_document():
    document = {"value": ATTACK + " café", "n": [1, "\x85"]}
    for indent in (False, True):
        text = json_text(document, indent=indent)
        assert not RAW_CONTROL.search(text.replace("\n", ""))
        assert json.loads(text) == document


def test_a_table_cell_cannot_break_the_table_or_the_terminal():
    table = format_table(("TENANT", "COUNT"), [(ATTACK, 1), ("acme", 2)])
    assert not RAW_CONTROL.search(table)
    assert len(table.splitlines()) == 3


def hostile_letter(*, extra: tuple = (), value: bytes = b"") -> DeadLetter:
    headers = [*failure_headers(
        [("x-producer", ATTACK.encode()), ("bin", b"\xff\xfe\x1b"), ("empty", b"")],
        reason=Reason.SCHEMA_DRIFT, stage=Stage.DECODE, error="bad " + ATTACK, attempts=1,
        origin=Position("ingest.source.kafka", 0, 5), failed=None, failed_at=datetime(2026, 1, 1, tzinfo=UTC),
        identity={"tenant": ATTACK, "id": ATTACK}), *extra]
    return DeadLetter(0, 9, b"\x1b[2Jkey\xff", value or ATTACK.encode() + b"\xff\xc3", tuple(headers),
                      DlqEnvelope.from_headers(headers))


def test_sample_shows_a_hostile_letter_escaped():
    document = sample_document(hostile_letter(), Status.OPEN, full=True)
    assert document["headers"]["bin"] == "\\xff\\xfe\x1b"  # bytes that are not UTF-8, as escapes
    assert document["value"].endswith("\\xff\\xc3")
    assert document["truncated"] is None
    out = io.StringIO()
    print_samples([document], out)
    text = out.getvalue()
    assert not RAW_CONTROL.search(text)
    assert "key=\\x1b[2Jkey\\xff" in text and "\\x1b]0;owned\\x07" in text and "\\u202eevil" in text
    assert "dlq.error: bad \\x1b]0;owned" in text


def test_sample_says_a_letter_is_truncated_and_where_the_whole_record_is():
    original = b"y" * 10_000
    flags = ((VALUE_TRUNCATED_HEADER, b"true"), (VALUE_BYTES_HEADER, b"10000"),
             (VALUE_SHA256_HEADER, hashlib.sha256(original).hexdigest().encode()))
    document = sample_document(hostile_letter(extra=flags, value=original[:600]), Status.OPEN, full=False)
    assert document["truncated"] == {"prefix_bytes": 600, "original_bytes": 10_000,
                                     "sha256": hashlib.sha256(original).hexdigest(),
                                     "original_at": "ingest.source.kafka[0]@5"}
    assert document["value"].endswith("... (600 bytes)")
    out = io.StringIO()
    print_samples([document], out)
    assert "TRUNCATED: the value is the first 600 of 10000 bytes" in out.getvalue()
    assert "ingest.source.kafka[0]@5" in out.getvalue()


def test_sample_flags_garbled_truncation_headers():
    garbled = hostile_letter(extra=((VALUE_TRUNCATED_HEADER, b"true"), (VALUE_BYTES_HEADER, b"\x1b")))
    document = sample_document(garbled, Status.OPEN, full=False)
    assert "dlq.value_bytes" in document["truncated"]["garbled"]
    out = io.StringIO()
    print_samples([document], out)
    assert "TRUNCATED?" in out.getvalue() and not RAW_CONTROL.search(out.getvalue())


def test_analysis_and_summary_of_hostile_letters_print_escaped():
    letters = [hostile_letter(), hostile_letter()]
    out = io.StringIO()
    print_analysis(analyze(letters), out)
    assert "tenants: \\x1b]0;owned" in out.getvalue() and not RAW_CONTROL.search(out.getvalue())
    summary = summarize([(letter, Status.OPEN) for letter in letters])
    table = format_table(("REASON", "TENANT"), [(g["reason"], g["tenant"]) for g in summary["groups"]])
    assert not RAW_CONTROL.search(table)
