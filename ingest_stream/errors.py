"""Error types that carry their DLQ meaning: a reason code and whether a retry can help.

Sinks turn driver exceptions into these once, at their boundary, by exception type.
"""

from __future__ import annotations

from ingest_stream.core.reasons import Reason


class IngestError(Exception):
    """Base of the product's own errors."""


class ConfigError(IngestError):
    """A setting is missing or malformed."""


class SinkError(IngestError):
    """A sink operation failed; `reason` is the DLQ code it maps to."""

    def __init__(self, sink: str, reason: Reason, message: str, *, retry_after_s: float | None = None,
                 unexpected: str | None = None):
        super().__init__(f"{sink}: {reason.value}: {message}")
        self.sink = sink
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.unexpected = unexpected  # the exception type no rule knew (a bug to report), if so

    @property
    def retryable(self) -> bool:
        return self.reason.retryable
