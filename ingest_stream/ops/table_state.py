"""What the worker's tables hold, read from their changelog topics (the tables' durable copy, from
which Faust rebuilds them): per tenant and source checkpoints, and dedupe statistics. No worker
has to run, and every partition is seen whichever worker owns it.

Faust writes a table's keys and values JSON-encoded: a checkpoint's value is the JSON text of
{"topic", "partition", "offset", "event_time_ms", "updated_at_ms"}; a dedupe key's value is
`partition:offset:first_seen_ms` (core/dedupe.SeenEntry); an evicted key is a tombstone (None).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from ingest_stream.config import SOURCES, Settings
from ingest_stream.core.dedupe import SeenEntry
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.ops.kafka_io import scan


def changelog_topic(settings: Settings, table: str) -> str:
    """Faust's name for a table's changelog topic."""
    return f"{settings.app_id}-{table}-changelog"


async def latest(settings: Settings, table: str) -> tuple[dict[str, str], int]:
    """The table's entries (its latest value per key), and how many keys were deleted."""
    entries: dict[str, str] = {}
    deleted = 0
    async for record in scan(settings.kafka_bootstrap, changelog_topic(settings, table)):
        if record.key is None:
            continue
        key = _text(record.key)
        if record.value is None:
            deleted += key in entries
            entries.pop(key, None)
        else:
            entries[key] = _text(record.value)
    return entries, deleted


async def checkpoints(settings: Settings, *, tenant: str | None = None,
                      sources: Iterable[str] = SOURCES) -> list[dict[str, Any]]:
    """Per tenant, source and source-topic partition: the last offset forwarded and the latest
    event time seen (the checkpoint table of each source)."""
    rows = []
    for source in sources:
        entries, _ = await latest(settings, f"checkpoints-{source}")
        for key, value in entries.items():
            owner, _, partition = key.rpartition(":")
            owner_tenant = owner.rpartition(":")[0]
            if tenant is not None and owner_tenant != tenant:
                continue
            doc = orjson.loads(value)
            rows.append({"tenant": owner_tenant, "source": source, "topic": doc["topic"],
                         "partition": int(partition), "offset": doc["offset"],
                         "event_time": _rfc3339(doc["event_time_ms"]),
                         "updated_at": _rfc3339(doc["updated_at_ms"])})
    return sorted(rows, key=lambda r: (r["tenant"], r["source"], r["partition"]))


async def dedupe_stats(settings: Settings, *, now_ms: int) -> list[dict[str, Any]]:
    """Per source: the dedupe keys held, the oldest and newest first sighting, the TTL, the keys
    past it not evicted yet (the eviction timer runs every INGEST_DEDUPE_EVICT_INTERVAL_S), and the
    keys evicted so far."""
    ttl_ms = settings.dedupe_ttl_s * 1000
    rows = []
    for source in SOURCES:
        entries, evicted = await latest(settings, f"dedupe-{source}")
        seen = [SeenEntry.decode(value).first_seen_ms for value in entries.values()]
        rows.append({"source": source, "keys": len(seen), "evicted": evicted,
                     "ttl_s": settings.dedupe_ttl_s,
                     "oldest_first_seen": _rfc3339(min(seen)) if seen else None,
                     "newest_first_seen": _rfc3339(max(seen)) if seen else None,
                     "expired_not_evicted": sum(now_ms - ms >= ttl_ms for ms in seen)})
    return rows


def _text(raw: bytes) -> str:
    """A Faust table's key or value: JSON text of a string."""
    decoded = orjson.loads(raw)
    return decoded if isinstance(decoded, str) else raw.decode()


def _rfc3339(epoch_ms: int) -> str:
    return format_rfc3339(datetime.fromtimestamp(epoch_ms / 1000, UTC))
