import pytest

from ingest_stream.core.webhook import (
    Caller,
    FramingError,
    Refusal,
    Signed,
    TenantAuth,
    authenticate,
    first_oversized,
    foreign_tenant,
    parse_auth,
    parse_records,
    sign,
)

AUTH = {"acme": TenantAuth(token="t-acme"), "beta": TenantAuth(hmac_secret="s-beta")}
BODY = b'{"tenant": "beta", "id": "1"}'


def check(tenant, headers, body=BODY, now=1000.0):
    return authenticate(tenant, headers, body, AUTH, now_s=now, window_s=300)


def test_bearer_token_per_tenant():
    assert check("acme", {"Authorization": "Bearer t-acme"}) == Caller("acme", signed=None)
    assert check("acme", {"Authorization": "Bearer t-beta"}) is Refusal.UNAUTHORIZED
    assert check("beta", {"Authorization": "Bearer t-acme"}) is Refusal.UNAUTHORIZED  # beta has no token
    assert check("acme", {}) is Refusal.UNAUTHORIZED
    assert check("nobody", {"Authorization": "Bearer t-acme"}) is Refusal.UNAUTHORIZED
    assert check(None, {"Authorization": "Bearer t-acme"}) is Refusal.UNAUTHORIZED


def test_hmac_signature_over_timestamp_and_body_within_the_replay_window():
    signed = {"X-Signature": sign("s-beta", "1000", BODY), "X-Signature-Timestamp": "1000"}
    # A signature is good until its timestamp + the window: the replay cache keeps it that long.
    used = Caller("beta", Signed(f"beta\n{signed['X-Signature']}", expires_at_s=1300.0))
    assert check("beta", signed) == used
    assert check("beta", signed, now=1299) == used
    assert check("beta", signed, now=1300) == used
    assert check("beta", signed, now=700) == used  # a sender's clock ahead of ours, within the window
    assert check("beta", signed, now=1301) is Refusal.FORBIDDEN  # a replay, or a clock far off
    assert check("beta", signed, now=699) is Refusal.FORBIDDEN
    assert check("beta", signed, body=BODY + b" ") is Refusal.UNAUTHORIZED  # body changed
    assert check("beta", {**signed, "X-Signature-Timestamp": "1001"}) is Refusal.UNAUTHORIZED
    assert check("beta", {**signed, "X-Signature": "sha256=00"}) is Refusal.UNAUTHORIZED
    assert check("acme", signed) is Refusal.UNAUTHORIZED  # acme has no secret


@pytest.mark.parametrize("stamp", ["nan", "inf", "-inf", "soon"])
def test_a_signed_timestamp_that_is_not_a_time_is_refused(stamp):
    headers = {"X-Signature": sign("s-beta", stamp, BODY), "X-Signature-Timestamp": stamp}
    assert isinstance(check("beta", headers), Refusal)


def test_the_signatures_of_two_tenants_are_told_apart():
    auth = {"a": TenantAuth(hmac_secret="same"), "b": TenantAuth(hmac_secret="same")}
    headers = {"X-Signature": sign("same", "1000", BODY), "X-Signature-Timestamp": "1000"}
    first, second = (authenticate(t, headers, BODY, auth, now_s=1000, window_s=300) for t in "ab")
    assert isinstance(first, Caller) and isinstance(second, Caller)
    assert first.signed is not None and second.signed is not None
    assert first.signed.key != second.signed.key


def test_auth_settings_are_parsed_and_checked():
    assert parse_auth('{"a": {"token": "x"}, "b": {"hmac_secret": "y"}}') == {
        "a": TenantAuth("x", None), "b": TenantAuth(None, "y")}
    assert parse_auth("") == {}
    for bad in ("[1]", "{", '{"a": {}}', '{"a": "x"}'):
        with pytest.raises(ValueError, match=r"JSON|token"):
            parse_auth(bad)


@pytest.mark.parametrize(("body", "content_type", "count"), [
    (b'{"id": 1}', "application/json", 1),
    (b'[{"id": 1}, {"id": 2}]', "application/json", 2),
    (b'{"id": 1}\n{"id": 2}\n\n{"id": 3}\n', "application/x-ndjson", 3),
    (b'{"id": 1}\n{"id": 2}', "application/json", 2),  # JSON lines sent as JSON
])
def test_bodies_frame_records_three_ways(body, content_type, count):
    assert len(parse_records(body, content_type)) == count


@pytest.mark.parametrize(("body", "content_type", "message"), [
    (b"", "application/json", "empty"),
    (b"{nope", "application/json", "not JSON"),
    (b"[1, 2]", "application/json", "item 0 is not a JSON object"),
    (b'{"id": 1}\nnope', "application/x-ndjson", "line 2 is not JSON"),
    (b'{"id": 1}\n[1]', "application/x-ndjson", "line 2 is not a JSON object"),
])
def test_framing_errors_say_where(body, content_type, message):
    with pytest.raises(FramingError, match=message):
        parse_records(body, content_type)


def test_records_of_another_tenant_are_found():
    assert foreign_tenant([{"tenant": "a"}, {"id": 1}], "a") is None  # no tenant: the caller's
    assert foreign_tenant([{"tenant": "a"}, {"tenant": "b"}], "a") == 1


def test_the_first_message_over_the_producer_limit_is_found():
    assert first_oversized([10, 100, 101, 500], limit=100) == 2
    assert first_oversized([10, 100], limit=100) is None  # the limit itself fits
    assert first_oversized([], limit=100) is None
