"""Stall detection: partitions with records waiting whose position has not moved for too long.

Faust agents are known to stop silently (a partition no longer fetched, a stream that never wakes);
the worker cannot fix that from inside, but it can notice and exit so an orchestrator restarts it.
A partition whose sink is deliberately holding (circuit open, retrying) is busy, not stalled.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


@dataclass
class StallDetector:
    timeout_s: float
    _last_move: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (position, since)

    def observe(self, now: float, positions: Mapping[str, tuple[int, int]],
                busy: Collection[str] = ()) -> list[str]:
        """`positions`: key -> (processed position, end offset). The keys stalled at `now`."""
        stalled: list[str] = []
        for key, (position, end) in positions.items():
            previous = self._last_move.get(key)
            if end <= position or key in busy or previous is None or previous[0] != position:
                self._last_move[key] = (position, now)
            elif now - previous[1] >= self.timeout_s:
                stalled.append(key)
        for gone in set(self._last_move) - set(positions):
            del self._last_move[gone]
        return sorted(stalled)
