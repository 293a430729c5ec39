"""A circuit breaker per sink: stop calling a sink that keeps failing, probe it again later.

closed → open after `failure_threshold` consecutive failures, or when at least `min_calls` of the
last `window` calls were made and `failure_rate` of them failed; open → half-open after `open_s`;
half-open lets `half_open_calls` probes through: a success closes the circuit, a failure re-opens it.

A small pure module rather than a library: the ones on PyPI (pybreaker, aiobreaker) read the clock
themselves and wrap the call, while the sink wrapper needs to ask "may I call now?", record the
outcome of a call it makes (retries, timeouts and all) and be tested with a fake clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum


class CircuitState(IntEnum):
    """Values are what `ingest_circuit_state` exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_threshold: int = 5
    failure_rate: float = 0.5
    window: int = 20
    min_calls: int | None = None  # None: half the window
    open_s: float = 30.0
    half_open_calls: int = 1


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy = BreakerPolicy()) -> None:
        self.policy = policy
        self._state = CircuitState.CLOSED
        self._opened_at = 0.0
        self._consecutive_failures = 0
        self._recent: deque[bool] = deque(maxlen=policy.window)  # True = failure
        self._probes = 0

    def state(self, now: float) -> CircuitState:
        if self._state is CircuitState.OPEN and now - self._opened_at >= self.policy.open_s:
            self._state = CircuitState.HALF_OPEN
            self._probes = 0
        return self._state

    def allow(self, now: float) -> bool:
        """Whether a call may be made now (a half-open circuit counts the probe)."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and self._probes < self.policy.half_open_calls:
            self._probes += 1
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self.state(now) is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.open_s - now)

    def record_success(self, now: float) -> None:
        self._consecutive_failures = 0
        self._recent.append(False)
        if self.state(now) is not CircuitState.CLOSED:
            self._close()

    def record_failure(self, now: float) -> None:
        self._consecutive_failures += 1
        self._recent.append(True)
        state = self.state(now)
        if state is CircuitState.HALF_OPEN or (state is CircuitState.CLOSED and self._should_open()):
            self._state = CircuitState.OPEN
            self._opened_at = now

    def _should_open(self) -> bool:
        if self._consecutive_failures >= self.policy.failure_threshold:
            return True
        calls = len(self._recent)
        min_calls = self.policy.window // 2 if self.policy.min_calls is None else self.policy.min_calls
        return calls >= min_calls and sum(self._recent) / calls >= self.policy.failure_rate

    def _close(self) -> None:
        self._state = CircuitState.CLOSED
        self._consecutive_failures = 0
        self._recent.clear()
        self._probes = 0
