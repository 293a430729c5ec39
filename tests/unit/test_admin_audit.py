"""The admin audit trail: a torn or garbled line never stops the worker, and never spoils the next
entry; query parameters the admin routes cannot take are refused with a reason."""

import logging

import orjson
import pytest

from ingest_stream.stream.admin import AuditTrail, QueryError, query_limit, query_rate, read_audit


def entry(n: int) -> dict[str, object]:
    return {"at": f"2026-01-01T00:00:{n:02d}Z", "who": "alice", "remote": "127.0.0.1",
            "action": "drain", "params": {}, "result": "ok"}


def lines(*parts: bytes) -> list[bytes]:
    """As iterating a file opened in binary mode yields them."""
    return b"".join(parts).splitlines(keepends=True)


def test_a_torn_last_line_is_skipped_and_the_rest_read():
    torn = orjson.dumps(entry(2))[:25]
    read = read_audit(lines(orjson.dumps(entry(0)), b"\n", orjson.dumps(entry(1)), b"\n", torn), keep=10)
    assert list(read.entries) == [entry(0), entry(1)]
    assert (read.skipped, read.skipped_lines) == (1, [3])


@pytest.mark.parametrize("garbled", [b"{nope", b"\xff\xfe\x00", b"[1, 2]", b"42", b'"text"', b"null"])
def test_a_line_that_is_not_an_entry_is_skipped_wherever_it_is(garbled):
    read = read_audit(lines(garbled, b"\n", orjson.dumps(entry(1)), b"\n\n"), keep=10)
    assert list(read.entries) == [entry(1)]
    assert read.skipped_lines == [1]


def test_only_the_last_entries_are_kept_and_only_the_first_skipped_lines_named():
    read = read_audit(lines(*[b"x\n"] * 25, *[orjson.dumps(entry(n)) + b"\n" for n in range(5)]), keep=3)
    assert list(read.entries) == [entry(2), entry(3), entry(4)]
    assert read.skipped == 25 and read.skipped_lines == list(range(1, 11))


def test_a_trail_with_a_torn_line_starts_and_appends_on_a_fresh_line(tmp_path, caplog):
    path = tmp_path / "admin-audit.jsonl"
    path.write_bytes(orjson.dumps(entry(0)) + b"\n" + orjson.dumps(entry(1))[:30])  # crashed mid-append
    with caplog.at_level(logging.WARNING, logger="ingest_stream.stream.admin"):
        trail = AuditTrail(path)
    assert trail.recent(10) == [entry(0)]
    assert "1 line(s) not read" in caplog.text and "line 2" in caplog.text

    trail.record(entry(2))
    trail.record(entry(3))
    assert trail.recent(10) == [entry(0), entry(2), entry(3)]
    # Read again (a restart): the new entries are whole lines; only the torn fragment is lost.
    again = read_audit(path.read_bytes().splitlines(keepends=True), keep=10)
    assert list(again.entries) == [entry(0), entry(2), entry(3)]
    assert again.skipped_lines == [2]


def test_a_trail_appends_to_a_new_file_and_a_whole_last_line_without_a_newline(tmp_path):
    path = tmp_path / "audit" / "admin-audit.jsonl"
    AuditTrail(path).record(entry(0))
    assert path.read_bytes() == orjson.dumps(entry(0)) + b"\n"
    path.write_bytes(orjson.dumps(entry(0)))  # whole, but its newline never written
    trail = AuditTrail(path)
    trail.record(entry(1))
    assert path.read_bytes() == orjson.dumps(entry(0)) + b"\n" + orjson.dumps(entry(1)) + b"\n"
    assert trail.recent(10) == [entry(0), entry(1)]


def test_recent_gives_the_last_entries_and_none_for_zero(tmp_path):
    trail = AuditTrail(tmp_path / "admin-audit.jsonl")
    for n in range(5):
        trail.record(entry(n))
    assert trail.recent(2) == [entry(3), entry(4)]
    assert trail.recent(0) == []
    assert len(trail.recent(100)) == 5


@pytest.mark.parametrize(("query", "limit"), [({}, 100), ({"limit": "7"}, 7), ({"limit": "0"}, 0)])
def test_limit_is_a_whole_number(query, limit):
    assert query_limit(query) == limit


@pytest.mark.parametrize("raw", ["abc", "", "1.5", "-1", "1e3", "9" * 5000])
def test_a_limit_that_is_not_a_count_is_refused_with_the_reason(raw):
    with pytest.raises(QueryError, match="limit must be a whole number") as refused:
        query_limit({"limit": raw})
    assert len(str(refused.value)) < 120  # a long value is cut, not echoed


def test_rate_is_a_number_or_absent():
    assert query_rate({}) is None
    assert query_rate({"rate": "0.25"}) == 0.25
    assert query_rate({"rate": "7"}) == 7.0  # out of range: the controller refuses it (400)
    for raw in ("abc", "", "0,5"):
        with pytest.raises(QueryError, match=r"rate must be a number within \[0, 1\]"):
            query_rate({"rate": raw})
