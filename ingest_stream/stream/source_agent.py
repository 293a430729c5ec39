"""The processing agent of one source topic: validate/upcast → dedupe → fan out to the sinks' lanes.

No record's content can stop it: the per-record work (headers, decode, validate, upcast, encode,
size) runs under one guard (`_accept`), and whatever it raises becomes that record's dead letter.
Only the broker (sends, table reads) may stop it.

Delivery: a batch's events are acked (so their offsets become committable) only after every sink's
lane has written its part or spilled it to the sink topic (stream/lanes.py), every DLQ record they
caused has been acknowledged by the broker, and their dedupe keys and checkpoints are in the
table's changelog (written per batch: `BatchedTableWrites`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Collection, Sequence
from typing import Any

import faust
from faust.types import EventT

from ingest_stream.config import Settings
from ingest_stream.core import dedupe
from ingest_stream.core.admission import Forward, admit, canary_passes
from ingest_stream.core.audit import IngestAudit
from ingest_stream.core.checkpoints import Checkpoint, checkpoint_key
from ingest_stream.core.guard import broken, looks_broken
from ingest_stream.core.reasons import Stage
from ingest_stream.core.schemas import RecordValidator, Rejected
from ingest_stream.core.timefmt import epoch_ms
from ingest_stream.metrics import Metrics
from ingest_stream.stream import faust_internals
from ingest_stream.stream.backpressure import BackpressureController
from ingest_stream.stream.dlq import DeadLetters, headers_of, position_of
from ingest_stream.stream.lanes import LaneRecord, SinkLane
from ingest_stream.stream.producer_batches import RecordBatches, SentBatch
from ingest_stream.stream.sink_agent import write_for
from ingest_stream.stream.tables import BatchedTableWrites, SourceTables, make_current

log = logging.getLogger(__name__)


class SourceProcessor:
    def __init__(
        self,
        source: str,
        *,
        app: faust.App,
        settings: Settings,
        validator: RecordValidator,
        tables: SourceTables,
        lanes: Sequence[SinkLane],
        source_topics: Collection[str],
        dead_letters: DeadLetters,
        metrics: Metrics,
        audit: IngestAudit,
        gate: BackpressureController,
    ) -> None:
        self.source = source
        self._gate = gate
        self._app = app
        self._validator = validator
        self._tables = tables
        self._lanes = lanes
        self._source_topics = source_topics
        self._dead_letters = dead_letters
        self._ttl_ms = settings.dedupe_ttl_s * 1000
        self._outcomes = metrics.records.labels(source, "forwarded")
        self._rejected = metrics.records.labels(source, "rejected")
        self._duplicate = metrics.records.labels(source, "duplicate")
        self._duplicates = metrics.duplicates.labels(source)
        self._metrics = metrics
        self._audit = audit

    async def process(self, events: Sequence[EventT[Any]]) -> Awaitable[None]:
        """Validate, dedupe and send what the batch causes, in order; returns what is left before
        the batch may be acked (the broker's acknowledgements, `_settle`)."""
        await self._gate.pace(len(events), source=True)
        deliveries: list[Awaitable[object]] = []
        checkpoints: dict[str, tuple[EventT[Any], int]] = {}
        now_ms = int(time.time() * 1000)
        batches = RecordBatches(faust_internals.aiokafka_producer(self._app))
        seen_keys = BatchedTableWrites(self._tables.dedupe)
        checkpoint_writes = BatchedTableWrites(self._tables.checkpoints)
        counted: Counter[tuple[str | None, str]] = Counter()  # (tenant, outcome): counted once per batch
        rejected: list[tuple[EventT[Any], Rejected | Exception]] = []  # published after the batch check
        forwarded: list[LaneRecord] = []
        admitted: list[tuple[EventT[Any], Forward, bytes | None]] = []  # the dedupe key, if checked
        for event in events:
            try:
                accepted = self._accept(event)
            except Exception as exc:  # the per-record guard: a bug met by one record stops nothing
                rejected.append((event, exc))
                continue
            if isinstance(accepted, Rejected):
                rejected.append((event, accepted))
                continue
            if not self._gate.keeps(self.source, accepted.record["priority"]):
                counted[accepted.record["tenant"], "dropped"] += 1
                continue  # brownout: still in the source topic, for a replay (docs/design.md)
            key = None if accepted.reprocessed else seen_keys.key_bytes(dedupe.dedupe_key(accepted.encoded))
            admitted.append((event, accepted, key))
        seen = self._seen(admitted, seen_keys)
        for event, accepted, key in admitted:
            record = accepted.record
            if key is not None and self._is_duplicate(event, key, seen, seen_keys, now_ms):
                counted[record["tenant"], "duplicate"] += 1
                continue
            forwarded.append(LaneRecord(
                write_for(record, accepted.origin, may_rewrite_equal=accepted.reprocessed,
                          replayed=accepted.replayed),
                event, accepted))
            counted[record["tenant"], "forwarded"] += 1
            checkpoint = checkpoint_key(record["tenant"], self.source, event.message.partition)
            previous = checkpoints.get(checkpoint)
            event_ms = epoch_ms(record["event_time"])
            checkpoints[checkpoint] = (event, max(event_ms, previous[1] if previous else event_ms))
        if looks_broken(sum(_unexpected(r) for _, r in rejected), len(events)) and not canary_passes(
                self._validator, here=position_of(events[0]), source_topics=self._source_topics):
            raise broken(f"process-{self.source}", len(events))
        for event, rejection in rejected:
            self._rejected.inc()
            counted[_tenant_of(rejection), "rejected"] += 1
            deliveries.append(await (self._dead_letters.unexpected(event, rejection, stage=Stage.VALIDATE)
                                     if isinstance(rejection, Exception)
                                     else self._dead_letters.reject(event, rejection)))
        self._count(counted, now_ms)
        self._write_checkpoints(checkpoints, checkpoint_writes, now_ms)
        await seen_keys.add_to(batches)
        await checkpoint_writes.add_to(batches)
        sent = await batches.send()
        deliveries += [lane.submit(forwarded) for lane in self._lanes]
        return self._settle(deliveries, sent, seen_keys, checkpoint_writes)

    def _accept(self, event: EventT[Any]) -> Forward | Rejected:
        """Pure per-record work (core/admission.py); whatever it raises is this record's failure."""
        return admit(self._validator, event.message.value, headers_of(event), here=position_of(event),
                     source_topics=self._source_topics)

    @staticmethod
    async def _settle(deliveries: list[Awaitable[object]], sent: list[SentBatch],
                      *table_writes: BatchedTableWrites) -> None:
        """Raises if the broker refused any record the batch caused, or a lane could neither
        write nor spill its part; only after it returns may the batch be acked. The agent overlaps
        it with the next batches' processing."""
        await asyncio.gather(*deliveries, *(batch.delivery for batch in sent))
        for writes in table_writes:
            await writes.persist_offsets(sent)

    def _count(self, counted: Counter[tuple[str | None, str]], now_ms: int) -> None:
        by_outcome: Counter[str] = Counter()
        for (tenant, outcome), n in counted.items():
            label = self._metrics.tenant(tenant, valid=outcome != "rejected")
            self._audit.count(self.source, label, outcome, n, now_s=now_ms / 1000)
            if outcome in ("forwarded", "duplicate"):
                self._metrics.tenant_records.labels(label, outcome).inc(n)
            by_outcome[outcome] += n
        if by_outcome["forwarded"]:
            self._outcomes.inc(by_outcome["forwarded"])
        if by_outcome["duplicate"]:
            self._duplicate.inc(by_outcome["duplicate"])
            self._duplicates.inc(by_outcome["duplicate"])

    @staticmethod
    def _seen(admitted: list[tuple[EventT[Any], Forward, bytes | None]], seen_keys: BatchedTableWrites
              ) -> dict[tuple[int, bytes], str | None]:
        """Where each dedupe key of the batch was first seen, per partition: one multi-get each."""
        by_partition: dict[int, list[bytes]] = {}
        for event, _, key in admitted:
            if key is not None:
                by_partition.setdefault(event.message.partition, []).append(key)
        seen: dict[tuple[int, bytes], str | None] = {}
        for partition, keys in by_partition.items():
            unique = list(dict.fromkeys(keys))
            seen.update(zip(((partition, k) for k in unique), seen_keys.get_many(partition, unique),
                            strict=True))
        return seen

    def _is_duplicate(self, event: EventT[Any], key: bytes, seen: dict[tuple[int, bytes], str | None],
                      seen_keys: BatchedTableWrites, now_ms: int) -> bool:
        """The dedupe rule (core/dedupe.py) on what the batch read, and on its own new keys."""
        message = event.message
        stored = seen[message.partition, key]
        entry = dedupe.SeenEntry.decode(stored) if stored is not None else None
        decision = dedupe.decide(entry, partition=message.partition, offset=message.offset, now_ms=now_ms,
                                 ttl_ms=self._ttl_ms)
        if decision is dedupe.DedupeDecision.NEW:
            value = dedupe.SeenEntry(message.partition, message.offset, now_ms).encode()
            seen_keys.set(event, key, value)
            seen[message.partition, key] = value  # a second copy later in the batch is a duplicate
        return decision is dedupe.DedupeDecision.DUPLICATE

    def _write_checkpoints(self, checkpoints: dict[str, tuple[EventT[Any], int]],
                           writes: BatchedTableWrites, now_ms: int) -> None:
        table = self._tables.checkpoints
        for name, (event, event_ms) in checkpoints.items():
            make_current(event)
            previous = table.get(name)
            if previous is not None:
                event_ms = max(event_ms, Checkpoint.decode(previous).event_time_ms)
            message = event.message
            writes.set(event, name, Checkpoint(message.topic, message.partition, message.offset,
                                               event_ms, now_ms).encode())


def _tenant_of(rejection: Rejected | Exception) -> str | None:
    """The tenant a rejected record names, if any (only ever a bounded label: `Metrics.tenant`)."""
    return None if isinstance(rejection, Exception) else rejection.identity.get("tenant")


def _unexpected(rejection: Rejected | Exception) -> bool:
    return isinstance(rejection, Exception) or rejection.unexpected is not None
