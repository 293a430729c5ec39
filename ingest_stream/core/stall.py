"""Stall detection: a partition that is behind and whose progress has not moved for too long.

Behind means records wait beyond what was processed, or processed (acked) records were never
committed. Both have been seen here with Faust: a partition no longer fetched after a rebalance,
and a committer stuck behind a gap while every record had been acked. The worker cannot fix either
from inside, but it can notice and exit so an orchestrator restarts it (un-acked or uncommitted
records are then simply processed again). A partition whose sink is deliberately holding (circuit
open, retrying) is busy, not stalled.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Progress:
    committed: int | None  # next offset to read, as committed by this worker
    acked: int | None  # one past the highest offset this worker's agents acked
    end: int  # the partition's end offset

    @property
    def behind(self) -> bool:
        done = max(o for o in (self.committed, self.acked, 0) if o is not None)
        uncommitted = self.acked is not None and (self.committed is None or self.acked > self.committed)
        return self.end > done or uncommitted

    @property
    def mark(self) -> int | None:
        """What must move for progress: the commit once there is one. Acks alone are not enough:
        a partition whose commit is stuck behind a record that is never acked keeps acking the
        records after it, and would never count as stalled."""
        return self.committed if self.committed is not None else self.acked


@dataclass
class StallDetector:
    timeout_s: float
    _since: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    waiting: dict[str, float] = field(default_factory=dict)  # behind, not busy: seconds without progress

    def observe(self, now: float, progress: Mapping[str, Progress], busy: Collection[str] = ()) -> list[str]:
        """The keys stalled at `now`: behind, not busy, and no progress for `timeout_s`."""
        stalled: list[str] = []
        self.waiting = {}
        for key, state in progress.items():
            mark = state.mark
            previous = self._since.get(key)
            if not state.behind or key in busy or previous is None or previous[0] != mark:
                self._since[key] = (mark, now)
                if state.behind and key not in busy:
                    self.waiting[key] = 0.0
                continue
            self.waiting[key] = now - previous[1]
            if now - previous[1] >= self.timeout_s:
                stalled.append(key)
        for gone in set(self._since) - set(progress):
            del self._since[gone]
        return sorted(stalled)
