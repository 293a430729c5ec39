"""A token bucket: at most `rate` operations per second on average, bursts up to `burst`.

Pure: the caller passes the clock reading, so tests drive time by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EPSILON = 1e-9


@dataclass
class TokenBucket:
    rate: float  # tokens added per second; must be > 0
    burst: float  # bucket size
    _tokens: float = field(init=False)
    _updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ValueError(f"rate and burst must be positive (rate={self.rate}, burst={self.burst})")
        self._tokens = self.burst

    def _refill(self, now: float) -> None:
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def take(self, now: float, tokens: float = 1.0) -> float:
        """Take `tokens`; return 0 when granted, else the seconds to wait before asking again.

        A request larger than the bucket is granted once the bucket is full, so it cannot starve.
        """
        self._refill(now)
        needed = min(tokens, self.burst)
        if self._tokens >= needed - EPSILON:  # float refills land a hair short
            self._tokens -= tokens  # may go negative for an oversized request: later callers wait
            return 0.0
        return (needed - self._tokens) / self.rate

    def reserve(self, now: float, tokens: float = 1.0) -> float:
        """Take `tokens` now, on credit if need be; return the seconds to wait before using them.

        For pacing a single producer: sleep the returned time, then go.
        """
        self._refill(now)
        self._tokens -= tokens
        return 0.0 if self._tokens >= -EPSILON else -self._tokens / self.rate
