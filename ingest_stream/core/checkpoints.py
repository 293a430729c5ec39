"""The checkpoint table's entries, and what operators are shown of the checkpoint and dedupe tables.

One checkpoint per tenant, source and source-topic partition: the last offset forwarded and the
latest event time seen. The worker writes them (stream/source_agent.py); its web views read its own
table partitions, `ingest-stream checkpoints` / `dedupe-stats` read the changelog topics: both
build their rows here, so they answer alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from ingest_stream.core.dedupe import SeenEntry
from ingest_stream.core.timefmt import format_rfc3339


def checkpoint_key(tenant: str, source: str, partition: int) -> str:
    return f"{tenant}:{source}:{partition}"


def split_key(key: str) -> tuple[str, str, int]:
    """(tenant, source, partition) of a checkpoint key. Tenants match `^[a-z0-9-]+$`: no colon."""
    owner, _, partition = key.rpartition(":")
    tenant, _, source = owner.rpartition(":")
    return tenant, source, int(partition)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    topic: str
    partition: int
    offset: int
    event_time_ms: int  # the latest event time forwarded (not the last record's: they may be late)
    updated_at_ms: int

    def encode(self) -> str:
        return orjson.dumps({"topic": self.topic, "partition": self.partition, "offset": self.offset,
                             "event_time_ms": self.event_time_ms,
                             "updated_at_ms": self.updated_at_ms}).decode()

    @classmethod
    def decode(cls, raw: str | bytes) -> Checkpoint:
        doc = orjson.loads(raw)
        return cls(doc["topic"], doc["partition"], doc["offset"], doc["event_time_ms"], doc["updated_at_ms"])


def checkpoint_rows(entries: Iterable[tuple[str, str]], *, tenant: str | None = None,
                    source: str | None = None) -> list[dict[str, Any]]:
    """Rows of checkpoint table entries (key, encoded value), sorted, optionally one tenant's or
    one source's."""
    rows = []
    for key, value in entries:
        row_tenant, row_source, partition = split_key(key)
        if (tenant is not None and row_tenant != tenant) or (source is not None and row_source != source):
            continue
        checkpoint = Checkpoint.decode(value)
        rows.append({"tenant": row_tenant, "source": row_source, "topic": checkpoint.topic,
                     "partition": partition, "offset": checkpoint.offset,
                     "event_time": rfc3339_ms(checkpoint.event_time_ms),
                     "updated_at": rfc3339_ms(checkpoint.updated_at_ms)})
    return sorted(rows, key=lambda r: (r["tenant"], r["source"], r["partition"]))


def dedupe_row(source: str, values: Iterable[str], *, evicted: int, ttl_s: int, now_ms: int
               ) -> dict[str, Any]:
    """One source's dedupe keys: how many, the oldest and newest first sighting, the TTL, the keys
    past it not evicted yet (the eviction timer runs every INGEST_DEDUPE_EVICT_INTERVAL_S), and the
    keys evicted."""
    seen = [SeenEntry.decode(value).first_seen_ms for value in values]
    ttl_ms = ttl_s * 1000
    return {"source": source, "keys": len(seen), "evicted": evicted, "ttl_s": ttl_s,
            "oldest_first_seen": rfc3339_ms(min(seen)) if seen else None,
            "newest_first_seen": rfc3339_ms(max(seen)) if seen else None,
            "expired_not_evicted": sum(now_ms - ms >= ttl_ms for ms in seen)}


def rfc3339_ms(epoch_ms: int) -> str:
    return format_rfc3339(datetime.fromtimestamp(epoch_ms / 1000, UTC))
