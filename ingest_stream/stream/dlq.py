"""Publishing failures to the dead-letter topic: original key, bytes and headers, plus `dlq.*`.

The DLQ topic is only ever written, so Faust does not create it with the agents' topics; it is
declared before the first send. (A send to a topic that does not exist waits in the producer for a
partition leader, and every flush and offset commit waits behind it.)

A letter always fits the producer's limit (`fit_letter`): a record too large to be accepted is
also too large to be dead-lettered whole, and a send that the producer refuses would stop the
worker on that record after every restart.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import datetime
from typing import Any

import faust
from faust.types import EventT

from ingest_stream.core.audit import IngestAudit
from ingest_stream.core.dlq import Position, failure_headers, fit_letter, trusted_origin
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.schemas import Rejected
from ingest_stream.metrics import Metrics

log = logging.getLogger(__name__)


def headers_of(event: EventT[Any]) -> list[tuple[str, bytes]]:
    """The message's headers as a fresh list of (name, bytes) — aiokafka's form."""
    return list(event.message.headers or [])  # type: ignore[arg-type]


def position_of(event: EventT[Any]) -> Position:
    message = event.message
    timestamp_ms = int(message.timestamp * 1000) if message.timestamp else -1
    return Position(message.topic, message.partition, message.offset,
                    timestamp_ms if timestamp_ms >= 0 else None)  # -1: the record has none


class DeadLetters:
    def __init__(self, topic: faust.TopicT, metrics: Metrics, audit: IngestAudit,
                 clock: Callable[[], datetime], *, source_topics: Collection[str],
                 max_letter_bytes: int) -> None:
        self._topic = topic
        self._metrics = metrics
        self._audit = audit
        self._clock = clock
        self._source_topics = frozenset(source_topics)
        self._max_letter_bytes = max_letter_bytes
        self._declared = False

    async def publish(
        self,
        event: EventT[Any],
        *,
        reason: Reason,
        stage: Stage,
        error: str,
        attempts: int = 1,
        identity: Mapping[str, str],
        record_valid: bool = True,
    ) -> Awaitable[object]:
        """Send the event's message to the DLQ; returns the delivery future (await before acking).
        `record_valid`: the record passed validation (its tenant may be a metric label)."""
        if not self._declared:
            await self._topic.maybe_declare()
            self._declared = True
        message = event.message
        here = position_of(event)
        headers = headers_of(event)
        origin = trusted_origin(headers, here, self._source_topics)
        failed = here if stage.sink is not None else None
        tenant = identity.get("tenant")
        self._metrics.dlq.labels(reason.value, stage.value).inc()
        self._audit.letter(reason.value, now_s=self._clock().timestamp())
        self._metrics.tenant_dlq.labels(self._metrics.tenant(tenant, valid=record_valid), reason.value).inc()
        log.warning("dlq %s[%d]@%d tenant=%r id=%r reason=%s stage=%s: %r",  # %r: no raw control chars
                    here.topic, here.partition, here.offset, tenant and tenant[:64],
                    identity.get("id", "")[:64] or None, reason.value, stage.value, error[:300])
        letter_headers = failure_headers(headers, reason=reason, stage=stage, error=error,
                                         attempts=attempts, origin=origin, failed=failed,
                                         failed_at=self._clock(), identity=identity)
        key, value, letter_headers = fit_letter(message.key, message.value, letter_headers,
                                                limit=self._max_letter_bytes)
        return await self._topic.send(key=key, value=value, headers=letter_headers)

    async def reject(self, event: EventT[Any], verdict: Rejected, *, stage: Stage | None = None
                     ) -> Awaitable[object]:
        """Dead-letter a record the validator rejected (at `stage`, else the verdict's own)."""
        stage = stage or verdict.stage
        if verdict.unexpected is not None:
            self._count_unexpected(event, stage, verdict.unexpected, verdict.error)
        return await self.publish(event, reason=verdict.reason, stage=stage, error=verdict.error,
                                  identity=verdict.identity, record_valid=False)

    async def unexpected(self, event: EventT[Any], exc: Exception, *, stage: Stage,
                         identity: Mapping[str, str] | None = None) -> Awaitable[object]:
        """The per-record guard's last resort: an exception no rule expected, caused by this
        record or by a bug it found. It goes to the DLQ (the flow goes on), counted and logged
        with its traceback to be fixed."""
        name = type(exc).__name__
        error = f"$: unexpected {name}: {exc}"
        self._count_unexpected(event, stage, name, error, exc)
        reason = Reason.VALIDATION_FAIL if stage.sink is None else Reason.CONSTRAINT_VIOLATION
        return await self.publish(event, reason=reason, stage=stage, error=error, identity=identity or {},
                                  record_valid=False)

    def _count_unexpected(self, event: EventT[Any], stage: Stage, error_type: str, error: str,
                          exc: Exception | None = None) -> None:
        self._metrics.unexpected_errors.labels(stage.value, error_type).inc()
        log.error("unexpected %s dead-lettered from %s[%d]@%d at %s: %r (a bug: please report it)",
                  error_type, event.message.topic, event.message.partition, event.message.offset,
                  stage.value, error[:300], exc_info=exc)
