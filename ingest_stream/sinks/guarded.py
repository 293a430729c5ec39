"""Any sink, wrapped: revision-guarded batch planning, retries with backoff, failure isolation.

The result says what happened to each write; the wiring turns it into DLQ records and acks.
"""

from __future__ import annotations

import asyncio
import logging
import random as random_module
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from ingest_stream.config import FailurePolicy
from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.breaker import CircuitBreaker, CircuitState
from ingest_stream.core.reasons import Reason
from ingest_stream.core.revision import plan_batch
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.errors import SinkError
from ingest_stream.metrics import Metrics
from ingest_stream.sinks.base import BatchCall, BatchOutcome, OlderHandler, Sink, Write, where
from ingest_stream.sinks.split import BatchSplit

__all__ = ["BatchOutcome", "GuardedSink"]  # BatchOutcome: sinks/base.py, the one result of a batch

log = logging.getLogger(__name__)

SPLIT_AFTER_FAILURES = 2  # a batch that failed this many attempts is split on its next ones


class GuardedSink:
    """`hold`: retry retryable errors until the sink answers (the agent stops moving, lag grows).
    `dlq`: after the policy's attempts, the batch's records fail with the last error's reason.

    No record stops the pipeline: a batch the sink refuses (a non-retryable error) is split at
    once, and a batch that keeps failing with an error one record can cause (a timeout, a
    connection error) is split from its third attempt on (see `sinks/split.py`). While other
    parts of the batch are written, the sink is up: the records that fail on their own fail with
    their own error and the rest is written. When nothing is written, the sink is down: the split
    stops after a few tries and the batch is retried as before. A circuit breaker stops calls to
    a sink that keeps failing (CIRCUIT_OPEN, retryable) and lets a probe through after its open
    period.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        metrics: Metrics,
        backoff: BackoffPolicy,
        failure_policy: FailurePolicy | str,
        timeout_s: float,
        breaker: CircuitBreaker | None = None,
        split_gives_up_after: int = 4,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = random_module.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self._metrics = metrics
        self._backoff = backoff
        self._failure_policy = FailurePolicy(failure_policy)  # "dlq" and FailurePolicy.DLQ alike
        self._timeout_s = timeout_s
        # A split takes the sink for down after this many single records tried, none written;
        # once it was written to, after this many part failures in a row it checks that the
        # sink still answers a read.
        self._split_gives_up_after = split_gives_up_after
        # Under `dlq`, a batch is split at least once before it is given up.
        self._split_from = SPLIT_AFTER_FAILURES + 1
        if self._failure_policy is FailurePolicy.DLQ:
            self._split_from = min(self._split_from, max(2, backoff.max_attempts))
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self.breaker = breaker or CircuitBreaker()
        self._reported_state = CircuitState.CLOSED
        metrics.circuit_state.labels(self.name).set(CircuitState.CLOSED)
        self._opened = False
        self.retrying = False  # waiting out a failing sink: busy, not stalled
        self.splitting = False  # looking for the records of a batch that fail on their own
        self.consecutive_failures = 0
        self.last_error: SinkError | None = None
        self.last_error_at: float | None = None  # time.time()
        self.last_success_at: float | None = None  # time.time(): tells an idle sink from a dead one

    async def apply(self, writes: Sequence[Write], *, before_write: OlderHandler | None = None,
                    spill_when_down: bool = False) -> BatchOutcome:
        """Apply a batch; the outcome accounts for each write once. `before_write` receives the
        writes found older than what the sink holds, each once, and is awaited before anything
        of the batch is written — of their entity at least, when a split writes the batch in
        parts (an entity's writes stay in one part, or in parts written in batch order). A dead
        letter for an older revision must be durable before the newer revision that hides it
        lands, or a crash in between loses it (after a restart the older one looks like replayed
        history). So it is called, not returned: between an attempt's read of the revisions and
        its write, on every attempt (a retry may find more). What the call learns about its batch
        stays in its `BatchCall`, not on the sink.

        `spill_when_down` (the in-process lane, stream/lanes.py): a retryable failure is not waited
        out; what is left comes back `unwritten`, to be spilled to the sink topic, whose agent
        retries it under the failure policy. Writes already handed to `before_write` are reported
        `older` (their letters are out), never `unwritten`."""
        try:
            outcome = await self._apply(writes, BatchCall(before_write, spill_when_down=spill_when_down))
            outcome.in_order_of(writes)  # a split writes parts in any order: report in batch order
            return outcome
        finally:
            self.retrying = False

    async def _apply(self, writes: Sequence[Write], call: BatchCall) -> BatchOutcome:
        done = BatchOutcome()
        pending = list(writes)
        error: SinkError | None = None
        attempt = 0
        while True:
            attempt += 1
            if error is not None and attempt >= self._split_from:
                shut = self._admit()
                if shut is None:
                    split = await BatchSplit(self, call, pending, attempt, error).run()
                    done.merge(split.outcome)
                    pending, error, attempt = split.rest, split.error, split.attempt
                else:
                    error = shut
            else:
                result = await self._call(pending, call)
                if isinstance(result, BatchOutcome):
                    done.merge(result)
                    return done
                error = result
                if not error.retryable and len(pending) == 1:
                    log.error("sink %s: %s refused: %s", self.name, where(pending[0]), error)
                    done.failed.append((pending[0], error, attempt))
                    return done
                if not error.retryable:  # the sink answers: find the records it refuses
                    split = await BatchSplit(self, call, pending, attempt, error).run()
                    done.merge(split.outcome)
                    pending, error, attempt = split.rest, split.error, split.attempt
            if not pending:
                return done
            if call.spill_when_down and error.retryable:
                done.older += [w for w in pending if id(w) in call.handed_over]
                done.unwritten += [w for w in pending if id(w) not in call.handed_over]
                return done
            self.count_retry(error.reason)
            if self.gives_up_at(attempt):
                done.failed += [(w, error, attempt) for w in pending]
                return done
            delay = self.retry_delay(attempt, retry_after_s=error.retry_after_s)
            log.warning("sink %s: attempt %d for %d record(s) failed (%s); retrying in %.2fs",
                        self.name, attempt, len(pending), error, delay)
            self.retrying = True
            await self._sleep(delay)

    def _admit(self, *, part_of_split: bool = False) -> SinkError | None:
        """None when a call may be made now, else the CIRCUIT_OPEN error. A split's parts belong
        to the attempt the breaker let through (a half-open probe included): only an open
        circuit stops them."""
        now = self._clock()
        if self.breaker.state(now) is not CircuitState.OPEN if part_of_split else self.breaker.allow(now):
            return None
        wait = self.breaker.retry_after(now)
        self._report_state()
        return SinkError(self.name, Reason.CIRCUIT_OPEN, f"circuit open, probe in {wait:.1f}s",
                         retry_after_s=wait)

    async def _call(self, writes: Sequence[Write], call: BatchCall, *,
                    part_of_split: bool = False) -> BatchOutcome | SinkError:
        """One call through the circuit breaker: an outcome, or the error that stopped it. A
        split tells the breaker about its parts' retryable failures once it knows whose they
        are."""
        shut = self._admit(part_of_split=part_of_split)
        if shut is not None:
            return shut
        try:
            async with asyncio.timeout(self._timeout_s):  # a hung server must not hang us
                outcome = await self._attempt(writes, call)
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
        if not error.retryable:  # a refused record says the sink is up; only outages count
            self.breaker.record_success(self._clock())
        elif not part_of_split:
            self._count_failure()
        self._report_state()
        return error

    async def takes_writes(self) -> bool:
        """Whether the sink's probe write goes through now (an open circuit: no)."""
        if self._admit(part_of_split=True) is not None:
            return False
        try:
            async with asyncio.timeout(self._timeout_s):
                await self.sink.probe_write()
        except (SinkError, TimeoutError) as error:
            log.warning("sink %s: the probe write failed (%s)", self.name, error)
            return False
        log.warning("sink %s: the probe write went through: the sink takes writes", self.name)
        return True

    @property
    def busy(self) -> bool:
        """Waiting out a failing sink, or splitting a batch (each failing part may take the whole
        timeout): working, not stalled, for the stall watchdog."""
        return self.retrying or self.splitting

    def _count_failure(self) -> None:
        self.consecutive_failures += 1
        self.breaker.record_failure(self._clock())

    # --- what a split of a failing batch uses (sinks/split.py) ----------------------------------
    @property
    def failure_policy(self) -> FailurePolicy:
        return self._failure_policy

    @property
    def split_gives_up_after(self) -> int:
        """A split takes the sink for down after this many single records tried, none written (and
        checks that it still takes writes after this many part failures in a row)."""
        return self._split_gives_up_after

    def pick(self, count: int) -> int:
        """A random index below `count`, from the sink's random source."""
        return min(int(self._random() * count), count - 1)

    def now(self) -> float:
        """The sink's clock (monotonic; tests replace it)."""
        return self._clock()

    def gives_up_at(self, attempt: int) -> bool:
        """Whether a batch still failing after `attempt` attempts is given up (`dlq` only)."""
        return self._failure_policy is FailurePolicy.DLQ and self._backoff.exhausted(attempt)

    def retry_delay(self, attempt: int, *, retry_after_s: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (the backoff, jittered)."""
        return self._backoff.delay(min(attempt, 32), random=self._random, retry_after_s=retry_after_s)

    def count_retry(self, reason: Reason) -> None:
        self._metrics.retries.labels(self.name, reason.value).inc()

    def count_split(self, *, stopped: bool) -> None:
        self._metrics.sink_splits.labels(self.name, "stopped" if stopped else "done").inc()

    async def sleep(self, delay_s: float) -> None:
        """Wait `delay_s` seconds (the sink's sleep: tests replace it)."""
        await self._sleep(delay_s)

    async def write_part(self, writes: Sequence[Write], call: BatchCall) -> BatchOutcome | SinkError:
        """One call for a part of a split batch: only an open circuit stops it, and a retryable
        failure is not counted by the breaker (`settle_part_failures` does, once it is known
        whose it was)."""
        return await self._call(writes, call, part_of_split=True)

    def settle_part_failures(self, count: int, *, sink_failed: bool) -> None:
        """Tell the breaker about `count` retryable failures of a split's parts: the sink's (each
        counted as a failure) or records' (each a success: the sink answered); then report the
        circuit's state."""
        for _ in range(count):
            if sink_failed:
                self._count_failure()
            else:
                self.breaker.record_success(self._clock())
        self._report_state()

    def health(self) -> dict[str, object]:
        """For /health/detailed: circuit, failures, last error."""
        return {
            "circuit": self.breaker.state(self._clock()).label,
            "failure_policy": self._failure_policy,
            "consecutive_failures": self.consecutive_failures,
            "retrying": self.retrying,
            "splitting": self.splitting,
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

    async def _attempt(self, writes: Sequence[Write], call: BatchCall) -> BatchOutcome:
        if not self._opened:  # a sink that is down at start is retried like any outage
            await self.sink.open()
            self._opened = True
        keys = list(dict.fromkeys(w.key for w in writes))
        call.planned = set()
        current = await self.sink.current_revisions(keys)
        plan = plan_batch(writes, current, key=lambda w: w.key, version=lambda w: w.version,
                          may_rewrite_equal=lambda w: w.may_rewrite_equal, replayed=lambda w: w.replayed)
        fresh = [w for w in plan.older if id(w) not in call.handed_over]
        if fresh and call.before_write is not None:
            await call.before_write(fresh)
            call.handed_over.update(id(w) for w in fresh)
        if plan.apply:
            call.planned = {id(w) for w in plan.apply}
            await self.sink.write(plan.apply)
        return BatchOutcome(applied=plan.apply, skipped=plan.skip, older=plan.older)


def _rfc3339(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else format_rfc3339(datetime.fromtimestamp(epoch_s, UTC))
