"""RocksDB-backed, changelog-backed Faust tables: dedupe keys and checkpoints, one pair per source.

Faust picks a table's partition (and its RocksDB instance) from the *current event*. Batched agents
handle many events at once, so before each table access the agent makes that event current.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import faust
import faust.stores
import rocksdict
from faust.stores.rocksdb import RocksDBOptions
from faust.stores.rocksdb import Store as RocksDBStore
from faust.streams import _current_event
from faust.types import TP, EventT

from ingest_stream.config import SOURCES, Settings
from ingest_stream.core.dedupe import SeenEntry
from ingest_stream.stream import faust_internals
from ingest_stream.stream.producer_batches import RecordBatches, SentBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceTables:
    dedupe: faust.types.TableT[str, str]  # dedupe key -> SeenEntry.encode()
    # "tenant:source:partition" -> JSON {topic, partition, offset, event_time_ms, updated_at_ms}
    checkpoints: faust.types.TableT[str, str]


def declare_tables(app: faust.App, settings: Settings) -> dict[str, SourceTables]:
    def table(name: str, help_: str) -> faust.types.TableT[str, str]:
        return app.Table(name, key_type=str, value_type=str, partitions=settings.partitions,
                         help=help_, options=rocksdb_options(settings))

    return {
        source: SourceTables(
            dedupe=table(f"dedupe-{source}", f"SHA-256 dedupe keys of {source} records"),
            checkpoints=table(f"checkpoints-{source}", f"per tenant checkpoints of {source}"),
        )
        for source in SOURCES
    }


MIB = 1024 * 1024
STORE_URL = "ingest-rocksdb://"  # BudgetedRocksDBStore, registered below


def rocksdb_options(settings: Settings) -> dict[str, int]:
    """One memory budget for the worker's RocksDB, whatever the number of table partitions.

    Faust opens one RocksDB instance per table partition (sources x 2 tables x partitions: 32 here)
    with up to 3 x 64 MiB of memtables and a 2 GiB block cache *each*. Even at 8 MiB x 2 and
    16 MiB each, a worker's memory climbed for many minutes (memtables filling, then block caches).
    """
    budget = settings.rocksdb_write_buffer_mib * MIB
    return {"write_buffer_size": max(budget // 4, MIB), "max_write_buffer_number": 2,
            "target_file_size_base": max(budget // 4, MIB),
            # What Faust's own options would give each instance if the shared budget were not used.
            "block_cache_size": MIB,
            "worker_write_buffer_bytes": budget,
            "worker_block_cache_bytes": settings.rocksdb_block_cache_mib * MIB}


@functools.cache
def worker_rocksdb_memory(write_buffer_bytes: int, block_cache_bytes: int
                          ) -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    """The block cache (data, index and filter blocks) and the memtable budget that every RocksDB
    instance of this worker shares (RocksDB's Write Buffer Manager: a flush when the total nears it)."""
    return (rocksdict.Cache(block_cache_bytes),
            rocksdict.WriteBufferManager(write_buffer_bytes, False))


def block_cache_bytes(settings: Settings) -> int:
    """The worker's shared block cache in use (data, index and filter blocks): the one the stores
    opened with, from the same options."""
    options = rocksdb_options(settings)
    cache, _ = worker_rocksdb_memory(options["worker_write_buffer_bytes"],
                                     options["worker_block_cache_bytes"])
    return int(cache.get_usage())


def memtable_bytes(tables: Iterable[faust.types.TableT[str, str]]) -> int:
    """Memtables of every RocksDB instance the tables have open (what the write buffer budget caps)."""
    total = 0
    for table in tables:
        for db in getattr(table.data, "_dbs", {}).values():  # Faust's RocksDB store: partition -> DB
            total += db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
    return total


class BudgetedRocksDBOptions(RocksDBOptions):
    def as_options(self) -> rocksdict.Options:
        options: rocksdict.Options = super().as_options()
        defaults = Settings()
        cache, write_buffers = worker_rocksdb_memory(
            self.extra_options.get("worker_write_buffer_bytes", defaults.rocksdb_write_buffer_mib * MIB),
            self.extra_options.get("worker_block_cache_bytes", defaults.rocksdb_block_cache_mib * MIB))
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, True)
        table.set_block_cache(cache)
        table.set_cache_index_and_filter_blocks(True)  # counted in the budget, not beside it
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        options.set_write_buffer_manager(write_buffers)
        return options


class BudgetedRocksDBStore(RocksDBStore):
    """Faust's RocksDB store, opening its instances with the worker's shared memory budget."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rocksdb_options = BudgetedRocksDBOptions(**(self.options or {}), use_rocksdict=True)


faust.stores.STORES.aliases[STORE_URL.split(":")[0]] = f"{__name__}:BudgetedRocksDBStore"


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
    """A batch's reads and writes of one table, straight on its RocksDB partitions.

    Through the table, each key cost a FutureMessage, a pending-message queue and a RocksDB write of
    the persisted changelog offset per change (`table[key] = value`), and ~7 µs per read, in an
    index of every key touched that only grows (Faust's `Store._key_index`). Here: the keys of a
    batch are read with one multi-get per partition (`get_many`); its writes (`set`) go to the
    store as one write batch per partition and to the changelog as the batch's records, with the
    same bytes Faust's codec gives the table and its changelog (recovery writes changelog bytes
    into the same RocksDB: unchanged); each partition's persisted offset is written once, after
    delivery. The caller acks the batch only after that, as with any Faust write. Reads see a
    batch's own writes only once it is sent (`add_to`): the caller keeps what it wrote meanwhile.
    """

    def __init__(self, table: faust.types.TableT[str, str]) -> None:
        self._table = table
        self._changelog = table.changelog_topic
        self.topic_name = self._changelog.get_topic_name()
        self._loads = functools.partial(table.app.serializers.loads_value, table.value_type,
                                        serializer=table.value_serializer)  # type: ignore[attr-defined]
        self._pending: list[tuple[int, bytes, bytes]] = []

    def key_bytes(self, key: str) -> bytes:
        return self._changelog.prepare_key(key, self._table.key_serializer)[0]  # type: ignore[attr-defined,no-any-return]

    def get_many(self, partition: int, keys: list[bytes]) -> list[str | None]:
        """The values of `keys` (as `key_bytes` gives them) in one partition: one multi-get."""
        if not keys:
            return []
        found = faust_internals.table_partition_db(self._table, partition)[keys]
        return [None if value is None else self._loads(value) for value in found]

    def set(self, event: EventT[Any], key: str | bytes, value: str) -> None:
        """Write `key` in the event's partition (a str, or bytes from `key_bytes`)."""
        key_bytes = key if isinstance(key, bytes) else self.key_bytes(key)
        value_bytes, _ = self._changelog.prepare_value(value, self._table.value_serializer)  # type: ignore[attr-defined]
        self._pending.append((event.message.partition, key_bytes, value_bytes))

    async def add_to(self, batches: RecordBatches) -> None:
        """The writes so far: into the store (a write batch per partition) and, as changelog
        records, into the batch's record batches."""
        by_partition: dict[int, rocksdict.WriteBatch] = {}
        for partition, key_bytes, value_bytes in self._pending:
            write = by_partition.get(partition)
            if write is None:
                write = by_partition[partition] = rocksdict.WriteBatch(raw_mode=True)
            write.put(key_bytes, value_bytes)
        for partition, write in by_partition.items():
            faust_internals.table_partition_db(self._table, partition).write(write)
        for partition, key_bytes, value_bytes in self._pending:
            await batches.add(self.topic_name, key_bytes, value_bytes, partition=partition)
        self._pending = []

    async def persist_offsets(self, sent: Iterable[SentBatch]) -> None:
        """After delivery: each changelog partition's newest offset, as Faust's send callback does."""
        newest: dict[int, int] = {}
        for batch in sent:
            if batch.topic == self.topic_name:
                newest[batch.partition] = max(newest.get(batch.partition, -1), await batch.last_offset())
        for partition, offset in newest.items():
            self._table.data.set_persisted_offset(TP(self.topic_name, partition), offset)  # type: ignore[attr-defined]
