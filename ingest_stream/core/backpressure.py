"""The backpressure state machine (contract §6): lag moves it between normal, throttled and
brownout, with hysteresis; an operator's drain, pause or brownout holds until resume.

Pure: the caller passes the clock reading and the lag; the wiring applies the state (token bucket
while throttled, dropping low-priority records in brownout, no fetching in drain and paused).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    NORMAL = "normal"
    THROTTLED = "throttled"  # the token bucket limits what the source agents take
    BROWNOUT = "brownout"  # low-priority records are sampled: only `brownout_rate` of them kept
    DRAIN = "drain"  # nothing new is fetched; in-flight work finishes
    PAUSED = "paused"  # nothing moves

    @property
    def gauge(self) -> int:
        """The value of `ingest_backpressure_state`."""
        return list(State).index(self)


AUTOMATIC = (State.NORMAL, State.THROTTLED, State.BROWNOUT)  # by level


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The backpressure policy: the lag that enters each level, how a level is left, and what
    throttled and brownout let through (settings INGEST_*_LAG_*, INGEST_BACKPRESSURE_*)."""

    throttle_lag_s: float = 30.0
    brownout_lag_s: float = 120.0
    throttle_lag_records: int = 100_000
    brownout_lag_records: int = 1_000_000
    exit_ratio: float = 0.5  # a level is left when lag is below this share of its entry threshold...
    cool_down_s: float = 30.0  # ... for this long
    brownout_rate: float = 0.1  # share of low-priority records kept in an automatic brownout
    throttle_rate: float = 1000.0  # source records per second while throttled (a token bucket)
    lag_check_interval_s: float = 5.0  # how often the worker measures lag and moves the state

    def __post_init__(self) -> None:
        if not 0 < self.throttle_lag_s <= self.brownout_lag_s:
            raise ValueError("need 0 < throttle_lag_s <= brownout_lag_s")
        if not 0 < self.throttle_lag_records <= self.brownout_lag_records:
            raise ValueError("need 0 < throttle_lag_records <= brownout_lag_records")
        if not 0 < self.exit_ratio <= 1:
            raise ValueError("exit_ratio must be in (0, 1]")
        if not 0 <= self.brownout_rate <= 1:
            raise ValueError("brownout_rate must be in [0, 1]")
        if self.throttle_rate <= 0 or self.lag_check_interval_s <= 0:
            raise ValueError("throttle_rate and lag_check_interval_s must be positive")


@dataclass(frozen=True, slots=True)
class Lag:
    records: int
    seconds: float


class Backpressure:
    def __init__(self, thresholds: Thresholds, now: float) -> None:
        self.thresholds = thresholds
        self.state = State.NORMAL
        self.since = now
        self.reason = "started"
        self.brownout_rate = thresholds.brownout_rate
        self.overridden = False  # set by an operator; only resume clears it
        self._calm_since: float | None = None  # when lag last fell below the current level's exit

    # --- automatic --------------------------------------------------------------------------
    def _level(self, lag: Lag, ratio: float) -> int:
        t = self.thresholds
        if lag.seconds >= t.brownout_lag_s * ratio or lag.records >= t.brownout_lag_records * ratio:
            return 2
        if lag.seconds >= t.throttle_lag_s * ratio or lag.records >= t.throttle_lag_records * ratio:
            return 1
        return 0

    def observe(self, now: float, lag: Lag) -> State:
        """Feed the current lag; returns the (possibly new) state."""
        if self.overridden:
            return self.state
        current = AUTOMATIC.index(self.state)
        entered = self._level(lag, 1.0)
        if entered > current:
            self._move(now, AUTOMATIC[entered], f"lag {lag.seconds:.0f}s / {lag.records} records "
                       f"reached the {AUTOMATIC[entered].value} threshold")
            return self.state
        if current and self._level(lag, self.thresholds.exit_ratio) < current:
            self._calm_since = now if self._calm_since is None else self._calm_since
            if now - self._calm_since >= self.thresholds.cool_down_s:
                lower = AUTOMATIC[current - 1]
                self._move(now, lower, f"lag {lag.seconds:.0f}s / {lag.records} records below "
                           f"{self.thresholds.exit_ratio:.0%} of the {self.state.value} threshold "
                           f"for {self.thresholds.cool_down_s:.0f}s")
        else:
            self._calm_since = None
        return self.state

    # --- operators ----------------------------------------------------------------------------
    def override(self, now: float, state: State, *, who: str, rate: float | None = None) -> None:
        """drain / paused / brownout by hand; holds until `resume`."""
        if state not in (State.DRAIN, State.PAUSED, State.BROWNOUT):
            raise ValueError(f"{state.value} cannot be set by hand (drain, paused, brownout)")
        if rate is not None:
            if not 0 <= rate <= 1:
                raise ValueError("rate must be within [0, 1]")
            self.brownout_rate = rate
        self.overridden = True
        self._move(now, state, f"set by {who}")

    def resume(self, now: float, *, who: str) -> None:
        """Back to automatic control, from normal; lag moves it again on the next observation."""
        self.overridden = False
        self.brownout_rate = self.thresholds.brownout_rate
        self._move(now, State.NORMAL, f"resumed by {who}")

    # --- what the state means for a record ----------------------------------------------------
    @property
    def fetching(self) -> bool:
        return self.state not in (State.DRAIN, State.PAUSED)

    def keeps(self, priority: str, draw: float) -> bool:
        """Whether a record passes; `draw` is uniform in [0, 1). Only brownout drops, and only
        `low` priority, keeping `brownout_rate` of them."""
        return self.state is not State.BROWNOUT or priority != "low" or draw < self.brownout_rate

    def _move(self, now: float, state: State, reason: str) -> None:
        self._calm_since = None
        if state is not self.state:
            self.state = state
            self.since = now
        self.reason = reason
