import random

from ingest_stream.core.backoff import BackoffPolicy


def test_full_jitter_stays_under_the_exponential_ceiling():
    policy = BackoffPolicy(base_s=0.1, cap_s=5.0)
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(5.0, 0.1 * 2 ** (attempt - 1))
        delays = [policy.delay(attempt, random=rng.random) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range


def test_extremes_of_the_random_source():
    policy = BackoffPolicy(base_s=1.0, cap_s=8.0)
    assert policy.delay(3, random=lambda: 0.0) == 0.0
    assert policy.delay(3, random=lambda: 1.0) == 4.0
    assert policy.delay(10, random=lambda: 1.0) == 8.0


def test_retry_after_is_a_floor_capped_by_the_cap():
    policy = BackoffPolicy(base_s=0.1, cap_s=5.0)
    assert policy.delay(1, random=lambda: 0.0, retry_after_s=2.0) == 2.0
    assert policy.delay(1, random=lambda: 0.0, retry_after_s=60.0) == 5.0


def test_attempts_are_bounded():
    policy = BackoffPolicy(max_attempts=3)
    assert not policy.exhausted(2)
    assert policy.exhausted(3)


def test_retry_after_is_read_as_seconds_or_an_http_date():
    from datetime import UTC, datetime

    from ingest_stream.core.backoff import parse_retry_after

    now = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("Tue, 24 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Tue, 24 Nov 2026 11:00:00 GMT", now=now) == 0.0  # past: no wait
    assert parse_retry_after(None, now=now) is None
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("", now=now) is None
