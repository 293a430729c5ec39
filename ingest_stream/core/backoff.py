"""Exponential backoff with full jitter (AWS architecture blog's "full jitter"), randomness injected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base_s: float = 0.2
    cap_s: float = 10.0
    max_attempts: int = 5  # attempts in all, the first one included

    def delay(
        self, attempt: int, *, random: Callable[[], float], retry_after_s: float | None = None
    ) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based).

        Uniform in [0, min(cap, base·2^(attempt-1))]; a server's retry-after is a floor.
        """
        ceiling = min(self.cap_s, self.base_s * (2 ** (attempt - 1)))
        delay: float = random() * ceiling
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.cap_s))
        return delay

    def exhausted(self, attempt: int) -> bool:
        return attempt >= self.max_attempts


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from an HTTP Retry-After header: delay-seconds or an HTTP date (RFC 9110);
    None when absent or unreadable. A date in the past means no wait."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())
