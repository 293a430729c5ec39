"""The webhook's replay cache: a signature signs one request within its window, in bounded memory."""

import pytest

from ingest_stream.core.webhook import Caller, Claim, ReplayCache, Signed, TenantAuth, authenticate, sign

WINDOW = 300.0


def signed(key: str, expires_at_s: float = 1300.0) -> Signed:
    return Signed(key, expires_at_s)


def test_a_signature_is_good_for_one_request():
    cache = ReplayCache(capacity=10)
    assert cache.claim(signed("a"), now_s=1000) is Claim.FIRST
    assert cache.claim(signed("a"), now_s=1001) is Claim.REPLAYED
    assert cache.claim(signed("a"), now_s=1300) is Claim.REPLAYED  # the last second of its window
    assert cache.claim(signed("b"), now_s=1001) is Claim.FIRST
    assert len(cache) == 2


def test_a_signature_leaves_when_its_window_closes():
    cache = ReplayCache(capacity=10)
    cache.claim(signed("a", expires_at_s=1300), now_s=1000)
    cache.claim(signed("b", expires_at_s=1500), now_s=1000)
    cache.claim(signed("c", expires_at_s=1200), now_s=1000)  # out of order: its timestamp is older
    assert cache.claim(signed("d", expires_at_s=1600), now_s=1250) is Claim.FIRST
    assert len(cache) == 3  # c left; a, b and d stay
    assert cache.claim(signed("x", expires_at_s=1700), now_s=1400) is Claim.FIRST
    assert len(cache) == 3  # a left too


def test_when_full_new_signatures_are_refused_until_the_oldest_leaves_and_none_is_evicted():
    cache = ReplayCache(capacity=2)
    assert cache.claim(signed("a", expires_at_s=1300), now_s=1000) is Claim.FIRST
    assert cache.claim(signed("b", expires_at_s=1250), now_s=1000) is Claim.FIRST
    assert cache.claim(signed("c"), now_s=1010) is Claim.FULL
    assert cache.retry_after_s(now_s=1010) == 240.0  # b leaves first
    # Refusing did not make room: both signatures are still refused as replays.
    assert cache.claim(signed("a", expires_at_s=1300), now_s=1010) is Claim.REPLAYED
    assert cache.claim(signed("b", expires_at_s=1250), now_s=1010) is Claim.REPLAYED
    assert cache.claim(signed("c"), now_s=1251) is Claim.FIRST
    assert cache.retry_after_s(now_s=1251) == 49.0
    assert len(cache) == 2


def test_there_is_no_wait_while_there_is_room():
    cache = ReplayCache(capacity=2)
    assert cache.retry_after_s(now_s=1000) == 0.0
    cache.claim(signed("a"), now_s=1000)
    assert cache.retry_after_s(now_s=1000) == 0.0


def test_a_released_signature_may_be_sent_again_and_frees_its_place():
    cache = ReplayCache(capacity=1)
    cache.claim(signed("a"), now_s=1000)
    cache.release(signed("a"))  # its request was not accepted (503, 429, ...)
    assert len(cache) == 0
    assert cache.claim(signed("b"), now_s=1001) is Claim.FIRST
    assert cache.claim(signed("a"), now_s=1002) is Claim.FULL
    cache.release(signed("b"))
    assert cache.claim(signed("a"), now_s=1002) is Claim.FIRST


def test_releasing_what_is_not_held_changes_nothing():
    cache = ReplayCache(capacity=2)
    cache.release(signed("a"))
    cache.claim(signed("a", expires_at_s=1300), now_s=1000)
    cache.release(signed("a", expires_at_s=9999))  # not the entry held
    assert cache.claim(signed("a", expires_at_s=1300), now_s=1001) is Claim.REPLAYED


def test_claims_and_releases_without_end_stay_bounded():
    cache = ReplayCache(capacity=4)
    for n in range(10_000):  # a sender retrying through a long Kafka outage, each time refused
        one = signed(f"s{n}", expires_at_s=1300 + n)
        assert cache.claim(one, now_s=1000) is Claim.FIRST
        cache.release(one)
    assert len(cache) == 0
    assert len(cache._heap) <= 2 * cache.capacity + 1
    assert cache.claim(signed("s0", expires_at_s=1300), now_s=1000) is Claim.FIRST


def test_capacity_must_hold_one():
    with pytest.raises(ValueError, match="capacity"):
        ReplayCache(capacity=0)


def test_a_replayed_webhook_request_is_caught_from_its_headers():
    """Authentication and the cache together: the same signed request twice, then re-signed."""
    auth = {"beta": TenantAuth(hmac_secret="s-beta")}
    body = b'{"id": "1"}'
    cache = ReplayCache(capacity=10)

    def send(stamp: str, now_s: float) -> Claim:
        headers = {"X-Signature": sign("s-beta", stamp, body), "X-Signature-Timestamp": stamp}
        caller = authenticate("beta", headers, body, auth, now_s=now_s, window_s=WINDOW)
        assert isinstance(caller, Caller) and caller.signed is not None
        return cache.claim(caller.signed, now_s=now_s)

    assert send("1000", now_s=1000) is Claim.FIRST
    assert send("1000", now_s=1299) is Claim.REPLAYED
    assert send("1001", now_s=1001) is Claim.FIRST  # the same body, signed again: a new request
