"""The agent of one sink topic: batches of validated records → the guarded sink → DLQ → ack.

Sink topics carry records the processing agent validated, but anything can be written to a topic:
each value is checked again (the compiled fast path, microseconds), and the per-record work runs
under one guard (`_write_of`), so a foreign record is dead-lettered instead of crashing the worker
on every restart. A record the sink itself refuses comes back in `outcome.failed` (GuardedSink
isolates it); if every record of a batch failed unexpectedly — in the driver, or before the sink
while the validator's canary fails too — the worker stops before publishing anything (core/guard.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import Any

from faust.types import EventT

from ingest_stream.config import SOURCES
from ingest_stream.core.admission import CANARY
from ingest_stream.core.audit import IngestAudit
from ingest_stream.core.dlq import Position, read_origin, replayed, reprocessed
from ingest_stream.core.guard import broken, looks_broken
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.record import Record
from ingest_stream.core.schemas import Accepted, RecordValidator, Rejected
from ingest_stream.core.timefmt import epoch_ms
from ingest_stream.metrics import Metrics, observe_all
from ingest_stream.sinks.base import BatchOutcome, Write
from ingest_stream.sinks.guarded import GuardedSink
from ingest_stream.stream.backpressure import BackpressureController
from ingest_stream.stream.dlq import DeadLetters, headers_of

log = logging.getLogger(__name__)


class SinkProcessor:
    def __init__(self, sink: GuardedSink, *, validator: RecordValidator, dead_letters: DeadLetters,
                 metrics: Metrics, audit: IngestAudit, gate: BackpressureController,
                 source_topics: Collection[str]) -> None:
        self.sink = sink
        self._source_topics = source_topics
        self._gate = gate
        self._validator = validator
        self.stage = Stage.for_sink(sink.name)
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._audit = audit
        self._lag_by_source: dict[str, Any] = {}  # lag histogram child per source (labels() costs)

    async def process(self, events: Sequence[EventT[Any]]) -> None:
        """A batch of the sink topic (spilled or redriven records): checked again, then written."""
        await self._gate.pace(len(events), source=False)
        started = time.monotonic()
        items: list[tuple[Write, EventT[Any]]] = []
        rejected: list[tuple[EventT[Any], Rejected | Exception]] = []  # published after the batch check
        for event in events:
            try:
                write = self._write_of(event)
            except Exception as exc:  # the per-record guard: a bug met by one record stops nothing
                rejected.append((event, exc))
                continue
            if isinstance(write, Rejected):  # not written by us: a foreign producer
                rejected.append((event, write))
                continue
            items.append((write, event))
        await self._write(items, rejected, count=len(events), started=started)

    async def write_direct(self, items: Sequence[tuple[Write, EventT[Any]]]) -> list[Write]:
        """Records the processing agent validated, handed over in process (stream/lanes.py), each
        with the source event its dead letter is taken from. Returns what an outage left unwritten,
        for the lane to spill: the sink topic's agent waits outages out, not the processing agent."""
        await self._gate.pace(len(items), source=False)
        outcome = await self._write(items, [], count=len(items), started=time.monotonic(),
                                    spill_when_down=True)
        return outcome.unwritten

    async def _write(self, items: Sequence[tuple[Write, EventT[Any]]],
                     rejected: list[tuple[EventT[Any], Rejected | Exception]], *, count: int,
                     started: float, spill_when_down: bool = False) -> BatchOutcome:
        deliveries: list[Awaitable[object]] = []
        writes = [write for write, _ in items]
        event_of = {id(write): event for write, event in items}

        older_lettered: list[Write] = []

        async def dead_letter_older(older: list[Write]) -> None:
            """Before the batch is written: GuardedSink hands each older write over once, and awaits
            this (the letters durable) before it writes anything that hides them (core/revision.py
            decides what is older)."""
            pending = []
            for write in older:
                older_lettered.append(write)
                pending.append(await self._dead_letters.publish(
                    event_of[id(write)], reason=Reason.OLDER_REVISION, stage=self.stage,
                    error=f"$.revision: {write.revision} is older than the revision {self.sink.name} holds",
                    identity=_identity(write)))
            await asyncio.gather(*pending)

        async with self._gate.sink_slots:  # bounded sink concurrency across the sink agents
            outcome = await self.sink.apply(writes, before_write=dead_letter_older,
                                            spill_when_down=spill_when_down)

        unexpected = sum(isinstance(r, Exception) or r.unexpected is not None for _, r in rejected)
        at_the_sink = sum(error.unexpected is not None for _, error, _ in outcome.failed)
        if looks_broken(unexpected + at_the_sink, count) and (
                at_the_sink or not isinstance(self._validator.check(CANARY), Accepted)):
            # Validated records that all fail in the driver, each with an exception no rule knows:
            # a driver or server change, not the records (no probe can tell otherwise: it does
            # not take the path that failed). Before the sink, the validator's canary decides.
            raise broken(f"sink-{self.sink.name}", count)
        for event, rejection in rejected:
            deliveries.append(await (self._dead_letters.unexpected(event, rejection, stage=self.stage)
                                     if isinstance(rejection, Exception)
                                     else self._dead_letters.reject(event, rejection, stage=self.stage)))
        for write, error, attempts in outcome.failed:
            deliveries.append(await self._dead_letters.publish(
                event_of[id(write)], reason=error.reason, stage=self.stage, error=str(error),
                attempts=attempts, identity=_identity(write)))
        await asyncio.gather(*deliveries)

        now_ms = time.time() * 1000
        lags_of_source: dict[str, list[float]] = {}
        lags_of_tenant: dict[str, list[float]] = {}
        for write in outcome.applied:
            record = write.record
            seconds = max(0.0, (now_ms - epoch_ms(record["event_time"])) / 1000)
            lags_of_source.setdefault(record["source"], []).append(seconds)
            lags_of_tenant.setdefault(record["tenant"], []).append(seconds)
        lag_of = self._lag_by_source
        for source, lags in lags_of_source.items():
            lag = lag_of.get(source)
            if lag is None:
                lag = lag_of[source] = self._metrics.lag.labels(self.sink.name, source)
            observe_all(lag, lags)
        refused = [(r.identity if isinstance(r, Rejected) else {}, False) for _, r in rejected]
        refused += [(_identity(w), True) for w in [*(w for w, _, _ in outcome.failed), *older_lettered]]
        self._audit_batch(lags_of_tenant, refused, now_s=now_ms / 1000)
        records = self._metrics.sink_records
        for decision, n in (("applied", len(outcome.applied)), ("skipped", len(outcome.skipped)),
                            ("older", len(outcome.older)), ("failed", len(outcome.failed))):
            if n:
                records.labels(self.sink.name, decision).inc(n)
        self._metrics.sink_batch.labels(self.sink.name).observe(time.monotonic() - started)
        if outcome.applied:
            self._metrics.last_sink_commit.labels(self.sink.name).set(time.time())
        return outcome


    def _audit_batch(self, lags_of_tenant: dict[str, list[float]],
                     refused: list[tuple[Mapping[str, str], bool]], *, now_s: float) -> None:
        """The batch in the ingest audit (core/audit.py): lags per tenant, dead letters per source
        and tenant (bounded: a record that failed validation names any tenant and source)."""
        tenant = self._metrics.tenant
        for name, seconds in lags_of_tenant.items():
            self._audit.lags(tenant(name), self.sink.name, seconds, now_s=now_s)
        by_owner = Counter((identity["source"] if identity.get("source") in SOURCES else "other",
                            tenant(identity.get("tenant"), valid=valid)) for identity, valid in refused)
        for (source, owner), n in by_owner.items():
            self._audit.count(source, owner, "refused", n, now_s=now_s)

    def _write_of(self, event: EventT[Any]) -> Write | Rejected:
        """Pure per-record work: whatever it raises is this record's failure (`process`)."""
        verdict = self._validator.check(event.message.value or b"")
        if isinstance(verdict, Rejected):
            return verdict
        headers = headers_of(event)
        return write_for(verdict.record, read_origin(headers, topics=self._source_topics),
                         may_rewrite_equal=reprocessed(headers), replayed=replayed(headers))


def write_for(record: Record, origin: Position | None, *, may_rewrite_equal: bool, replayed: bool) -> Write:
    """The write of a validated record: its origin, and whether it was redriven or replayed (in
    process: what the processing agent established, `Forward`; from a sink topic: read back from
    the headers it travels with, `_write_of`)."""
    return Write(record, may_rewrite_equal=may_rewrite_equal,
                 origin_tp=f"{origin.topic}:{origin.partition}" if origin else None,
                 origin_offset=origin.offset if origin else None, replayed=replayed)

def _identity(write: Write) -> dict[str, str]:
    r = write.record
    return {"tenant": r["tenant"], "source": r["source"], "id": r["id"]}
