"""DLQ triage: what a dead letter is, its status, which ones an operator's filter selects, and the
message a redrive sends.

A dead letter is identified by its place in the DLQ topic (`partition:offset`). Its status lives
apart from it (the DLQ topic is append-only): open until redriven, parked or purged.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

from ingest_stream.core.dlq import DLQ_PREFIX, REDRIVE_HEADER, DlqEnvelope, Headers, header_value
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.timefmt import format_rfc3339

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
        for the same record failing again after a redrive (its redrive count and id differ; a
        letter redriven twice has the same count, not the same id). The failed offset is left
        out: a worker killed before committing its fan-out sends the record to the sink topic
        again, at a new offset, with the same headers, and the copy fails there the same way."""
        e = self.envelope
        return (e.origin.topic, e.origin.partition, e.origin.offset, e.stage.value, self.redrives,
                header_value(self.headers, REDRIVE_ID_HEADER))

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


# --- summary and analysis -------------------------------------------------------------------------
SUGGESTED_ACTION: dict[Reason, str] = {
    Reason.SCHEMA_DRIFT: "the producer's shape changed: look at samples (sample --reason SCHEMA_DRIFT "
                         "--full); add a schema version and an upcaster, or get the producer fixed; "
                         "then redrive --force",
    Reason.VALIDATION_FAIL: "values break the schema: check the input data quality at the producer; "
                            "redrive --force only once the data or the rule is fixed",
    Reason.OLDER_REVISION: "out-of-order history, usually harmless: review, then "
                           "purge --older-than 7 --reason OLDER_REVISION",
    Reason.SINK_TIMEOUT: "the sink was slow: check its latency and load (or brown out); "
                         "redrive once healthy",
    Reason.CONSTRAINT_VIOLATION: "the sink refused the record on a constraint: fix the data or the "
                                 "constraint, then redrive --force",
    Reason.CONNECTION_ERROR: "the sink was unreachable (network, DNS, down): confirm its circuit is closed "
                             "in /health/detailed, then redrive",
    Reason.RATE_LIMITED: "the sink throttled us: check its quotas; redrive with --rate below its limit",
    Reason.CIRCUIT_OPEN: "the sink's circuit was open: once /health/detailed shows it closed, redrive",
}

_VOLATILE = re.compile(r"'[^']*'|\"[^\"]*\"|\b[0-9a-f]{8,}\b|\d+(\.\d+)?")


def error_pattern(error: str) -> str:
    """An error message with its variable parts (quoted values, numbers, hex ids) replaced, so
    messages that differ only in those group together."""
    return _VOLATILE.sub("…", error)[:160]


def summarize(letters: Iterable[tuple[DeadLetter, Status]]) -> dict[str, Any]:
    """Counts by reason × tenant × stage, by status, the retryable share, the oldest and newest."""
    groups: Counter[tuple[str, str, str]] = Counter()
    statuses: Counter[str] = Counter()
    retryable = 0
    oldest: datetime | None = None
    newest: datetime | None = None
    for letter, status in letters:
        e = letter.envelope
        groups[(e.reason.value, e.tenant or "-", e.stage.value)] += 1
        statuses[status.value] += 1
        retryable += e.retryable
        oldest = min(oldest or e.failed_at, e.failed_at)
        newest = max(newest or e.failed_at, e.failed_at)
    total = sum(groups.values())
    return {
        "total": total,
        "retryable_share": round(retryable / total, 4) if total else 0.0,
        "oldest": format_rfc3339(oldest) if oldest else None,
        "newest": format_rfc3339(newest) if newest else None,
        "by_status": dict(statuses),
        "by_reason": dict(Counter(reason for reason, _, _ in groups.elements())),
        "groups": [{"reason": r, "tenant": t, "stage": s, "count": n}
                   for (r, t, s), n in sorted(groups.items(), key=lambda item: (-item[1], item[0]))],
    }


def analyze(letters: Iterable[DeadLetter], *, producer_header: str = "x-producer", top: int = 5
            ) -> dict[str, Any]:
    """Per reason: count, top error patterns, stages, sources, origin topics, producers, a
    suggested action; and a histogram of failure times (hourly, daily beyond two days)."""
    per_reason: dict[Reason, dict[str, Counter[str]]] = {}
    times: list[datetime] = []
    for letter in letters:
        e = letter.envelope
        bucket = per_reason.setdefault(e.reason, {k: Counter() for k in (
            "errors", "stages", "sources", "origin_topics", "producers", "tenants")})
        bucket["errors"][error_pattern(e.error)] += 1
        bucket["stages"][e.stage.value] += 1
        bucket["sources"][e.source or "-"] += 1
        bucket["origin_topics"][e.origin.topic] += 1
        bucket["producers"][header_value(letter.headers, producer_header) or "-"] += 1
        bucket["tenants"][e.tenant or "-"] += 1
        times.append(e.failed_at)
    reasons = []
    for reason, counters in sorted(per_reason.items(), key=lambda item: -sum(item[1]["stages"].values())):
        reasons.append({
            "reason": reason.value,
            "count": sum(counters["stages"].values()),
            "retryable": reason.retryable,
            "top_errors": [{"pattern": p, "count": n} for p, n in counters["errors"].most_common(top)],
            **{name: dict(counters[name].most_common(top))
               for name in ("stages", "sources", "origin_topics", "producers", "tenants")},
            "suggested_action": SUGGESTED_ACTION[reason],
        })
    return {"total": len(times), "reasons": reasons, "histogram": time_histogram(times)}


def time_histogram(times: Sequence[datetime]) -> dict[str, Any]:
    if not times:
        return {"bucket": None, "counts": {}}
    daily = max(times) - min(times) > timedelta(days=2)
    width = "day" if daily else "hour"
    fmt = "%Y-%m-%d" if daily else "%Y-%m-%dT%H:00Z"
    counts = Counter(t.astimezone(UTC).strftime(fmt) for t in times)
    return {"bucket": width, "counts": dict(sorted(counts.items()))}


# --- export and archive -----------------------------------------------------------------------
def letter_document(letter: DeadLetter, status: Status) -> dict[str, Any]:
    """A dead letter as one JSON document: everything needed to restore or re-send it."""
    e = letter.envelope
    return {
        "id": letter.id, "status": status.value, "reason": e.reason.value, "stage": e.stage.value,
        "retryable": e.retryable, "tenant": e.tenant, "source": e.source, "record_id": e.record_id,
        "error": e.error, "attempts": e.attempts, "failed_at": format_rfc3339(e.failed_at),
        "origin": {"topic": e.origin.topic, "partition": e.origin.partition, "offset": e.origin.offset},
        "key_b64": base64.b64encode(letter.key).decode() if letter.key is not None else None,
        "value_b64": base64.b64encode(letter.value).decode() if letter.value is not None else None,
        "value": _text(letter.value),
        "headers": [[k, base64.b64encode(v).decode()] for k, v in letter.headers],
    }


EXPORT_COLUMNS = ("id", "status", "reason", "stage", "retryable", "tenant", "source", "record_id",
                  "attempts", "failed_at", "error", "value")


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary: only in value_b64
