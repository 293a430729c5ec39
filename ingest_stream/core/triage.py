"""DLQ triage: what a dead letter is, its status, which ones an operator's filter selects, and the
message a redrive sends.

A dead letter is identified by its place in the DLQ topic (`partition:offset`). Its status lives
apart from it (the DLQ topic is append-only): open until redriven, parked or purged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import orjson

from ingest_stream.core.dlq import DLQ_PREFIX, REDRIVE_HEADER, DlqEnvelope, Headers, header_value
from ingest_stream.core.reasons import Reason, Stage

REDRIVE_ID_HEADER = "ingest.redrive.id"
DEFAULT_MAX_REDRIVES = 3


class Status(StrEnum):
    OPEN = "open"
    REDRIVEN = "redriven"
    PARKED = "parked"  # came back too often: left for a human, never redriven automatically
    PURGED = "purged"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    envelope: DlqEnvelope

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def failure(self) -> tuple[object, ...]:
        """What failed where: equal for the copies a crash-and-redeliver publishes twice, different
        for the same record failing again after a redrive (its redrive count differs)."""
        e = self.envelope
        return (e.origin.topic, e.origin.partition, e.origin.offset, e.stage.value,
                e.failed and (e.failed.topic, e.failed.partition, e.failed.offset), self.redrives)

    @property
    def redrives(self) -> int:
        """How many times this record had been redriven before it failed this time."""
        raw = header_value(self.headers, REDRIVE_HEADER)
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            return 1  # an older or foreign marker: redriven at least once


@dataclass(frozen=True, slots=True)
class StatusEntry:
    status: Status
    at: str  # RFC 3339
    redrive_id: str | None = None
    note: str | None = None

    def encode(self) -> bytes:
        return orjson.dumps({k: v for k, v in (("status", self.status.value), ("at", self.at),
                                               ("redrive_id", self.redrive_id), ("note", self.note))
                             if v is not None})

    @classmethod
    def decode(cls, raw: bytes) -> StatusEntry:
        data = orjson.loads(raw)
        return cls(Status(data["status"]), data["at"], data.get("redrive_id"), data.get("note"))


@dataclass(frozen=True)
class Selection:
    """An operator's filter; an empty field selects everything."""

    tenant: str | None = None
    reasons: frozenset[Reason] = frozenset()
    stage: Stage | None = None
    record_id: str | None = None
    failed_before: datetime | None = None
    failed_after: datetime | None = None
    statuses: frozenset[Status] = frozenset({Status.OPEN})

    def matches(self, letter: DeadLetter, status: Status) -> bool:
        e = letter.envelope
        return ((not self.statuses or status in self.statuses)
                and (self.tenant is None or e.tenant == self.tenant)
                and (not self.reasons or e.reason in self.reasons)
                and (self.stage is None or e.stage is self.stage)
                and (self.record_id is None or e.record_id == self.record_id)
                and (self.failed_before is None or e.failed_at < self.failed_before)
                and (self.failed_after is None or e.failed_at >= self.failed_after))


class Verdict(StrEnum):
    SEND = "send"
    NOT_RETRYABLE = "not_retryable"  # needs --force
    PARK = "park"


def redrive_verdict(letter: DeadLetter, *, force: bool, max_redrives: int = DEFAULT_MAX_REDRIVES) -> Verdict:
    if letter.redrives >= max_redrives:
        return Verdict.PARK
    if not letter.envelope.retryable and not force:
        return Verdict.NOT_RETRYABLE
    return Verdict.SEND


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def redrive_message(letter: DeadLetter, redrive_id: str) -> Outgoing:
    """The original record, back where it failed: the failing sink's topic for a sink stage (so the
    other sinks are not written again), else the source topic it came from. `dlq.*` headers are
    dropped; lineage headers say which redrive sent it and how many times it has been redriven."""
    e = letter.envelope
    topic = e.failed.topic if e.stage.sink is not None and e.failed is not None else e.origin.topic
    headers = [(k, v) for k, v in letter.headers
               if not k.startswith(DLQ_PREFIX) and k not in (REDRIVE_HEADER, REDRIVE_ID_HEADER)]
    headers += [(REDRIVE_HEADER, str(letter.redrives + 1).encode()), (REDRIVE_ID_HEADER, redrive_id.encode())]
    return Outgoing(topic, letter.key, letter.value, headers)


def fold_statuses(entries: Iterable[tuple[bytes, bytes | None]]) -> dict[str, StatusEntry]:
    """Latest status per dead-letter id from the status topic's (key, value) records, in order."""
    statuses: dict[str, StatusEntry] = {}
    for key, value in entries:
        if value is None:
            statuses.pop(key.decode(), None)
        else:
            statuses[key.decode()] = StatusEntry.decode(value)
    return statuses
