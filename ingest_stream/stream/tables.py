"""RocksDB-backed, changelog-backed Faust tables: dedupe keys and checkpoints, one pair per source.

Faust picks a table's partition (and its RocksDB instance) from the *current event*. Batched agents
handle many events at once, so before each table access the agent makes that event current.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import TP, EventT

from ingest_stream.config import SOURCES, Settings
from ingest_stream.core.dedupe import SeenEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceTables:
    dedupe: faust.types.TableT[str, str]  # dedupe key -> SeenEntry.encode()
    # "tenant:source:partition" -> JSON {topic, partition, offset, event_time_ms, updated_at_ms}
    checkpoints: faust.types.TableT[str, str]


def declare_tables(app: faust.App, settings: Settings) -> dict[str, SourceTables]:
    def table(name: str, help_: str) -> faust.types.TableT[str, str]:
        return app.Table(name, key_type=str, value_type=str, partitions=settings.partitions,
                         help=help_)

    return {
        source: SourceTables(
            dedupe=table(f"dedupe-{source}", f"SHA-256 dedupe keys of {source} records"),
            checkpoints=table(f"checkpoints-{source}", f"per tenant checkpoints of {source}"),
        )
        for source in SOURCES
    }


def make_current(event: EventT[Any]) -> None:
    """Make `event` current for this task, so table reads and writes use its partition.

    Only the task-local context variable (what `faust.current_event()` and the tables read). Never
    `Stream._set_current_event`: that also sets the stream's shared `current_event` attribute, which
    `noack_take`'s buffering processor reads after an await in another task — overwriting it there
    made the buffer take a previous event twice and lose its own record (seen here).
    """
    _current_event.set(weakref.ref(event))


async def evict_expired(table: faust.types.TableT[str, str], *, now_ms: int, ttl_ms: int,
                        partitions: Iterable[int]) -> int:
    """Delete dedupe keys older than the TTL in the partitions this worker owns (changelog too)."""
    owned = set(partitions)
    expired: list[tuple[str, int]] = []
    for index, (key, value) in enumerate(table.data.items()):
        entry = SeenEntry.decode(value)
        if entry.partition in owned and entry.expired(now_ms, ttl_ms):
            expired.append((key, entry.partition))
        if index % 5000 == 4999:
            await asyncio.sleep(0)  # a large table must not block the event loop
    for key, partition in expired:
        del table.data[key]
        table.send_changelog(partition, key, None, value_serializer="raw")
    if expired:
        log.info("table %s: evicted %d expired dedupe key(s)", table.name, len(expired))
    return len(expired)


class BatchedTableWrites:
    """A batch's writes to one table: the store at once, the changelog in one go at the end.

    `table[key] = value` sends each change through Faust's send_soon buffer (a FutureMessage, a
    pending-message queue, and a RocksDB write of the persisted changelog offset per change): the
    most expensive thing a record did here. Same effect, per batch: the store is written at once
    (reads later in the batch see it), the changelog records (same bytes, same partition as Faust
    sends) go straight to the producer, and each partition's persisted offset is written once,
    after delivery. The caller awaits `flush()` before acking the batch, as with any Faust write.
    """

    def __init__(self, table: faust.types.TableT[str, str], producer: Any) -> None:
        self._table = table
        self._producer = producer
        self._pending: list[tuple[int, str, str]] = []

    def set(self, event: EventT[Any], key: str, value: str) -> None:
        make_current(event)  # the store picks the partition's RocksDB from the current event
        self._table.data[key] = value
        self._pending.append((event.message.partition, key, value))

    async def flush(self) -> Awaitable[None]:
        """Send the changelog records; returns what to await for their delivery."""
        table, pending, self._pending = self._table, self._pending, []
        changelog = table.changelog_topic
        name = changelog.get_topic_name()
        deliveries = []
        for partition, key, value in pending:
            key_bytes, _ = changelog.prepare_key(key, table.key_serializer)  # type: ignore[attr-defined]
            value_bytes, _ = changelog.prepare_value(value, table.value_serializer)  # type: ignore[attr-defined]
            deliveries.append(await self._producer.send(name, key_bytes, value_bytes, partition, None, None))

        async def delivered() -> None:
            newest: dict[int, int] = {}
            for metadata in await asyncio.gather(*deliveries):
                newest[metadata.partition] = max(newest.get(metadata.partition, -1), metadata.offset)
            for partition, offset in newest.items():
                table.data.set_persisted_offset(TP(name, partition), offset)  # type: ignore[attr-defined]

        return delivered()
