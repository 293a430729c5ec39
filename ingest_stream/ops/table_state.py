"""What the worker's tables hold, read from their changelog topics (the tables' durable copy, from
which Faust rebuilds them): per tenant and source checkpoints, and dedupe statistics. No worker
has to run, and every partition is seen whichever worker owns it.

Faust writes a table's keys and values JSON-encoded: a checkpoint's value is the JSON text of
{"topic", "partition", "offset", "event_time_ms", "updated_at_ms"}; a dedupe key's value is
`partition:offset:first_seen_ms` (core/dedupe.SeenEntry); an evicted key is a tombstone (None).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from ingest_stream.config import SOURCES, Settings
from ingest_stream.core.checkpoints import checkpoint_rows, dedupe_row
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
        rows += checkpoint_rows(entries.items(), tenant=tenant)
    return sorted(rows, key=lambda r: (r["tenant"], r["source"], r["partition"]))


async def dedupe_stats(settings: Settings, *, now_ms: int) -> list[dict[str, Any]]:
    """Per source: the dedupe keys held and evicted (core/checkpoints.dedupe_row)."""
    rows = []
    for source in SOURCES:
        entries, evicted = await latest(settings, f"dedupe-{source}")
        rows.append(dedupe_row(source, entries.values(), evicted=evicted, ttl_s=settings.dedupe_ttl_s,
                               now_ms=now_ms))
    return rows


def _text(raw: bytes) -> str:
    """A Faust table's key or value: JSON text of a string."""
    decoded = orjson.loads(raw)
    return decoded if isinstance(decoded, str) else raw.decode()
