"""Checkpoint table entries and what operators are shown of the checkpoint and dedupe tables."""

import pytest

from ingest_stream.core.checkpoints import (
    Checkpoint,
    checkpoint_key,
    checkpoint_rows,
    dedupe_row,
    rfc3339_ms,
    split_key,
)
from ingest_stream.core.dedupe import SeenEntry
from ingest_stream.core.timefmt import epoch_ms, is_rfc3339

EVENT_MS = 1_700_000_000_123  # 2023-11-14T22:13:20.123Z
UPDATED_MS = 1_800_000_000_000  # 2027-01-15T08:00:00.000Z
HOUR_MS = 3600 * 1000


def entry(tenant: str, source: str, partition: int, offset: int = 0) -> tuple[str, str]:
    checkpoint = Checkpoint(f"ingest.{source}", partition, offset, EVENT_MS, UPDATED_MS)
    return checkpoint_key(tenant, source, partition), checkpoint.encode()


def test_a_checkpoint_round_trips_through_its_encoding():
    checkpoint = Checkpoint("ingest.webhook", 3, 123_456_789, EVENT_MS, UPDATED_MS)
    encoded = checkpoint.encode()
    assert isinstance(encoded, str)
    assert Checkpoint.decode(encoded) == checkpoint
    assert Checkpoint.decode(encoded.encode()) == checkpoint  # as a changelog gives it: bytes


@pytest.mark.parametrize(("tenant", "source", "partition"), [
    ("acme", "webhook", 0),
    ("acme-eu-2", "s3", 17),
    ("a-b-c-d", "sftp", 123),
    ("t0", "webhook", 1),
])
def test_a_checkpoint_key_splits_back_into_tenant_source_and_partition(tenant, source, partition):
    key = checkpoint_key(tenant, source, partition)
    assert key == f"{tenant}:{source}:{partition}"
    assert split_key(key) == (tenant, source, partition)


def test_checkpoint_rows_are_sorted_by_tenant_source_and_partition_number():
    entries = [entry("beta", "webhook", 0), entry("acme", "webhook", 10), entry("acme", "s3", 1),
               entry("acme", "webhook", 2), entry("acme-eu", "s3", 0)]
    rows = checkpoint_rows(entries)
    assert [(r["tenant"], r["source"], r["partition"]) for r in rows] == [
        ("acme", "s3", 1), ("acme", "webhook", 2), ("acme", "webhook", 10), ("acme-eu", "s3", 0),
        ("beta", "webhook", 0)]


def test_a_checkpoint_row_shows_topic_offset_and_rfc3339_times():
    row = checkpoint_rows([entry("acme-eu-2", "webhook", 4, offset=99)])[0]
    assert row == {"tenant": "acme-eu-2", "source": "webhook", "topic": "ingest.webhook", "partition": 4,
                   "offset": 99, "event_time": "2023-11-14T22:13:20.123Z",
                   "updated_at": "2027-01-15T08:00:00.000Z"}
    assert is_rfc3339(row["event_time"]) and is_rfc3339(row["updated_at"])
    assert (epoch_ms(row["event_time"]), epoch_ms(row["updated_at"])) == (EVENT_MS, UPDATED_MS)


@pytest.mark.parametrize("ms", [0, 1, 999, EVENT_MS, UPDATED_MS + 1, 1_699_999_999_999])
def test_times_are_shown_to_the_millisecond_in_utc(ms):
    text = rfc3339_ms(ms)
    assert text.endswith("Z") and len(text) == len("2023-11-14T22:13:20.123Z")
    assert epoch_ms(text) == ms


def test_checkpoint_rows_can_be_one_tenants_or_one_sources():
    entries = [entry("acme", "webhook", 0), entry("acme", "s3", 0), entry("beta", "s3", 1),
               entry("acme-eu", "webhook", 0)]

    def keys(**kwargs):
        return [(r["tenant"], r["source"]) for r in checkpoint_rows(entries, **kwargs)]

    assert keys(tenant="acme") == [("acme", "s3"), ("acme", "webhook")]  # not acme-eu
    assert keys(source="s3") == [("acme", "s3"), ("beta", "s3")]
    assert keys(tenant="acme", source="s3") == [("acme", "s3")]
    assert keys(tenant="nobody") == []
    assert checkpoint_rows([]) == []


def test_a_dedupe_row_counts_keys_and_shows_the_oldest_and_newest_first_sighting():
    now_ms = UPDATED_MS
    seen = [now_ms - 30 * 60 * 1000, now_ms - 2 * HOUR_MS, now_ms]
    values = [SeenEntry(0, i, ms).encode() for i, ms in enumerate(seen)]
    row = dedupe_row("webhook", values, evicted=7, ttl_s=24 * 3600, now_ms=now_ms)
    assert row == {"source": "webhook", "keys": 3, "evicted": 7, "ttl_s": 24 * 3600,
                   "oldest_first_seen": "2027-01-15T06:00:00.000Z",
                   "newest_first_seen": "2027-01-15T08:00:00.000Z", "expired_not_evicted": 0}


def test_a_key_exactly_ttl_old_counts_as_expired_not_evicted():
    now_ms = UPDATED_MS
    seen = [now_ms - HOUR_MS - 1, now_ms - HOUR_MS, now_ms - HOUR_MS + 1, now_ms]
    values = [SeenEntry(1, i, ms).encode() for i, ms in enumerate(seen)]
    row = dedupe_row("s3", values, evicted=0, ttl_s=3600, now_ms=now_ms)
    assert row["expired_not_evicted"] == 2
    # the same rule as the dedupe decision's
    assert sum(SeenEntry.decode(v).expired(now_ms, HOUR_MS) for v in values) == 2


def test_a_source_without_dedupe_keys_has_no_oldest_or_newest():
    row = dedupe_row("sftp", [], evicted=3, ttl_s=60, now_ms=UPDATED_MS)
    assert row == {"source": "sftp", "keys": 0, "evicted": 3, "ttl_s": 60, "oldest_first_seen": None,
                   "newest_first_seen": None, "expired_not_evicted": 0}


def test_a_dedupe_row_reads_a_generator_of_values_once():
    row = dedupe_row("webhook", (SeenEntry(0, i, UPDATED_MS - i).encode() for i in range(3)),
                     evicted=0, ttl_s=1, now_ms=UPDATED_MS)
    assert (row["keys"], row["oldest_first_seen"], row["expired_not_evicted"]) == (
        3, "2027-01-15T07:59:59.998Z", 0)
