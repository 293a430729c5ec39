"""A sink's lane: whether the processing agent hands it records in process or spills them to its topic.

The fan-out is in process (`DIRECT`) while the sink keeps up. A sink that fails, or whose lane
keeps a batch waiting `max_wait_s` longer than the other lanes do while the worker has CPU to
spare, **spills**: its records go to `ingest.sink.<name>`, which its agent drains (`SPILLING`).
Per-entity order is kept by one rule: nothing is written in process while records of this
worker's partitions wait in the sink topic. So a recovered lane first stops spilling and holds new
batches (`SWITCHING`) until its agent has written everything up to what was spilled (`need`), and
only then writes in process again. After a start or a rebalance a lane holds new batches the
same way until it has measured what the topic holds for newly assigned partitions, and drains that
first.

Pure: the wiring (stream/lanes.py) feeds it the sink's health, the wait of its oldest batch, the
worker's CPU use, the offsets spilled, and how far the sink agent has got (`done`, per sink-topic
partition).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

T = TypeVar("T")


class LaneMode(IntEnum):
    """Values are what `ingest_sink_lane_state` exports."""

    DIRECT = 0  # written in process
    SPILLING = 1  # produced to the sink topic, written by the sink agent
    SWITCHING = 2  # recovered: new batches wait until the sink topic is drained

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class LanePolicy:
    # A lane whose oldest batch has waited this much longer than the other lanes' spills: it holds
    # them back (their acks wait for it). In a backlog every lane's batches wait about
    # window/rate (~1.3 s at 10,000 records in flight and 7,500/s): below that, they would spill
    # for nothing, and the spill's round trip through the broker costs more than it frees.
    max_wait_s: float = 2.0
    # ... and only while the worker has CPU to spare (cores busy, all its threads, below this). A
    # spill moves the sink's work to its topic: a produce, a consume and a check more per record, on
    # this same worker. A sink slow on its own leaves the worker waiting (0.37 of a core busy with
    # Typesense frozen 0.4 s of every 0.5); a worker busy at ~0.85 is CPU-bound, its slowest lane
    # the pace of a backlog, and spilling it slowed every sink (stage (c) 4,564 -> 2,951 records/s).
    spill_busy_max: float = 0.75
    switch_backlog: int = 500  # records left in the sink topic at which a recovered lane switches
    switch_wait_s: float = 0.5  # the longest a switching lane holds a batch; then it spills again
    # (a lane not yet measured holds up to max_wait_s: the measurement peeks at each topic, ~1 s)
    switch_retry_max_s: float = 30.0  # after a failed switch, the next waits 1 s, 2 s, … up to this

    def __post_init__(self) -> None:
        if (min(self.max_wait_s, self.switch_wait_s, self.switch_retry_max_s, self.spill_busy_max) <= 0
                or self.switch_backlog < 0):
            raise ValueError("max_wait_s, switch_wait_s, switch_retry_max_s and spill_busy_max must be "
                             "positive and switch_backlog not negative")


class Lane:
    def __init__(self, policy: LanePolicy, *, now: float) -> None:
        self.policy = policy
        self.mode = LaneMode.SPILLING  # nothing known yet: nothing is written in process
        self.reason = "started"
        self.since = now
        self.owned: set[int] = set()  # sink-topic partitions this worker writes (its source partitions)
        self.need: dict[int, int] = {}  # partition -> offset the sink agent must pass first
        self.unknown: set[int] = set()  # assigned, what the topic holds there not yet measured
        self.assigned = False  # before the first assignment nothing is known
        # A switch that timed out (the sink agent drains too slowly for new batches to wait) is
        # not tried again at once: each hold stops every lane's batches behind it.
        self._switch_retry_s = 1.0
        self._switch_not_before = 0.0
        self._hold_max_s = policy.switch_wait_s  # this switch's bound (longer if it began unmeasured)

    def assign(self, partitions: Collection[int], *, now: float) -> None:
        """A rebalance: partitions new to this worker may hold spilled records of another worker
        (or of this one before a crash); until measured, nothing is written in process."""
        new = set(partitions) - self.owned
        self.owned = set(partitions)
        self.assigned = True
        self.need = {p: n for p, n in self.need.items() if p in self.owned}
        self.unknown &= self.owned
        if new:
            self.unknown |= new
            self._move(LaneMode.SPILLING, "partitions assigned: draining the sink topic first", now)

    def measured(self, ends: Mapping[int, int]) -> None:
        """End offsets of the sink topic's partitions, measured after `assign`."""
        for partition in list(self.unknown):
            if partition in ends:
                self.need[partition] = max(self.need.get(partition, 0), ends[partition])
                self.unknown.discard(partition)

    def spilled(self, partition: int, next_offset: int) -> None:
        """The broker acknowledged spilled records up to `next_offset` (exclusive)."""
        self.need[partition] = max(self.need.get(partition, 0), next_offset)

    def backlog(self, done: Mapping[int, int]) -> int | None:
        """Records spilled (or found) in the sink topic that its agent has not written yet; None
        while that is unknown."""
        if self.unknown or not self.assigned:
            return None
        return sum(max(0, need - done.get(p, 0)) for p, need in self.need.items())

    def failed(self, error: str, *, now: float) -> None:
        """An in-process write met an outage: what it did not write spills, and so does what follows.
        No switch back is tried for a while (the wait a failed switch would leave, 1 s at first):
        one failure leaves the breaker closed, and a switch at once held new batches for nothing."""
        self._move(LaneMode.SPILLING, f"sink failed: {error}", now)
        self._switch_not_before = max(self._switch_not_before, now + self._switch_retry_s)

    def decide(self, *, sink_ok: bool, head_wait_s: float, done: Mapping[int, int], now: float,
               behind_s: float | None = None, busy: float = 0.0) -> LaneMode:
        """The mode for the lane's oldest batch (`head_wait_s`: how long it has waited, 0 if none).

        `behind_s`: how much longer it has waited than the other lanes' oldest batches (idle lanes
        count 0; the default: `head_wait_s`). A slow sink spills when it holds the others back, not
        when every lane is busy: in a backlog all lanes wait alike, and spilling would only add the
        sink topic's round trip to the work (it did: 227 µs per record against 108). `busy`: the
        worker's CPU use in cores, lately; at `spill_busy_max` or more, slowness spills nothing."""
        behind = head_wait_s if behind_s is None else behind_s
        mode = self.mode
        if mode is LaneMode.DIRECT:
            if not sink_ok:
                self._move(LaneMode.SPILLING, "sink not answering (circuit or retries)", now)
            elif behind > self.policy.max_wait_s and busy < self.policy.spill_busy_max:
                self._move(LaneMode.SPILLING, f"a batch waited {head_wait_s:.1f}s for the sink, "
                                              f"{behind:.1f}s more than the other lanes' (worker "
                                              f"{busy:.2f} of a core busy)", now)
            return self.mode
        backlog = self.backlog(done)
        policy = self.policy
        if mode is LaneMode.SPILLING:
            if not sink_ok or now < self._switch_not_before:
                return self.mode
            if backlog is None:
                # Not measured yet (a start, a rebalance): hold new batches for the measurement,
                # which mostly finds nothing to drain. Spilled meanwhile, a backlog's first batches
                # left the lane a switch to make under full load, and it failed (stage (c) 2,394
                # records/s spilled throughout, against 5,331 in process).
                self._move(LaneMode.SWITCHING, "sink topic not measured yet: holding new batches", now)
                self._hold_max_s = policy.max_wait_s
            elif backlog <= policy.switch_backlog:
                self._move(LaneMode.SWITCHING, f"sink answers, {backlog} record(s) left in its topic", now)
                self._hold_max_s = policy.switch_wait_s
            else:
                return self.mode
        # How long this switch has held the oldest batch (it may have waited before the switch began).
        held_s = min(head_wait_s, now - self.since)
        if backlog == 0:
            self._move(LaneMode.DIRECT, "sink topic drained", now)
            self._switch_retry_s = 1.0
        elif not sink_ok:
            self._move(LaneMode.SPILLING, "sink not answering while switching back", now)
        elif backlog is not None and backlog > policy.switch_backlog:
            self._move(LaneMode.SPILLING, f"measured: {backlog} record(s) in its topic to drain first", now)
        elif held_s > self._hold_max_s:
            self._move(LaneMode.SPILLING, f"switching back took over {held_s:.1f}s "
                                          f"(next try in {self._switch_retry_s:g}s)", now)
            self._switch_not_before = now + self._switch_retry_s
            self._switch_retry_s = min(self._switch_retry_s * 2, self.policy.switch_retry_max_s)
        return self.mode

    def _move(self, mode: LaneMode, reason: str, now: float) -> None:
        if mode is not self.mode:
            self.mode, self.since = mode, now
        self.reason = reason


class CpuShare:
    """The worker process's CPU use in cores (`cpu`: its CPU seconds, every thread: the event loop
    and Faust's consumer thread), over the last `window_s` or a little more; 0 until the first
    window has passed."""

    def __init__(self, window_s: float, *, clock: Callable[[], float], cpu: Callable[[], float]) -> None:
        self._window_s, self._clock, self._cpu = window_s, clock, cpu
        self._since, self._used = clock(), cpu()
        self._share = 0.0

    def share(self) -> float:
        now = self._clock()
        if now - self._since >= self._window_s:
            used = self._cpu()
            self._share = (used - self._used) / (now - self._since)
            self._since, self._used = now, used
        return self._share


def shares(items: Sequence[T], *, key: Callable[[T], str], batch_size: int, parallel: int) -> list[list[T]]:
    """`items` cut into batches written side by side: about `batch_size` each, at most `parallel`,
    every key's items in one batch and in their order there (so per-entity order holds when the
    batches are written at once). One batch when that is all `items` fill."""
    n = min(parallel, -(-len(items) // batch_size))
    if n <= 1:
        return [list(items)]
    batches: list[list[T]] = [[] for _ in range(n)]
    for item in items:
        batches[hash(key(item)) % n].append(item)
    return [batch for batch in batches if batch]
