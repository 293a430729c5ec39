"""Dead-letter envelopes: the `dlq.*` headers added to a failed record, and reading them back.

The value and the original headers travel unchanged. Where the record entered the pipeline rides
along in `ingest.origin.*` headers from the source stage onwards, so a failure at a sink still
points at its source record.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.timefmt import format_rfc3339, parse_rfc3339

Headers = Sequence[tuple[str, bytes]]  # a value may also be None: Kafka allows a null header value

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
HEADERS_DROPPED_HEADER = "dlq.headers_dropped"  # original headers left out (past the caps below)
# A dead letter must fit whatever the record carried: the original headers copied are capped, and
# so is the key; the value is cut to a prefix when the whole would not fit (`fit_letter`).
ORIGINAL_HEADERS_LIMIT_BYTES = 32 * 1024
ORIGINAL_HEADERS_LIMIT_COUNT = 64
KEY_LIMIT_BYTES = 4096
RECORD_OVERHEAD_BYTES = 128  # a record's own framing in a batch, with room to spare
HEADER_OVERHEAD_BYTES = 10  # the varints of one header
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")
_MAX_INT64 = 2**63 - 1
_MAX_INT32 = 2**31 - 1


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


def read_origin(headers: Headers, *, topics: Collection[str] | None = None) -> Position | None:
    """The `ingest.origin.*` position, or None unless it is well-formed (a topic name, a partition
    and offsets in Kafka's ranges) and, given `topics`, names one of them. Anything can arrive in
    headers: a producer's forgery must not steer dead letters or redrives to other topics."""
    found: dict[str, str] = {}
    for key, value in headers:
        if key.startswith(ORIGIN_PREFIX):
            try:
                found[key.removeprefix(ORIGIN_PREFIX)] = value.decode("ascii")
            except (UnicodeDecodeError, AttributeError):
                return None
    try:
        topic = found["topic"]
        partition = _bounded_int(found["partition"], _MAX_INT32)
        offset = _bounded_int(found["offset"], _MAX_INT64)
    except (KeyError, ValueError):
        return None
    try:  # the timestamp is only informative: a malformed one is left out, the position kept
        timestamp_ms: int | None = _bounded_int(found["timestamp"], _MAX_INT64)
    except (KeyError, ValueError):
        timestamp_ms = None
    if not _TOPIC_NAME.match(topic) or (topics is not None and topic not in topics):
        return None
    return Position(topic, partition, offset, timestamp_ms)


def trusted_origin(headers: Headers, here: Position, source_topics: Collection[str]) -> Position:
    """Where a record now `here` entered the pipeline. A record in a source topic entered here,
    unless the pipeline itself re-sent it (redrive, replay) there; in a sink topic the origin header
    the source stage wrote is read, when well-formed and in one of this app's source topics."""
    if here.topic not in source_topics:  # a sink topic: the origin the source stage wrote
        return read_origin(headers, topics=source_topics) or here
    if not reprocessed(headers):
        return here
    # Re-sent to its own source partition (a redrive, a replay): only an earlier position there. A
    # producer can write `ingest.redrive` too; so forged, an origin can only make the record look
    # older than it is, never newer, and a genuinely older revision after it is still refused.
    origin = read_origin(headers, topics=source_topics)
    if origin is None or (origin.topic, origin.partition) != (here.topic, here.partition) or (
            origin.offset >= here.offset):
        return here
    return origin


def without_origin(headers: Headers) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in headers if not k.startswith(ORIGIN_PREFIX)]


def _bounded_int(text: str, maximum: int) -> int:
    if not text.isdigit() or len(text) > 19:
        raise ValueError(text)
    number = int(text)
    if number > maximum:
        raise ValueError(text)
    return number


def reprocessed(headers: Headers) -> bool:
    """Redriven or replayed: bypasses dedupe and may rewrite an equal revision (contract §5)."""
    return any(k in (REDRIVE_HEADER, REPLAY_HEADER) for k, _ in headers)


def replayed(headers: Headers) -> bool:
    """Re-sent history (replayctl): an older revision at a sink is expected, not a failure."""
    return any(k == REPLAY_HEADER for k, _ in headers)


def header_value(headers: Headers, name: str) -> str | None:
    """The last value of a header, decoded (invalid UTF-8 replaced), or None."""
    value: bytes | None = None
    for key, raw in headers:
        if key == name:
            value = raw or b""
    return None if value is None else bytes(value or b"").decode("utf-8", "replace")


def _truncate_utf8(text: str, limit: int) -> bytes:
    encoded = text.encode("utf-8", "replace")
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
    """The original headers (minus any earlier `dlq.*` ones, within the caps) plus this failure's
    `dlq.*` headers."""
    # The origin is the letter's own `dlq.origin.*` (trusted_origin); `ingest.origin.*` headers
    # copied along could be a producer's, and a redrive would carry them back in.
    headers, dropped = _capped([(k, v) for k, v in without_origin(original) if not k.startswith(DLQ_PREFIX)])
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
    if dropped:
        added[HEADERS_DROPPED_HEADER.removeprefix(DLQ_PREFIX)] = str(dropped)
    headers.extend((f"{DLQ_PREFIX}{k}", _truncate_utf8(v, ERROR_LIMIT_BYTES)) for k, v in added.items())
    headers.append((f"{DLQ_PREFIX}error", _truncate_utf8(error, ERROR_LIMIT_BYTES)))
    return headers


def _capped(headers: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], int]:
    """The first headers within ORIGINAL_HEADERS_LIMIT_*; and how many were left out."""
    kept: list[tuple[str, bytes]] = []
    size = 0
    for key, value in headers:
        size += headers_size([(key, value)])
        if size > ORIGINAL_HEADERS_LIMIT_BYTES or len(kept) >= ORIGINAL_HEADERS_LIMIT_COUNT:
            return kept, len(headers) - len(kept)
        kept.append((key, value))
    return kept, 0


def headers_size(headers: Headers) -> int:
    """Bytes the headers take in a Kafka record (names as UTF-8, with their framing)."""
    return sum(len(k.encode("utf-8", "surrogateescape")) + len(v or b"") + HEADER_OVERHEAD_BYTES
               for k, v in headers)


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """An upper bound of a record's size in a batch: what the producer and broker limits see."""
    return len(key or b"") + len(value or b"") + headers_size(headers) + RECORD_OVERHEAD_BYTES


def fit_letter(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], *, limit: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """A dead letter within `limit` bytes (contract §4): the key cut to KEY_LIMIT_BYTES, and a
    value too large replaced by its prefix, flagged with the original's length and SHA-256 (the
    whole record stays at the letter's `dlq.origin.*` position)."""
    if key is not None and len(key) > KEY_LIMIT_BYTES:
        key = key[:KEY_LIMIT_BYTES]
    if value is None or record_size(key, value, headers) <= limit:
        return key, value, headers
    headers = [*headers, (VALUE_TRUNCATED_HEADER, b"true"), (VALUE_BYTES_HEADER, str(len(value)).encode()),
               (VALUE_SHA256_HEADER, hashlib.sha256(value).hexdigest().encode())]
    room = max(0, limit - record_size(key, b"", headers))
    return key, value[:room], headers


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
