"""DLQ triage: what a dead letter is, its status, which ones an operator's filter selects, and the
message a redrive sends.

A dead letter is identified by its place in the DLQ topic (`partition:offset`). Its status lives
apart from it (the DLQ topic is append-only): open until redriven, parked or purged.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

import orjson

from ingest_stream.core.dlq import (
    DLQ_PREFIX,
    REDRIVE_HEADER,
    VALUE_BYTES_HEADER,
    VALUE_SHA256_HEADER,
    VALUE_TRUNCATED_HEADER,
    DlqEnvelope,
    Headers,
    Position,
    header_value,
    origin_headers,
    without_origin,
)
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
        if raw is None:
            return 0
        if raw.isascii() and raw.isdigit() and len(raw) <= 9:
            return int(raw)
        return 1  # an older or foreign marker (or a negative count): redriven at least once


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
        """ValueError unless `raw` is a status entry."""
        data = orjson.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("at"), str):
            raise ValueError("not a status entry")
        texts = [data.get(name) for name in ("redrive_id", "note")]
        if not all(t is None or isinstance(t, str) for t in texts):
            raise ValueError("not a status entry")
        return cls(Status(str(data.get("status"))), data["at"], texts[0], texts[1])


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
    REFUSED = "refused"  # never sent, --force or not: `RedriveDecision.problem` says why


@dataclass(frozen=True, slots=True)
class RedriveTargets:
    """The only topics a redrive writes to: this app's source topics and the topics of the sinks it
    runs. A letter's `dlq.origin.*` can carry what a producer wrote in `ingest.origin.*` headers, so
    the letter only chooses among these topics, never beyond them."""

    sources: frozenset[str]
    sinks: Mapping[str, str]  # sink name -> its topic


@dataclass(frozen=True, slots=True)
class RedrivePolicy:
    targets: RedriveTargets
    force: bool = False  # also the reasons that are not retryable
    max_redrives: int = DEFAULT_MAX_REDRIVES
    max_value_bytes: int | None = None  # the largest value the sender can send; None: unchecked


@dataclass(frozen=True, slots=True)
class Truncation:
    """A letter whose value is only a prefix of the original (contract §4)."""

    original_bytes: int
    sha256: str  # lower-case hex


@dataclass(frozen=True, slots=True)
class RedriveDecision:
    verdict: Verdict
    topic: str | None = None  # where the record goes back to
    problem: str | None = None  # REFUSED: why, for the operator
    truncation: Truncation | None = None  # set: the value is a prefix, send the re-read original
    original_at: tuple[Position, ...] = ()  # where to re-read it, in this order


class _Refused(Exception):
    """A letter redrive will not send; the message is for the operator."""


_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_PARTITION = 2**31 - 1
_MAX_OFFSET = 2**63 - 1


def redrive_verdict(letter: DeadLetter, policy: RedrivePolicy) -> RedriveDecision:
    """Whether and where a letter is redriven: only to a topic of `policy.targets`, at most
    `max_redrives` times, a non-retryable reason only with `force`, and a truncated letter only
    as its whole original, re-read from one of `original_at`."""
    try:
        topic = _target(letter, policy.targets)
    except _Refused as refused:
        return RedriveDecision(Verdict.REFUSED, problem=str(refused))
    if letter.redrives >= policy.max_redrives:
        return RedriveDecision(Verdict.PARK, topic)
    if not letter.envelope.retryable and not policy.force:
        return RedriveDecision(Verdict.NOT_RETRYABLE, topic)
    try:
        truncation = truncation_of(letter)
    except ValueError as error:
        return RedriveDecision(Verdict.REFUSED, topic, f"truncated letter: {error}")
    limit = policy.max_value_bytes
    if truncation is None:
        size = len(letter.value or b"")
        if limit is not None and size > limit:
            return RedriveDecision(Verdict.REFUSED, topic, (
                f"the value is {size} bytes, more than the {limit} a redrive can send"))
        return RedriveDecision(Verdict.SEND, topic)
    if limit is not None and truncation.original_bytes > limit:
        return RedriveDecision(Verdict.REFUSED, topic, (
            f"truncated letter: the original is {truncation.original_bytes} bytes, more than the "
            f"{limit} a redrive can send"))
    positions = _original_positions(letter, policy.targets)
    if not positions:
        return RedriveDecision(Verdict.REFUSED, topic, (
            "truncated letter: no position in this app's topics to re-read the original from"))
    return RedriveDecision(Verdict.SEND, topic, truncation=truncation, original_at=positions)


def _target(letter: DeadLetter, targets: RedriveTargets) -> str:
    """The failing sink's topic for a sink stage (so the other sinks are not written again), else
    the source topic the record came from; _Refused unless that is one of `targets`."""
    e = letter.envelope
    sink = e.stage.sink
    if sink is None:
        if e.origin.topic not in targets.sources:
            raise _Refused(f"dlq.origin.topic {e.origin.topic!r} is not a source topic of this app")
        return e.origin.topic
    topic = targets.sinks.get(sink)
    if topic is None:
        raise _Refused(f"stage {e.stage.value}: sink {sink!r} is not one this app runs (INGEST_SINKS)")
    # Failed in the sink topic (spilled, redriven), or written in process: failed where it entered.
    if e.failed is not None and e.failed.topic != topic and not _same_place(e.failed, e.origin):
        raise _Refused(f"stage {e.stage.value} but dlq.failed.topic {e.failed.topic!r} is not {topic!r}")
    return topic


def _same_place(a: Position, b: Position) -> bool:
    return (a.topic, a.partition, a.offset) == (b.topic, b.partition, b.offset)


def truncation_of(letter: DeadLetter) -> Truncation | None:
    """The `dlq.value_*` headers (contract §4), or None when the value is whole. ValueError when
    they are there but garbled: then the value may be a prefix, and nothing says of what."""
    flag = header_value(letter.headers, VALUE_TRUNCATED_HEADER)
    size = header_value(letter.headers, VALUE_BYTES_HEADER)
    digest = header_value(letter.headers, VALUE_SHA256_HEADER)
    if size is None and digest is None and flag in (None, "false"):
        return None
    if size is None or not (size.isascii() and size.isdigit()) or len(size) > 18:
        raise ValueError(f"{VALUE_BYTES_HEADER} is {size!r}, not a byte count")
    if digest is None or not _SHA256.fullmatch(digest.lower()):
        raise ValueError(f"{VALUE_SHA256_HEADER} is {digest!r}, not a SHA-256")
    return Truncation(int(size), digest.lower())


def _original_positions(letter: DeadLetter, targets: RedriveTargets) -> tuple[Position, ...]:
    """Where the whole record is: the sink topic's copy a sink stage failed on (the exact bytes),
    then the source position. Only topics of this app, only positions Kafka can have."""
    e = letter.envelope
    candidates = [e.failed] if e.stage.sink is not None and e.failed is not None else []
    if e.origin.topic in targets.sources:
        candidates.append(e.origin)
    return tuple(p for p in candidates
                 if 0 <= p.partition <= _MAX_PARTITION and 0 <= p.offset <= _MAX_OFFSET)


def describe(position: Position) -> str:
    return f"{position.topic}[{position.partition}]@{position.offset}"


def original_problem(truncation: Truncation, position: Position, value: bytes | None) -> str | None:
    """None when `value`, read at `position`, is the original a truncated letter was cut from."""
    if value is None:
        return f"original no longer in {describe(position)}: retention removed it"
    if len(value) != truncation.original_bytes or hashlib.sha256(value).hexdigest() != truncation.sha256:
        return f"original in {describe(position)}: checksum mismatch (dlq.value_sha256)"
    return None


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def redrive_message(letter: DeadLetter, redrive_id: str, topic: str, *, original: bytes | None = None
                    ) -> Outgoing:
    """The record back at `topic` (`redrive_verdict`'s): the letter's value, or for a truncated
    letter the `original` re-read (never the prefix). `dlq.*` headers are dropped; lineage headers
    say which redrive sent it and how many times it has been redriven."""
    if original is None and _may_be_prefix(letter):
        raise ValueError(f"letter {letter.id} may hold only a prefix of its value: send the original")
    headers = [(k, v) for k, v in without_origin(letter.headers)
               if not k.startswith(DLQ_PREFIX) and k not in (REDRIVE_HEADER, REDRIVE_ID_HEADER)]
    headers += [(REDRIVE_HEADER, str(letter.redrives + 1).encode()), (REDRIVE_ID_HEADER, redrive_id.encode())]
    headers += origin_headers(letter.envelope.origin)  # where it entered: the letter's, never a producer's
    return Outgoing(topic, letter.key, original if original is not None else letter.value, headers)


def _may_be_prefix(letter: DeadLetter) -> bool:
    try:
        return truncation_of(letter) is not None
    except ValueError:
        return True


def fold_statuses(entries: Iterable[tuple[bytes, bytes | None]]) -> dict[str, StatusEntry]:
    """Latest status per dead-letter id from the status topic's (key, value) records, in order."""
    statuses: dict[str, StatusEntry] = {}
    for key, value in entries:
        try:
            letter_id = key.decode()
            if value is None:
                statuses.pop(letter_id, None)
            else:
                statuses[letter_id] = StatusEntry.decode(value)
        except ValueError:  # not ours (anyone can write to a topic): skipped, not fatal
            continue
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
# A spreadsheet runs a cell starting with these as a formula (OWASP "CSV injection"), the fullwidth
# forms included (some locales convert them); a leading line feed hides one on the next line.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(value: object) -> str:
    """A CSV cell no spreadsheet evaluates: a leading formula character gets a `'` before it."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def export_row(letter: DeadLetter, status: Status) -> dict[str, str]:
    """A dead letter as one CSV row of EXPORT_COLUMNS, every cell neutralised (`csv_cell`)."""
    document = letter_document(letter, status)
    return {column: csv_cell(document[column]) for column in EXPORT_COLUMNS}


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a purge archive's manifest says (`dlqtriage verify` checks the archive against it)."""

    archive: PurePosixPath  # relative to the manifest's directory, never outside it
    sha256: str
    records: int

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """ValueError (the operator's message) unless `raw` is a manifest naming an archive inside
        its own directory: not an absolute path, no `..`."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        name, sha256, records = data.get("archive"), data.get("sha256"), data.get("records")
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"archive {name!r} is not a file name")
        archive = PurePosixPath(name)
        if archive.is_absolute() or ".." in archive.parts or not archive.parts:
            raise ValueError(f"archive {name!r} is not inside the manifest's directory; refused")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
            raise ValueError(f"sha256 {sha256!r} is not a SHA-256")
        if type(records) is not int or records < 0:
            raise ValueError(f"records {records!r} is not a count")
        return cls(archive, sha256.lower(), records)


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binary: only in value_b64
