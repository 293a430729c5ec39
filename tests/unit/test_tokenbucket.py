import pytest

from ingest_stream.core.tokenbucket import TokenBucket


def test_a_full_bucket_grants_a_burst_then_paces_at_the_rate():
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0
    assert bucket.take(0.1) == pytest.approx(0.1)


def test_idle_time_refills_only_up_to_the_burst():
    bucket = TokenBucket(rate=1, burst=2)
    bucket.take(0.0)
    bucket.take(0.0)
    granted = [bucket.take(1000.0) for _ in range(3)]
    assert granted[:2] == [0.0, 0.0]
    assert granted[2] == pytest.approx(1.0)


def test_a_request_larger_than_the_bucket_is_granted_when_full_and_repaid_after():
    bucket = TokenBucket(rate=10, burst=5)
    assert bucket.take(0.0, tokens=20) == 0.0
    assert bucket.take(0.0) == pytest.approx(1.6)  # 15 tokens of debt, then 1 more


def test_average_rate_over_a_long_run_equals_the_rate():
    bucket = TokenBucket(rate=50, burst=1)
    now, granted = 0.0, 0
    while now < 10.0:
        wait = bucket.take(now)
        if wait == 0:
            granted += 1
        else:
            now += wait
    assert granted == pytest.approx(500, abs=2)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0), (-1, 5)])
def test_rate_and_burst_must_be_positive(rate, burst):
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate=rate, burst=burst)


def test_reserve_paces_a_producer_at_the_rate():
    bucket = TokenBucket(rate=100, burst=1)
    now = 0.0
    for _ in range(1000):
        now += bucket.reserve(now)
    assert now == pytest.approx(9.99)
