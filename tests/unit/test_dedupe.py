from typing import Any

from ingest_stream.core.dedupe import DedupeDecision, SeenEntry, decide
from ingest_stream.core.dedupe import dedupe_key as key_of_bytes
from ingest_stream.core.record import encode, with_defaults
from tests.dataset import v2


def dedupe_key(record: Any) -> str:
    return key_of_bytes(encode(record))

TTL = 7 * 24 * 3600 * 1000


def test_key_is_sha256_of_the_canonical_record_whatever_the_key_order():
    a = with_defaults(v2("t", "1", 1))
    b = with_defaults(dict(reversed(list(v2("t", "1", 1).items()))))
    assert dedupe_key(a) == dedupe_key(b)
    assert len(dedupe_key(a)) == 64


def test_defaults_written_or_omitted_hash_the_same():
    explicit = with_defaults(v2("t", "1", 1, links=[], deleted=False))
    implicit = v2("t", "1", 1)
    del implicit["priority"]
    implicit["priority"] = "normal"
    assert dedupe_key(explicit) == dedupe_key(with_defaults(implicit))


def test_any_content_change_changes_the_key():
    assert dedupe_key(with_defaults(v2("t", "1", 1))) != dedupe_key(with_defaults(v2("t", "1", 2)))
    changed = v2("t", "1", 1, attributes={"title": "other"})
    assert dedupe_key(with_defaults(v2("t", "1", 1))) != dedupe_key(with_defaults(changed))


def test_unseen_key_is_new():
    assert decide(None, partition=0, offset=5, now_ms=0, ttl_ms=TTL) is DedupeDecision.NEW


def test_same_content_from_another_position_is_a_duplicate():
    seen = SeenEntry(partition=0, offset=5, first_seen_ms=1000)
    assert decide(seen, partition=0, offset=9, now_ms=2000, ttl_ms=TTL) is DedupeDecision.DUPLICATE
    assert decide(seen, partition=1, offset=5, now_ms=2000, ttl_ms=TTL) is DedupeDecision.DUPLICATE


def test_the_same_source_record_again_is_a_redelivery_not_a_duplicate():
    seen = SeenEntry(partition=2, offset=7, first_seen_ms=1000)
    assert decide(seen, partition=2, offset=7, now_ms=2000, ttl_ms=TTL) is DedupeDecision.REDELIVERY


def test_keys_expire_after_the_ttl():
    seen = SeenEntry(partition=0, offset=5, first_seen_ms=0)
    assert decide(seen, partition=0, offset=9, now_ms=TTL - 1, ttl_ms=TTL) is DedupeDecision.DUPLICATE
    assert decide(seen, partition=0, offset=9, now_ms=TTL, ttl_ms=TTL) is DedupeDecision.NEW


def test_seen_entry_round_trips():
    entry = SeenEntry(3, 123456789, 1700000000000)
    assert SeenEntry.decode(entry.encode()) == entry
