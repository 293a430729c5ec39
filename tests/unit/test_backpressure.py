import pytest

from ingest_stream.core.backpressure import Backpressure, Lag, State, Thresholds

T = Thresholds(throttle_lag_s=30, brownout_lag_s=120, throttle_lag_records=1000, brownout_lag_records=10_000,
               exit_ratio=0.5, cool_down_s=30, brownout_rate=0.1)


def seconds(s: float) -> Lag:
    return Lag(records=0, seconds=s)


def test_lag_in_seconds_moves_up_at_once_through_each_level():
    bp = Backpressure(T, now=0)
    assert bp.observe(1, seconds(29)) is State.NORMAL
    assert bp.observe(2, seconds(30)) is State.THROTTLED
    assert bp.since == 2
    assert bp.observe(3, seconds(120)) is State.BROWNOUT
    assert "brownout threshold" in bp.reason


def test_lag_in_records_counts_too_and_can_skip_a_level():
    bp = Backpressure(T, now=0)
    assert bp.observe(1, Lag(records=10_000, seconds=0)) is State.BROWNOUT


def test_hysteresis_steps_down_one_level_after_a_calm_cool_down():
    bp = Backpressure(T, now=0)
    bp.observe(0, seconds(200))
    assert bp.observe(10, seconds(100)) is State.BROWNOUT  # below entry, above exit (60 s)
    assert bp.observe(20, seconds(59)) is State.BROWNOUT  # calm starts
    assert bp.observe(49, seconds(59)) is State.BROWNOUT
    assert bp.observe(50, seconds(59)) is State.THROTTLED
    assert bp.observe(60, seconds(14)) is State.THROTTLED  # calm for throttled starts (exit 15 s)
    assert bp.observe(90, seconds(14)) is State.NORMAL


def test_a_lag_spike_during_the_cool_down_restarts_it():
    bp = Backpressure(T, now=0)
    bp.observe(0, seconds(40))
    bp.observe(10, seconds(10))
    bp.observe(20, seconds(20))  # above the exit threshold: calm broken
    assert bp.observe(45, seconds(10)) is State.THROTTLED
    assert bp.observe(75, seconds(10)) is State.NORMAL


def test_oscillating_around_an_entry_threshold_does_not_flap():
    bp = Backpressure(T, now=0)
    states = [bp.observe(t, seconds(31 if t % 2 else 29)) for t in range(100)]
    assert set(states[1:]) == {State.THROTTLED}


@pytest.mark.parametrize("state", [State.DRAIN, State.PAUSED, State.BROWNOUT])
def test_an_override_holds_whatever_the_lag_until_resume(state):
    bp = Backpressure(T, now=0)
    bp.override(5, state, who="ops@example")
    assert bp.observe(10, seconds(0)) is state
    assert bp.observe(500, seconds(10_000)) is state
    assert (bp.since, bp.reason, bp.overridden) == (5, "set by ops@example", True)
    bp.resume(600, who="ops@example")
    assert (bp.state, bp.overridden) == (State.NORMAL, False)
    assert bp.observe(601, seconds(40)) is State.THROTTLED  # automatic again


def test_manual_brownout_rate_applies_until_resume():
    bp = Backpressure(T, now=0)
    bp.override(0, State.BROWNOUT, who="ops", rate=0.5)
    assert bp.brownout_rate == 0.5
    bp.resume(1, who="ops")
    assert bp.brownout_rate == 0.1


def test_normal_and_throttled_cannot_be_set_by_hand_and_rates_are_checked():
    bp = Backpressure(T, now=0)
    with pytest.raises(ValueError, match="by hand"):
        bp.override(0, State.THROTTLED, who="ops")
    with pytest.raises(ValueError, match="rate"):
        bp.override(0, State.BROWNOUT, who="ops", rate=1.5)


def test_only_brownout_drops_and_only_low_priority_at_the_kept_rate():
    bp = Backpressure(T, now=0)
    assert bp.keeps("low", 0.99)
    bp.observe(0, seconds(500))
    assert bp.state is State.BROWNOUT
    assert bp.keeps("normal", 0.99) and bp.keeps("high", 0.99)
    assert bp.keeps("low", 0.05)
    assert not bp.keeps("low", 0.1)
    kept = sum(bp.keeps("low", i / 1000) for i in range(1000))
    assert kept == 100


def test_fetching_stops_in_drain_and_paused_only():
    bp = Backpressure(T, now=0)
    assert bp.fetching
    bp.override(0, State.BROWNOUT, who="ops")
    assert bp.fetching
    for state in (State.DRAIN, State.PAUSED):
        bp.override(0, state, who="ops")
        assert not bp.fetching


def test_gauge_values_are_stable():
    assert [s.gauge for s in State] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad", [
    {"throttle_lag_s": 0}, {"throttle_lag_s": 200}, {"exit_ratio": 0}, {"brownout_rate": 2},
    {"throttle_lag_records": 2_000_000},
])
def test_thresholds_are_validated(bad):
    with pytest.raises(ValueError, match=r"need|must"):
        Thresholds(**bad)
