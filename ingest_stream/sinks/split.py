"""The split of a failing batch: which of its records fail on their own?

A batch the sink refuses (a non-retryable error) is split at once; one that keeps failing with an
error one record can cause (a timeout, a connection error) is split from a later attempt on (see
`GuardedSink`). The split writes the batch in parts, down to single records, while the sink shows
it is up: the records that fail on their own fail with their own error, the rest is written. When
nothing is written, the sink looks down: the split stops and the batch goes back to retrying.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from ingest_stream.config import FailurePolicy
from ingest_stream.core.reasons import Reason
from ingest_stream.errors import SinkError
from ingest_stream.sinks.base import BatchCall, BatchOutcome, Write, where

log = logging.getLogger(__name__)

# What one record can cause (a write too large to finish in time, a document the server chokes
# on); a rate limit or an open circuit says the sink wants fewer calls, not smaller ones.
SPLIT_REASONS = frozenset({Reason.SINK_TIMEOUT, Reason.CONNECTION_ERROR})
LOGGED_KEYS = 20  # records named in one log line of a split
# Under `hold`, a batch of one entity that fails alone while the sink's probe write goes through is
# dead-lettered only once it has failed so for this long: the probe writes elsewhere, so a lock on
# the records alone (an index built without CONCURRENTLY, a VACUUM FULL) looks the same meanwhile.
LONE_ENTITY_HOLD_S = 300.0


class Guard(Protocol):
    """What a split needs from the `GuardedSink` that runs it."""

    name: str
    retrying: bool
    splitting: bool

    @property
    def failure_policy(self) -> str: ...

    @property
    def split_gives_up_after(self) -> int: ...

    def pick(self, count: int) -> int: ...

    def now(self) -> float: ...

    def gives_up_at(self, attempt: int) -> bool: ...

    def retry_delay(self, attempt: int, *, retry_after_s: float | None = None) -> float: ...

    def count_retry(self, reason: Reason) -> None: ...

    def count_split(self, *, stopped: bool) -> None: ...

    async def sleep(self, delay_s: float) -> None: ...

    async def write_part(self, writes: Sequence[Write], call: BatchCall) -> BatchOutcome | SinkError: ...

    async def takes_writes(self) -> bool: ...

    def settle_part_failures(self, count: int, *, sink_failed: bool) -> None: ...


class _SplitStopped(Exception):
    """The split cannot tell a record's failure from the sink's: back to retrying what is left."""


class BatchSplit:
    """One split of a failing batch (see `run`)."""

    def __init__(self, guard: Guard, call: BatchCall, writes: list[Write], attempt: int,
                 error: SinkError) -> None:
        self.guard = guard
        self.call = call  # the batch's state across attempts (what was planned, handed over)
        self.writes = writes
        self.attempt = attempt
        self.error = error  # the latest failure: what the retry path goes on with if the split stops
        # the sink wrote or refused a part: it answers, so a failing part is a record's
        self.alive = not error.retryable
        self.outcome = BatchOutcome()
        self.done: set[int] = set()  # id() of the writes the outcome accounts for
        self.suspects: list[tuple[Write, SinkError]] = []
        self.dark = 0  # part failures since the sink last answered
        self.unsettled = 0  # retryable failures not yet told to the breaker: the sink's, or a record's?
        self.calls = 0
        self.stopped: str | None = None
        self.rest: list[Write] = []  # what is left to retry, in batch order

    def resolve(self, writes: Sequence[Write], outcome: BatchOutcome) -> None:
        self.outcome.merge(outcome)
        self.done.update(id(w) for w in writes)

    async def run(self) -> BatchSplit:
        """`writes` failed as a whole with `error`: find the records that fail on their own.

        Only a written part shows the sink up (a sink can answer reads and fail every write), so
        a split first writes a few single records picked at random; if none goes through, the
        sink looks down and the split stops: the batch is retried as before. Once the sink is up,
        the rest is bisected: a part that fails is split again, down to single records
        (suspects), which get one more attempt each after a pause, then fail with their own
        error. Part failures are told to the breaker once the split knows whose they are: the
        sink's (a stopped split) or a record's (counted like a refused record), so an outage
        still opens the circuit and a bad record does not.

        Returns itself, done: `outcome` for the writes it resolved, `rest` to retry, and the
        `error` and `attempt` the retry path goes on with."""
        guard, writes, error = self.guard, self.writes, self.error
        planned = self.call.planned  # what the failed attempt was to write, if it got that far
        if self.alive:
            guard.retrying = False
        log.warning("sink %s: a batch of %d record(s) %s (%s); attempt %d splits it to find the "
                    "record(s) that fail on their own", guard.name, len(writes),
                    "keeps failing" if error.retryable else "was refused", error, self.attempt)
        guard.splitting = True
        try:
            if self.alive:  # refused: the sink answers, look inside at once
                await self._bisect(writes)
            else:
                rest = await self._find_the_sink_up(writes, planned)
                failed = await self._try(rest) if rest else None
                if failed is not None:
                    await self._narrow(rest, failed)
            if self.suspects:
                await self._confirm()
        except _SplitStopped as stop:
            self.stopped = str(stop)
        finally:
            guard.splitting = False
        self._settle(sink_failed=self.stopped is not None)
        self.rest = [w for w in writes if id(w) not in self.done]
        self._log_split(len(writes))
        return self

    async def _find_the_sink_up(self, writes: list[Write], planned: set[int]) -> list[Write]:
        """Write single entities picked at random (among those the failed attempt was to write:
        one already held writes nothing and proves nothing) until one is written; the split
        stops after a few tries: the sink looks down. Returns the writes not tried."""
        guard = self.guard
        units: dict[str, list[Write]] = {}
        for write in writes:
            units.setdefault(write.key, []).append(write)
        singles = [key for key, unit in units.items() if len(unit) == 1]
        candidates = [key for key in singles if id(units[key][0]) in planned] or singles or list(units)
        tried: set[str] = set()
        while not self.alive and candidates and len(tried) < guard.split_gives_up_after:
            key = candidates.pop(guard.pick(len(candidates)))
            tried.add(key)
            failed = await self._try(units[key])
            if failed is not None:
                await self._narrow(units[key], failed)
        if not self.alive and len(units) == 1 and await self._takes_a_probe_write():
            held_s = self.call.failing_alone_for(guard.now())  # nothing else to write: the probe tells
            if guard.failure_policy is FailurePolicy.HOLD and held_s < LONE_ENTITY_HOLD_S:
                raise _SplitStopped(f"{next(iter(units))} fails alone while the sink's probe write "
                                    f"goes through, for {held_s:.0f}s (dead-lettered after "
                                    f"{LONE_ENTITY_HOLD_S:.0f}s)")
            self._answered()  # the record fails on its own: the sink takes writes
        if not self.alive:
            raise _SplitStopped(f"no record was written on its own ({len(tried)} tried"
                                f"{', nor the probe write' if len(units) == 1 else ''}): the sink looks down")
        return [w for w in writes if w.key not in tried]

    async def _takes_a_probe_write(self) -> bool:
        """The sink's own small write (`Sink.probe_write`), when no record of the batch could be
        written: it tells a batch of only bad records (one alone, say) from a sink that takes
        no writes."""
        self.calls += 1
        return await self.guard.takes_writes()

    async def _bisect(self, part: list[Write]) -> None:
        """`part` failed as a whole: try its halves, then look into those that fail."""
        left, right, any_order = _halves(part)
        failed: list[tuple[list[Write], SinkError]] = []
        for half in (left, right):
            error = await self._try(half)
            if error is None:
                continue
            if any_order:  # the sibling first: it tells sooner whether the sink is up
                failed.append((half, error))
            else:
                await self._narrow(half, error)
        for half, error in failed:
            await self._narrow(half, error)

    async def _narrow(self, part: list[Write], error: SinkError) -> None:
        if len(part) > 1:
            await self._bisect(part)
        elif error.retryable:
            self.suspects.append((part[0], error))
        else:
            log.error("sink %s: %s refused: %s", self.guard.name, where(part[0]), error)
            self._fail(part[0], error, self.attempt)

    async def _try(self, part: list[Write]) -> SinkError | None:
        """One part: None when written, else its error. A rate limit or an open circuit is
        waited out (the sink wants fewer calls, nothing is learned about the part)."""
        while True:
            self.calls += 1
            result = await self.guard.write_part(part, self.call)
            if isinstance(result, BatchOutcome):
                self.resolve(part, result)
                if result.applied:  # a part already held wrote nothing: no sign either way
                    self._answered()
                return None
            if not result.retryable:
                self._answered()
                return result
            self.error = result
            if result.reason in SPLIT_REASONS:
                break
            await self._wait_in_split(result, len(part))
        self.unsettled += 1
        self.dark += 1
        if self.dark >= self.guard.split_gives_up_after:
            if not self.alive:
                raise _SplitStopped(f"{self.dark} parts failed and none was written: the sink "
                                    "looks down")
            if not await self._takes_a_probe_write():
                raise _SplitStopped(f"{self.dark} parts failed in a row and the sink no longer "
                                    "takes its probe write: it looks down now")
            self.dark = 0  # it answers: these are records' failures
        return result

    async def _wait_in_split(self, error: SinkError, size: int) -> None:
        """A wait is an attempt: under `dlq` the split stops when they are spent."""
        guard = self.guard
        if error.reason is Reason.RATE_LIMITED:  # counted as the sink's failure, as ever
            guard.settle_part_failures(1, sink_failed=True)
        if guard.gives_up_at(self.attempt):
            raise _SplitStopped(f"the sink answered {error.reason.value} and the attempts are spent")
        guard.count_retry(error.reason)
        delay = guard.retry_delay(self.attempt, retry_after_s=error.retry_after_s)
        log.warning("sink %s: a part of %d record(s) of a split met %s; waiting %.2fs",
                    guard.name, size, error.reason.value, delay)
        self.attempt += 1
        guard.retrying = True
        await guard.sleep(delay)

    async def _confirm(self) -> None:
        """The sink is up: one more attempt of each suspect on its own, so a blip does not
        dead-letter a good record."""
        guard = self.guard
        delay = guard.retry_delay(self.attempt)
        guard.retrying = False  # the sink is up: this is no wait for it
        log.warning("sink %s: %d record(s) fail on their own while the rest of their batch is "
                    "written: %s; one more attempt each in %.2fs", guard.name, len(self.suspects),
                    _listing([where(w) for w, _ in self.suspects]), delay)
        await guard.sleep(delay)
        for write, _ in self.suspects:
            error = await self._try([write])
            if error is None:
                log.info("sink %s: %s went through on its own attempt", guard.name, where(write))
                continue
            log.error("sink %s: %s fails on its own (%s) while the sink takes the rest of its "
                      "batch; dead-lettered after %d attempt(s)", guard.name, where(write), error,
                      self.attempt + 1)
            self._fail(write, error, self.attempt + 1)

    def _fail(self, write: Write, error: SinkError, attempts: int) -> None:
        if id(write) in self.call.handed_over:  # already dead-lettered as older: that is what it is
            self.resolve([write], BatchOutcome(older=[write]))
        else:
            self.resolve([write], BatchOutcome(failed=[(write, error, attempts)]))

    def _answered(self) -> None:
        """A part was written or refused: the sink is up, and the failures since were a record's."""
        self.alive = True
        self.dark = 0
        self.guard.retrying = False
        self._settle(sink_failed=False)

    def _settle(self, *, sink_failed: bool) -> None:
        self.guard.settle_part_failures(self.unsettled, sink_failed=sink_failed)
        self.unsettled = 0

    def _log_split(self, size: int) -> None:
        guard, failed = self.guard, self.outcome.failed
        guard.count_split(stopped=bool(self.stopped))
        own = _listing([f"{where(w)} {e.reason.value}" for w, e, _ in failed])
        if self.stopped is None:
            log.warning("sink %s: split of %d record(s) done in %d call(s): %d written or skipped, "
                        "%d failed on their own%s", guard.name, size, self.calls,
                        size - len(failed), len(failed), f": {own}" if failed else "")
        else:
            log.warning("sink %s: split of %d record(s) stopped after %d call(s): %s; %d resolved "
                        "(%d failed on their own%s), %d go back to retrying (%s)", guard.name, size,
                        self.calls, self.stopped, size - len(self.rest), len(failed),
                        f": {own}" if failed else "", len(self.rest), self.error)


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


def _listing(names: list[str]) -> str:
    more = len(names) - LOGGED_KEYS
    return ", ".join(names[:LOGGED_KEYS]) + (f", … ({more} more)" if more > 0 else "")
