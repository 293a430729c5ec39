from ingest_stream.core.breaker import BreakerPolicy, CircuitBreaker, CircuitState

POLICY = BreakerPolicy(failure_threshold=3, failure_rate=0.5, window=10, min_calls=6, open_s=30.0)


def test_closed_allows_and_opens_after_consecutive_failures():
    breaker = CircuitBreaker(POLICY)
    assert breaker.allow(0.0)
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.state(2.0) is CircuitState.CLOSED
    breaker.record_failure(3.0)
    assert breaker.state(3.0) is CircuitState.OPEN
    assert not breaker.allow(3.5)
    assert breaker.retry_after(13.0) == 20.0


def test_a_success_resets_the_consecutive_count():
    breaker = CircuitBreaker(POLICY)
    for t in range(2):
        breaker.record_failure(float(t))
    breaker.record_success(2.0)
    breaker.record_failure(3.0)
    breaker.record_failure(4.0)
    assert breaker.state(4.0) is CircuitState.CLOSED


def test_opens_on_failure_rate_over_the_window():
    breaker = CircuitBreaker(POLICY)
    outcomes = [False, True, False, True, False, True]  # 50 % failures, never 3 in a row
    for t, failed in enumerate(outcomes):
        (breaker.record_failure if failed else breaker.record_success)(float(t))
    assert breaker.state(6.0) is CircuitState.OPEN


def test_rate_needs_min_calls():
    breaker = CircuitBreaker(POLICY)
    for t, failed in enumerate([True, False, True, False]):
        (breaker.record_failure if failed else breaker.record_success)(float(t))
    assert breaker.state(5.0) is CircuitState.CLOSED


def _opened(at: float) -> CircuitBreaker:
    breaker = CircuitBreaker(POLICY)
    for _ in range(3):
        breaker.record_failure(at)
    return breaker


def test_half_open_after_the_timeout_lets_one_probe_through():
    breaker = _opened(100.0)
    assert breaker.state(129.9) is CircuitState.OPEN
    assert breaker.state(130.0) is CircuitState.HALF_OPEN
    assert breaker.retry_after(130.0) == 0.0
    assert breaker.allow(130.0)
    assert not breaker.allow(130.1)  # the probe is out


def test_probe_success_closes():
    breaker = _opened(0.0)
    assert breaker.allow(30.0)
    breaker.record_success(30.5)
    assert breaker.state(30.5) is CircuitState.CLOSED
    assert breaker.allow(30.6)


def test_probe_failure_reopens_for_a_full_period():
    breaker = _opened(0.0)
    assert breaker.allow(30.0)
    breaker.record_failure(31.0)
    assert breaker.state(31.0) is CircuitState.OPEN
    assert breaker.state(60.9) is CircuitState.OPEN
    assert breaker.state(61.0) is CircuitState.HALF_OPEN


def test_exported_values_and_labels():
    assert [int(s) for s in CircuitState] == [0, 1, 2]
    assert CircuitState.HALF_OPEN.label == "half-open"
