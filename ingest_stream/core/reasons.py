"""DLQ reason codes and pipeline stages, as the contract names them."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    SCHEMA_DRIFT = "SCHEMA_DRIFT"
    VALIDATION_FAIL = "VALIDATION_FAIL"
    OLDER_REVISION = "OLDER_REVISION"
    SINK_TIMEOUT = "SINK_TIMEOUT"
    CONSTRAINT_VIOLATION = "CONSTRAINT_VIOLATION"
    CONNECTION_ERROR = "CONNECTION_ERROR"
    RATE_LIMITED = "RATE_LIMITED"
    CIRCUIT_OPEN = "CIRCUIT_OPEN"

    @property
    def retryable(self) -> bool:
        """Whether re-sending the unchanged record can succeed later (contract §4)."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {Reason.SINK_TIMEOUT, Reason.CONNECTION_ERROR, Reason.RATE_LIMITED, Reason.CIRCUIT_OPEN}
)


class Stage(StrEnum):
    DECODE = "decode"
    VALIDATE = "validate"
    TRANSFORM = "transform"
    DEDUPE = "dedupe"
    SINK_POSTGRES = "sink.postgres"
    SINK_NEO4J = "sink.neo4j"
    SINK_TYPESENSE = "sink.typesense"

    @classmethod
    def for_sink(cls, sink: str) -> Stage:
        return cls(f"sink.{sink}")

    @property
    def sink(self) -> str | None:
        """The sink name for a sink stage, None for the processing stages."""
        return self.value.removeprefix("sink.") if self.value.startswith("sink.") else None
