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

SPLIT_AFTER_FAILURES = 2  # a batch that failed this many attempts is split on its next ones
# What one record can cause (a write too large to finish in time, a document the server chokes
# on); a rate limit or an open circuit says the sink wants fewer calls, not smaller ones.
SPLIT_REASONS = frozenset({Reason.SINK_TIMEOUT, Reason.CONNECTION_ERROR})
LOGGED_KEYS = 20  # records named in one log line of a split
# Under `hold`, a batch of one entity that fails alone while the sink's probe write goes through is
# dead-lettered only after this many such rounds: the probe writes elsewhere, so a lock on the
# records alone (an index built without CONCURRENTLY) looks the same for a while.
LONE_ENTITY_ROUNDS = 3


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

    def in_order_of(self, writes: Sequence[Write]) -> None:
        position = {id(w): i for i, w in enumerate(writes)}
        for writes_of in (self.applied, self.skipped, self.older):
            writes_of.sort(key=lambda w: position[id(w)])
        self.failed.sort(key=lambda f: position[id(f[0])])


class _SplitStopped(Exception):
    """The split cannot tell a record's failure from the sink's: back to retrying what is left."""


@dataclass
class _Split:
    """One split of a failing batch (see `GuardedSink._split`)."""

    attempt: int
    error: SinkError  # the latest failure: what the retry path goes on with if the split stops
    alive: bool  # the sink wrote or refused a part: it answers, so a failing part is a record's
    outcome: BatchOutcome = field(default_factory=BatchOutcome)
    done: set[int] = field(default_factory=set)  # id() of the writes the outcome accounts for
    suspects: list[tuple[Write, SinkError]] = field(default_factory=list)
    dark: int = 0  # part failures since the sink last answered
    unsettled: int = 0  # retryable failures not yet told to the breaker: the sink's, or a record's?
    calls: int = 0
    stopped: str | None = None
    rest: list[Write] = field(default_factory=list)  # what is left to retry, in batch order

    def resolve(self, writes: Sequence[Write], outcome: BatchOutcome) -> None:
        self.outcome.merge(outcome)
        self.done.update(id(w) for w in writes)


class GuardedSink:
    """`hold`: retry retryable errors until the sink answers (the agent stops moving, lag grows).
    `dlq`: after the policy's attempts, the batch's records fail with the last error's reason.

    No record stops the pipeline: a batch the sink refuses (a non-retryable error) is split at
    once, and a batch that keeps failing with an error one record can cause (a timeout, a
    connection error) is split from its third attempt on (see `_split`). While other parts of the
    batch are written, the sink is up: the records that fail on their own fail with their own
    error and the rest is written. When nothing is written, the sink is down: the split stops
    after a few tries and the batch is retried as before. A circuit breaker stops calls to a sink
    that keeps failing (CIRCUIT_OPEN, retryable) and lets a probe through after its open period.
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
        split_gives_up_after: int = 4,
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
        # A split takes the sink for down after this many single records tried, none written;
        # once it was written to, after this many part failures in a row it checks that the
        # sink still answers a read.
        self._split_gives_up_after = split_gives_up_after
        # Under `dlq`, a batch is split at least once before it is given up.
        self._split_from = SPLIT_AFTER_FAILURES + 1
        if failure_policy == "dlq":
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
        self._before_write: OlderHandler | None = None
        self._handed_over: set[int] = set()  # id() of the writes `before_write` received
        self._planned: set[int] = set()  # id() of the writes the last call's plan was to write
        self._lone_rounds = 0  # rounds a batch of one entity failed alone while the probe went through
        self.consecutive_failures = 0
        self.last_error: SinkError | None = None
        self.last_error_at: float | None = None  # time.time()
        self.last_success_at: float | None = None  # time.time(): tells an idle sink from a dead one

    async def apply(self, writes: Sequence[Write], *,
                    before_write: OlderHandler | None = None) -> BatchOutcome:
        """Apply a batch; the outcome accounts for each write once. `before_write` receives the
        writes found older than what the sink holds, each once, and is awaited before anything
        of the batch is written — of their entity at least, when a split writes the batch in
        parts (an entity's writes stay in one part, or in parts written in batch order). A dead
        letter for an older revision must be durable before the newer revision that hides it
        lands, or a crash in between loses it (after a restart the older one looks like replayed
        history)."""
        self._before_write = before_write
        try:
            outcome = await self._apply(writes)
            outcome.in_order_of(writes)  # a split writes parts in any order: report in batch order
            return outcome
        finally:
            self.retrying = False
            self._before_write = None
            self._handed_over = set()
            self._planned = set()
            self._lone_rounds = 0

    async def _apply(self, writes: Sequence[Write]) -> BatchOutcome:
        done = BatchOutcome()
        pending = list(writes)
        error: SinkError | None = None
        attempt = 0
        while True:
            attempt += 1
            if error is not None and attempt >= self._split_from:
                shut = self._admit()
                if shut is None:
                    split = await self._split(pending, attempt, error)
                    done.merge(split.outcome)
                    pending, error, attempt = split.rest, split.error, split.attempt
                else:
                    error = shut
            else:
                result = await self._call(pending)
                if isinstance(result, BatchOutcome):
                    done.merge(result)
                    return done
                error = result
                if not error.retryable and len(pending) == 1:
                    log.error("sink %s: %s refused: %s", self.name, _where(pending[0]), error)
                    done.failed.append((pending[0], error, attempt))
                    return done
                if not error.retryable:  # the sink answers: find the records it refuses
                    split = await self._split(pending, attempt, error)
                    done.merge(split.outcome)
                    pending, error, attempt = split.rest, split.error, split.attempt
            if not pending:
                return done
            self._metrics.retries.labels(self.name, error.reason.value).inc()
            if self._failure_policy == "dlq" and self._backoff.exhausted(attempt):
                done.failed += [(w, error, attempt) for w in pending]
                return done
            delay = self._backoff.delay(
                min(attempt, 32), random=self._random, retry_after_s=error.retry_after_s)
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

    async def _call(self, writes: Sequence[Write], *,
                    part_of_split: bool = False) -> BatchOutcome | SinkError:
        """One call through the circuit breaker: an outcome, or the error that stopped it. A
        split tells the breaker about its parts' retryable failures once it knows whose they
        are."""
        shut = self._admit(part_of_split=part_of_split)
        if shut is not None:
            return shut
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
        if not error.retryable:  # a refused record says the sink is up; only outages count
            self.breaker.record_success(self._clock())
        elif not part_of_split:
            self._count_failure()
        self._report_state()
        return error

    @property
    def busy(self) -> bool:
        """Waiting out a failing sink, or splitting a batch (each failing part may take the whole
        timeout): working, not stalled, for the stall watchdog."""
        return self.retrying or self.splitting

    def _count_failure(self) -> None:
        self.consecutive_failures += 1
        self.breaker.record_failure(self._clock())

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

    async def _attempt(self, writes: Sequence[Write]) -> BatchOutcome:
        if not self._opened:  # a sink that is down at start is retried like any outage
            await self.sink.open()
            self._opened = True
        keys = list(dict.fromkeys(w.key for w in writes))
        self._planned = set()
        current = await self.sink.current_revisions(keys)
        plan = plan_batch(writes, current, key=lambda w: w.key, version=lambda w: w.version,
                          may_rewrite_equal=lambda w: w.may_rewrite_equal)
        fresh = [w for w in plan.older if id(w) not in self._handed_over]
        if fresh and self._before_write is not None:
            await self._before_write(fresh)
            self._handed_over.update(id(w) for w in fresh)
        if plan.apply:
            self._planned = {id(w) for w in plan.apply}
            await self.sink.write(plan.apply)
        return BatchOutcome(applied=plan.apply, skipped=plan.skip, older=plan.older)

    # --- the split: which records fail on their own? ---------------------------------------

    async def _split(self, writes: list[Write], attempt: int, error: SinkError) -> _Split:
        """`writes` failed as a whole with `error`: find the records that fail on their own.

        Only a written part shows the sink up (a sink can answer reads and fail every write), so
        a split first writes a few single records picked at random; if none goes through, the
        sink looks down and the split stops: the batch is retried as before. Once the sink is up,
        the rest is bisected: a part that fails is split again, down to single records
        (suspects), which get one more attempt each after a pause, then fail with their own
        error. Part failures are told to the breaker once the split knows whose they are: the
        sink's (a stopped split) or a record's (counted like a refused record), so an outage
        still opens the circuit and a bad record does not."""
        split = _Split(attempt=attempt, error=error, alive=not error.retryable)
        planned = self._planned  # what the failed attempt was to write, if it got that far
        if split.alive:
            self.retrying = False
        log.warning("sink %s: a batch of %d record(s) %s (%s); attempt %d splits it to find the "
                    "record(s) that fail on their own", self.name, len(writes),
                    "keeps failing" if error.retryable else "was refused", error, attempt)
        self.splitting = True
        try:
            if split.alive:  # refused: the sink answers, look inside at once
                await self._bisect(split, writes)
            else:
                rest = await self._find_the_sink_up(split, writes, planned)
                failed = await self._try(split, rest) if rest else None
                if failed is not None:
                    await self._narrow(split, rest, failed)
            if split.suspects:
                await self._confirm(split)
        except _SplitStopped as stop:
            split.stopped = str(stop)
        finally:
            self.splitting = False
        self._settle(split, sink_failed=split.stopped is not None)
        split.rest = [w for w in writes if id(w) not in split.done]
        self._log_split(split, len(writes))
        return split

    async def _find_the_sink_up(self, split: _Split, writes: list[Write],
                                 planned: set[int]) -> list[Write]:
        """Write single entities picked at random (among those the failed attempt was to write:
        one already held writes nothing and proves nothing) until one is written; the split
        stops after a few tries: the sink looks down. Returns the writes not tried."""
        units: dict[str, list[Write]] = {}
        for write in writes:
            units.setdefault(write.key, []).append(write)
        singles = [key for key, unit in units.items() if len(unit) == 1]
        candidates = [key for key in singles if id(units[key][0]) in planned] or singles or list(units)
        tried: set[str] = set()
        while not split.alive and candidates and len(tried) < self._split_gives_up_after:
            key = candidates.pop(min(int(self._random() * len(candidates)), len(candidates) - 1))
            tried.add(key)
            failed = await self._try(split, units[key])
            if failed is not None:
                await self._narrow(split, units[key], failed)
        if not split.alive and len(units) == 1 and await self._takes_a_probe_write(split):
            self._lone_rounds += 1  # nothing else to write: the sink's own write tells
            if self._failure_policy == "hold" and self._lone_rounds < LONE_ENTITY_ROUNDS:
                raise _SplitStopped(f"{next(iter(units))} fails alone while the sink's probe "
                                    f"write goes through (round {self._lone_rounds} of "
                                    f"{LONE_ENTITY_ROUNDS} before it is dead-lettered)")
            self._answered(split)  # the record fails on its own: the sink takes writes
        if not split.alive:
            raise _SplitStopped(f"no record was written on its own ({len(tried)} tried"
                                f"{', nor the probe write' if len(units) == 1 else ''}): the sink looks down")
        return [w for w in writes if w.key not in tried]

    async def _takes_a_probe_write(self, split: _Split) -> bool:
        """The sink's own small write (`Sink.probe_write`), when no record of the batch could be
        written: it tells a batch of only bad records (one alone, say) from a sink that takes
        no writes."""
        split.calls += 1
        return await self.takes_writes()

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

    async def _bisect(self, split: _Split, part: list[Write]) -> None:
        """`part` failed as a whole: try its halves, then look into those that fail."""
        left, right, any_order = _halves(part)
        failed: list[tuple[list[Write], SinkError]] = []
        for half in (left, right):
            error = await self._try(split, half)
            if error is None:
                continue
            if any_order:  # the sibling first: it tells sooner whether the sink is up
                failed.append((half, error))
            else:
                await self._narrow(split, half, error)
        for half, error in failed:
            await self._narrow(split, half, error)

    async def _narrow(self, split: _Split, part: list[Write], error: SinkError) -> None:
        if len(part) > 1:
            await self._bisect(split, part)
        elif error.retryable:
            split.suspects.append((part[0], error))
        else:
            log.error("sink %s: %s refused: %s", self.name, _where(part[0]), error)
            self._fail(split, part[0], error, split.attempt)

    async def _try(self, split: _Split, part: list[Write]) -> SinkError | None:
        """One part: None when written, else its error. A rate limit or an open circuit is
        waited out (the sink wants fewer calls, nothing is learned about the part)."""
        while True:
            split.calls += 1
            result = await self._call(part, part_of_split=True)
            if isinstance(result, BatchOutcome):
                split.resolve(part, result)
                if result.applied:  # a part already held wrote nothing: no sign either way
                    self._answered(split)
                return None
            if not result.retryable:
                self._answered(split)
                return result
            split.error = result
            if result.reason in SPLIT_REASONS:
                break
            await self._wait_in_split(split, result, len(part))
        split.unsettled += 1
        split.dark += 1
        if split.dark >= self._split_gives_up_after:
            if not split.alive:
                raise _SplitStopped(f"{split.dark} parts failed and none was written: the sink "
                                    "looks down")
            if not await self._takes_a_probe_write(split):
                raise _SplitStopped(f"{split.dark} parts failed in a row and the sink no longer "
                                    "takes its probe write: it looks down now")
            split.dark = 0  # it answers: these are records' failures
        return result

    async def _wait_in_split(self, split: _Split, error: SinkError, size: int) -> None:
        """A wait is an attempt: under `dlq` the split stops when they are spent."""
        if error.reason is Reason.RATE_LIMITED:  # counted as the sink's failure, as ever
            self._count_failure()
            self._report_state()
        if self._failure_policy == "dlq" and self._backoff.exhausted(split.attempt):
            raise _SplitStopped(f"the sink answered {error.reason.value} and the attempts are spent")
        self._metrics.retries.labels(self.name, error.reason.value).inc()
        delay = self._backoff.delay(
            min(split.attempt, 32), random=self._random, retry_after_s=error.retry_after_s)
        log.warning("sink %s: a part of %d record(s) of a split met %s; waiting %.2fs",
                    self.name, size, error.reason.value, delay)
        split.attempt += 1
        self.retrying = True
        await self._sleep(delay)

    async def _confirm(self, split: _Split) -> None:
        """The sink is up: one more attempt of each suspect on its own, so a blip does not
        dead-letter a good record."""
        delay = self._backoff.delay(min(split.attempt, 32), random=self._random)
        self.retrying = False  # the sink is up: this is no wait for it
        log.warning("sink %s: %d record(s) fail on their own while the rest of their batch is "
                    "written: %s; one more attempt each in %.2fs", self.name, len(split.suspects),
                    _listing([_where(w) for w, _ in split.suspects]), delay)
        await self._sleep(delay)
        for write, _ in split.suspects:
            error = await self._try(split, [write])
            if error is None:
                log.info("sink %s: %s went through on its own attempt", self.name, _where(write))
                continue
            log.error("sink %s: %s fails on its own (%s) while the sink takes the rest of its "
                      "batch; dead-lettered after %d attempt(s)", self.name, _where(write), error,
                      split.attempt + 1)
            self._fail(split, write, error, split.attempt + 1)

    def _fail(self, split: _Split, write: Write, error: SinkError, attempts: int) -> None:
        if id(write) in self._handed_over:  # already dead-lettered as older: that is what it is
            split.resolve([write], BatchOutcome(older=[write]))
        else:
            split.resolve([write], BatchOutcome(failed=[(write, error, attempts)]))

    def _answered(self, split: _Split) -> None:
        """A part was written or refused: the sink is up, and the failures since were a record's."""
        split.alive = True
        split.dark = 0
        self.retrying = False
        self._settle(split, sink_failed=False)

    def _settle(self, split: _Split, *, sink_failed: bool) -> None:
        for _ in range(split.unsettled):
            if sink_failed:
                self._count_failure()
            else:
                self.breaker.record_success(self._clock())
        split.unsettled = 0
        self._report_state()

    def _log_split(self, split: _Split, size: int) -> None:
        failed = split.outcome.failed
        self._metrics.sink_splits.labels(self.name, "stopped" if split.stopped else "done").inc()
        own = _listing([f"{_where(w)} {e.reason.value}" for w, e, _ in failed])
        if split.stopped is None:
            log.warning("sink %s: split of %d record(s) done in %d call(s): %d written or skipped, "
                        "%d failed on their own%s", self.name, size, split.calls,
                        size - len(failed), len(failed), f": {own}" if failed else "")
        else:
            log.warning("sink %s: split of %d record(s) stopped after %d call(s): %s; %d resolved "
                        "(%d failed on their own%s), %d go back to retrying (%s)", self.name, size,
                        split.calls, split.stopped, size - len(split.rest), len(failed),
                        f": {own}" if failed else "", len(split.rest), split.error)


def _halves(part: Sequence[Write]) -> tuple[list[Write], list[Write], bool]:
    """Two halves of a failing part, and whether they may be tried in any order: halves that
    share no entity may (the revision rule orders writes within an entity only); one entity's
    writes are cut in batch order instead, and tried in that order."""
    keys = list(dict.fromkeys(w.key for w in part))
    if len(keys) == 1:
        middle = len(part) // 2
        return list(part[:middle]), list(part[middle:]), False
    left = set(keys[: len(keys) // 2])
    return [w for w in part if w.key in left], [w for w in part if w.key not in left], True


def _where(write: Write) -> str:
    """`tenant:id (topic[partition]@offset)`, the source position where known."""
    if write.origin_tp is None:
        return write.key
    topic, _, partition = write.origin_tp.rpartition(":")
    return f"{write.key} ({topic}[{partition}]@{write.origin_offset})"


def _listing(names: list[str]) -> str:
    more = len(names) - LOGGED_KEYS
    return ", ".join(names[:LOGGED_KEYS]) + (f", … ({more} more)" if more > 0 else "")


def _rfc3339(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else format_rfc3339(datetime.fromtimestamp(epoch_s, UTC))
