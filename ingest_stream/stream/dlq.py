"""Publishing failures to the dead-letter topic: original key, bytes and headers, plus `dlq.*`.

The DLQ topic is only ever written, so Faust does not create it with the agents' topics; it is
declared before the first send. (A send to a topic that does not exist waits in the producer for a
partition leader, and every flush and offset commit waits behind it.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import faust
from faust.types import EventT

from ingest_stream.core.dlq import Position, failure_headers, read_origin
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.schemas import Rejected
from ingest_stream.metrics import Metrics

log = logging.getLogger(__name__)


def headers_of(event: EventT[Any]) -> list[tuple[str, bytes]]:
    """The message's headers as a fresh list of (name, bytes) — aiokafka's form."""
    return list(event.message.headers or [])  # type: ignore[arg-type]


def position_of(event: EventT[Any]) -> Position:
    message = event.message
    return Position(message.topic, message.partition, message.offset,
                    int(message.timestamp * 1000) if message.timestamp else None)


class DeadLetters:
    def __init__(self, topic: faust.TopicT, metrics: Metrics, clock: Callable[[], datetime]) -> None:
        self._topic = topic
        self._metrics = metrics
        self._clock = clock
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
    ) -> Awaitable[object]:
        """Send the event's message to the DLQ; returns the delivery future (await before acking)."""
        if not self._declared:
            await self._topic.maybe_declare()
            self._declared = True
        message = event.message
        here = position_of(event)
        headers = headers_of(event)
        origin = read_origin(headers) or here
        failed = here if stage.sink is not None else None
        self._metrics.dlq.labels(reason.value, stage.value).inc()
        self._metrics.tenant_dlq.labels(self._metrics.tenant(identity.get("tenant")), reason.value).inc()
        log.warning("dlq %s[%d]@%d tenant=%s id=%s reason=%s stage=%s: %s",
                    here.topic, here.partition, here.offset, identity.get("tenant"),
                    identity.get("id"), reason.value, stage.value, error)
        return await self._topic.send(
            key=message.key,
            value=message.value,
            headers=failure_headers(headers, reason=reason, stage=stage, error=error,
                                    attempts=attempts, origin=origin, failed=failed,
                                    failed_at=self._clock(), identity=identity),
        )

    async def reject(self, event: EventT[Any], verdict: Rejected, *, stage: Stage | None = None
                     ) -> Awaitable[object]:
        """Dead-letter a record the validator rejected (at `stage`, else the verdict's own)."""
        return await self.publish(event, reason=verdict.reason, stage=stage or verdict.stage,
                                  error=verdict.error, identity=verdict.identity)
