import pytest

from ingest_stream.core.webhook import (
    FramingError,
    Refusal,
    TenantAuth,
    authenticate,
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
    assert check("acme", {"Authorization": "Bearer t-acme"}) is None
    assert check("acme", {"Authorization": "Bearer t-beta"}) is Refusal.UNAUTHORIZED
    assert check("beta", {"Authorization": "Bearer t-acme"}) is Refusal.UNAUTHORIZED  # beta has no token
    assert check("acme", {}) is Refusal.UNAUTHORIZED
    assert check("nobody", {"Authorization": "Bearer t-acme"}) is Refusal.UNAUTHORIZED
    assert check(None, {"Authorization": "Bearer t-acme"}) is Refusal.UNAUTHORIZED


def test_hmac_signature_over_timestamp_and_body_within_the_replay_window():
    signed = {"X-Signature": sign("s-beta", "1000", BODY), "X-Signature-Timestamp": "1000"}
    assert check("beta", signed) is None
    assert check("beta", signed, now=1299) is None
    assert check("beta", signed, now=1301) is Refusal.FORBIDDEN  # a replay, or a clock far off
    assert check("beta", signed, body=BODY + b" ") is Refusal.UNAUTHORIZED  # body changed
    assert check("beta", {**signed, "X-Signature-Timestamp": "1001"}) is Refusal.UNAUTHORIZED
    assert check("beta", {**signed, "X-Signature": "sha256=00"}) is Refusal.UNAUTHORIZED
    assert check("acme", signed) is Refusal.UNAUTHORIZED  # acme has no secret


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
