"""Dead-letter envelopes: the `dlq.*` headers added to a failed record, and reading them back.

The value and the original headers travel unchanged. Where the record entered the pipeline rides
along in `ingest.origin.*` headers from the source stage onwards, so a failure at a sink still
points at its source record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.timefmt import format_rfc3339, parse_rfc3339

Headers = Sequence[tuple[str, bytes]]

DLQ_PREFIX = "dlq."
ORIGIN_PREFIX = "ingest.origin."
REDRIVE_HEADER = "ingest.redrive"
REPLAY_HEADER = "ingest.replay"
ERROR_LIMIT_BYTES = 1024
# Set only on a letter whose original value did not fit (contract §4): the value is then a prefix,
# and the whole record stays at the letter's `dlq.origin.*` position.
VALUE_TRUNCATED_HEADER = "dlq.value_truncated"  # "true"
VALUE_BYTES_HEADER = "dlq.value_bytes"  # the original value's length
VALUE_SHA256_HEADER = "dlq.value_sha256"  # hex SHA-256 of the original value


@dataclass(frozen=True, slots=True)
class Position:
    """A record's place in a topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


def origin_headers(position: Position) -> list[tuple[str, bytes]]:
    """Headers that carry the source position through the sink topics."""
    headers = [
        (f"{ORIGIN_PREFIX}topic", position.topic.encode()),
        (f"{ORIGIN_PREFIX}partition", str(position.partition).encode()),
        (f"{ORIGIN_PREFIX}offset", str(position.offset).encode()),
    ]
    if position.timestamp_ms is not None:
        headers.append((f"{ORIGIN_PREFIX}timestamp", str(position.timestamp_ms).encode()))
    return headers


def read_origin(headers: Headers) -> Position | None:
    found = {k.removeprefix(ORIGIN_PREFIX): v.decode() for k, v in headers if k.startswith(ORIGIN_PREFIX)}
    try:
        timestamp = found.get("timestamp")
        return Position(
            found["topic"],
            int(found["partition"]),
            int(found["offset"]),
            int(timestamp) if timestamp is not None else None,
        )
    except (KeyError, ValueError):
        return None


def reprocessed(headers: Headers) -> bool:
    """Redriven or replayed: bypasses dedupe and may rewrite an equal revision (contract §5)."""
    return any(k in (REDRIVE_HEADER, REPLAY_HEADER) for k, _ in headers)


def header_value(headers: Headers, name: str) -> str | None:
    """The last value of a header, decoded, or None."""
    value = None
    for key, raw in headers:
        if key == name:
            value = raw
    return value.decode("utf-8", "replace") if value is not None else None


def _truncate_utf8(text: str, limit: int) -> bytes:
    encoded = text.encode()
    if len(encoded) <= limit:
        return encoded
    return encoded[: limit - 3].decode("utf-8", "ignore").encode() + b"..."


def failure_headers(
    original: Headers,
    *,
    reason: Reason,
    stage: Stage,
    error: str,
    attempts: int,
    origin: Position,
    failed: Position | None,
    failed_at: datetime,
    identity: Mapping[str, str],
) -> list[tuple[str, bytes]]:
    """The original headers (minus any earlier `dlq.*` ones) plus this failure's `dlq.*` headers."""
    headers = [(k, v) for k, v in original if not k.startswith(DLQ_PREFIX)]
    added = {
        "reason": reason.value,
        "retryable": "true" if reason.retryable else "false",
        "stage": stage.value,
        "attempts": str(attempts),
        "origin.topic": origin.topic,
        "origin.partition": str(origin.partition),
        "origin.offset": str(origin.offset),
        "failed_at": format_rfc3339(failed_at),
    }
    if origin.timestamp_ms is not None:
        added["origin.timestamp"] = str(origin.timestamp_ms)
    if failed is not None:
        added |= {
            "failed.topic": failed.topic,
            "failed.partition": str(failed.partition),
            "failed.offset": str(failed.offset),
        }
    for field_name, header in (("tenant", "tenant"), ("source", "source"), ("id", "record_id")):
        if field_name in identity:
            added[header] = identity[field_name]
    headers.extend((f"{DLQ_PREFIX}{k}", v.encode()) for k, v in added.items())
    headers.append((f"{DLQ_PREFIX}error", _truncate_utf8(error, ERROR_LIMIT_BYTES)))
    return headers


@dataclass(frozen=True, slots=True)
class DlqEnvelope:
    """What the `dlq.*` headers of a dead-letter record say."""

    reason: Reason
    retryable: bool
    stage: Stage
    error: str
    attempts: int
    origin: Position
    failed: Position | None
    failed_at: datetime
    tenant: str | None
    source: str | None
    record_id: str | None

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[str, bytes]]) -> DlqEnvelope:
        """Parse; KeyError / ValueError when a required `dlq.*` header is missing or malformed."""
        h = {k.removeprefix(DLQ_PREFIX): v.decode("utf-8", "replace")
             for k, v in headers if k.startswith(DLQ_PREFIX)}
        failed = None
        if "failed.topic" in h:
            failed = Position(h["failed.topic"], int(h["failed.partition"]), int(h["failed.offset"]))
        timestamp = h.get("origin.timestamp")
        return cls(
            reason=Reason(h["reason"]),
            retryable=h["retryable"] == "true",
            stage=Stage(h["stage"]),
            error=h.get("error", ""),
            attempts=int(h.get("attempts", "1")),
            origin=Position(
                h["origin.topic"],
                int(h["origin.partition"]),
                int(h["origin.offset"]),
                int(timestamp) if timestamp is not None else None,
            ),
            failed=failed,
            failed_at=parse_rfc3339(h["failed_at"]),
            tenant=h.get("tenant"),
            source=h.get("source"),
            record_id=h.get("record_id"),
        )
