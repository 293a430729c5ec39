"""Any sink, wrapped: revision-guarded batch planning, retries with backoff, failure isolation.

The result says what happened to each write; the wiring turns it into DLQ records and acks.
"""

from __future__ import annotations

import asyncio
import logging
import random as random_module
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.breaker import CircuitBreaker, CircuitState
from ingest_stream.core.reasons import Reason
from ingest_stream.core.revision import plan_batch
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.errors import SinkError
from ingest_stream.metrics import Metrics
from ingest_stream.sinks.base import Sink, Write

log = logging.getLogger(__name__)
OlderHandler = Callable[[list[Write]], Awaitable[None]]


@dataclass
class BatchOutcome:
    applied: list[Write] = field(default_factory=list)
    skipped: list[Write] = field(default_factory=list)
    older: list[Write] = field(default_factory=list)
    failed: list[tuple[Write, SinkError, int]] = field(default_factory=list)  # write, error, attempts

    def merge(self, other: BatchOutcome) -> None:
        self.applied += other.applied
        self.skipped += other.skipped
        self.older += other.older
        self.failed += other.failed


class GuardedSink:
    """`hold`: retry retryable errors until the sink answers (the agent stops moving, lag grows).
    `dlq`: after the policy's attempts, the batch's records fail with the last error's reason.
    Non-retryable errors are isolated: the batch is re-applied record by record, so only the
    records the sink refuses fail. A circuit breaker stops calls to a sink that keeps failing
    (CIRCUIT_OPEN, retryable) and lets a probe through after its open period.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        metrics: Metrics,
        backoff: BackoffPolicy,
        failure_policy: str,
        timeout_s: float,
        breaker: CircuitBreaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = random_module.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self._metrics = metrics
        self._backoff = backoff
        self._failure_policy = failure_policy
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self.breaker = breaker or CircuitBreaker()
        self._reported_state = CircuitState.CLOSED
        metrics.circuit_state.labels(self.name).set(CircuitState.CLOSED)
        self._opened = False
        self.retrying = False  # waiting out a failing sink: busy, not stalled
        self._before_write: OlderHandler | None = None
        self.consecutive_failures = 0
        self.last_error: SinkError | None = None
        self.last_error_at: float | None = None  # time.time()
        self.last_success_at: float | None = None  # time.time(): tells an idle sink from a dead one

    async def apply(self, writes: Sequence[Write], *,
                    before_write: OlderHandler | None = None) -> BatchOutcome:
        """Apply a batch. `before_write` receives the writes found older than what the sink holds,
        and is awaited before anything of the batch is written: a dead letter for an older
        revision must be durable before the newer revision that hides it lands, or a crash in
        between loses it (after a restart the older one looks like replayed history)."""
        self._before_write = before_write
        try:
            return await self._apply(writes)
        finally:
            self.retrying = False
            self._before_write = None

    async def _apply(self, writes: Sequence[Write]) -> BatchOutcome:
        attempt = 0
        while True:
            attempt += 1
            result = await self._call(writes)
            if isinstance(result, BatchOutcome):
                return result
            error = result
            if not error.retryable:
                return await self._isolate(writes, error, attempt)
            self._metrics.retries.labels(self.name, error.reason.value).inc()
            if self._failure_policy == "dlq" and self._backoff.exhausted(attempt):
                return BatchOutcome(failed=[(w, error, attempt) for w in writes])
            delay = self._backoff.delay(
                min(attempt, 32), random=self._random, retry_after_s=error.retry_after_s)
            log.warning("sink %s: attempt %d for %d record(s) failed (%s); retrying in %.2fs",
                        self.name, attempt, len(writes), error, delay)
            self.retrying = True
            await self._sleep(delay)

    async def _call(self, writes: Sequence[Write]) -> BatchOutcome | SinkError:
        """One attempt through the circuit breaker: an outcome, or the error that stopped it."""
        now = self._clock()
        if not self.breaker.allow(now):
            wait = self.breaker.retry_after(now)
            self._report_state()
            return SinkError(self.name, Reason.CIRCUIT_OPEN, f"circuit open, probe in {wait:.1f}s",
                             retry_after_s=wait)
        try:
            async with asyncio.timeout(self._timeout_s):  # a hung server must not hang us
                outcome = await self._attempt(writes)
        except TimeoutError:
            error = SinkError(self.name, Reason.SINK_TIMEOUT, f"no answer in {self._timeout_s}s")
        except SinkError as exc:
            error = exc
        else:
            self.breaker.record_success(self._clock())
            self.consecutive_failures = 0
            self.last_success_at = time.time()
            self._report_state()
            return outcome
        self.last_error, self.last_error_at = error, time.time()
        if error.retryable:  # a refused record says the sink is up; only outages count
            self.consecutive_failures += 1
            self.breaker.record_failure(self._clock())
        else:
            self.breaker.record_success(self._clock())
        self._report_state()
        return error

    def health(self) -> dict[str, object]:
        """For /health/detailed: circuit, failures, last error."""
        return {
            "circuit": self.breaker.state(self._clock()).label,
            "failure_policy": self._failure_policy,
            "consecutive_failures": self.consecutive_failures,
            "retrying": self.retrying,
            "last_success_at": _rfc3339(self.last_success_at),
            "last_error": None if self.last_error is None else {
                "reason": self.last_error.reason.value, "error": str(self.last_error)[:300],
                "at": _rfc3339(self.last_error_at)},
        }

    def _report_state(self) -> None:
        state = self.breaker.state(self._clock())
        if state is not self._reported_state:
            log.warning("sink %s: circuit %s -> %s", self.name, self._reported_state.label, state.label)
            self._reported_state = state
            self._metrics.circuit_state.labels(self.name).set(state)
            self._metrics.circuit_transitions.labels(self.name, state.label).inc()

    async def _attempt(self, writes: Sequence[Write]) -> BatchOutcome:
        if not self._opened:  # a sink that is down at start is retried like any outage
            await self.sink.open()
            self._opened = True
        keys = list(dict.fromkeys(w.key for w in writes))
        current = await self.sink.current_revisions(keys)
        plan = plan_batch(writes, current, key=lambda w: w.key, version=lambda w: w.version,
                          may_rewrite_equal=lambda w: w.may_rewrite_equal)
        if plan.older and self._before_write is not None:
            await self._before_write(plan.older)
        if plan.apply:
            await self.sink.write(plan.apply)
        return BatchOutcome(applied=plan.apply, skipped=plan.skip, older=plan.older)

    async def _isolate(self, writes: Sequence[Write], error: SinkError, attempt: int) -> BatchOutcome:
        if len(writes) == 1:
            log.error("sink %s: %s refused: %s", self.name, writes[0].key, error)
            return BatchOutcome(failed=[(writes[0], error, attempt)])
        outcome = BatchOutcome()
        for write in writes:  # in order, so the revision rule sees them as they came
            outcome.merge(await self._apply([write]))
        return outcome


def _rfc3339(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else format_rfc3339(datetime.fromtimestamp(epoch_s, UTC))
