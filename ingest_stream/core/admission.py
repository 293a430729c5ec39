"""What the processing stage makes of one source record: a forward to the sinks, or a rejection.

Pure and total: for any value and headers it returns, never raises (the wiring's guard catches
what a bug might still raise). The checks past the schema's are the ones the sinks need: the
record re-encodes within the limit (`RecordValidator`), its headers fit beside it, and the
`ingest.origin.*` headers it travels with are ours, never a producer's (`trusted_origin`). A line
of a file adapter is also held to its location's tenant, and a line too long to send (an empty
stand-in, flagged) is dead-lettered (core/files.py).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import orjson

from ingest_stream.core.dlq import (
    ORIGINAL_HEADERS_LIMIT_BYTES,
    Headers,
    Position,
    header_value,
    headers_size,
    origin_headers,
    replayed,
    reprocessed,
    trusted_origin,
    without_origin,
)
from ingest_stream.core.files import ADAPTER_LINE_BYTES_HEADER, ADAPTER_TENANT_HEADER
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.record import Record
from ingest_stream.core.schemas import RecordValidator, Rejected, identity_of


@dataclass(frozen=True, slots=True)
class Forward:
    """A record accepted for the sinks: its canonical bytes and the headers they travel with."""

    record: Record
    encoded: bytes
    source_headers: Headers  # as the record arrived
    reprocessed: bool  # redriven or replayed: dedupe is bypassed (contract §5)
    replayed: bool  # re-sent history (replayctl): an older revision at a sink is expected
    origin: Position  # where it entered the pipeline

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        """The headers it travels with through a sink topic: the origin as ours, not a producer's.
        Built only for a record that goes there (a spill): in process, the fields above carry it."""
        return [*without_origin(self.source_headers), *origin_headers(self.origin)]


def admit(validator: RecordValidator, value: bytes | None, headers: Headers, *, here: Position,
          source_topics: Collection[str]) -> Forward | Rejected:
    line_bytes = header_value(headers, ADAPTER_LINE_BYTES_HEADER)
    if line_bytes is not None:  # a file adapter's stand-in for a line too long to send
        error = (f"$: the line is {line_bytes[:20]} bytes; the limit is {validator.max_record_bytes} "
                 "(it stays in its file: ingest.adapter.file, ingest.adapter.line)")
        location = header_value(headers, ADAPTER_TENANT_HEADER)
        return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error,
                        {"tenant": location[:256]} if location is not None else {})
    verdict = validator.check(value or b"")
    if isinstance(verdict, Rejected):
        return verdict
    location = header_value(headers, ADAPTER_TENANT_HEADER)
    if location is not None and location != verdict.record["tenant"]:
        tenant = verdict.record["tenant"]
        error = f"$.tenant: {tenant!r} is not the tenant of its location ({location[:64]!r})"
        # the letter is the location's tenant's to triage, not the tenant the line names
        return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error,
                        {**identity_of(verdict.record), "tenant": location[:256]})
    size = headers_size(headers)
    if size > ORIGINAL_HEADERS_LIMIT_BYTES:
        error = f"$: headers are {size} bytes; the limit is {ORIGINAL_HEADERS_LIMIT_BYTES}"
        return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error, identity_of(verdict.record))
    origin = trusted_origin(headers, here, source_topics)
    return Forward(verdict.record, verdict.encoded, headers, reprocessed(headers), replayed(headers), origin)


# A record every version of the schema accepts (upcast as needed): run through the same path when a
# whole batch failed unexpectedly, it tells a broken pipeline from a batch of hostile records.
CANARY = orjson.dumps({"schema_version": 2, "tenant": "canary", "source": "kafka", "id": "canary",
                       "revision": 0, "event_time": "2000-01-01T00:00:00Z", "kind": "Canary",
                       "attributes": {}})


def canary_passes(validator: RecordValidator, *, here: Position, source_topics: Collection[str]) -> bool:
    try:
        return isinstance(admit(validator, CANARY, [], here=here, source_topics=source_topics), Forward)
    except Exception:  # the canary is the question whether this path raises
        return False
