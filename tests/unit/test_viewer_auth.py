"""The read-only views' access: HTTP Basic with INGEST_VIEWER_TOKEN as the password, what
/health/detailed hides from callers without it, and the `?minutes=` they take."""

import base64
import copy

import pytest

from ingest_stream.core.auth import basic_allows, bearer_allows
from ingest_stream.stream.views import HIDDEN, query_minutes, redacted

TOKEN = "s3cret"


def basic(credentials: str, scheme: str = "Basic") -> str:
    return f"{scheme} {base64.b64encode(credentials.encode()).decode()}"


# --- basic_allows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "", "ops team", "jürgen", "viewer@example.com"])
def test_the_token_as_password_is_allowed_whatever_the_user_name(user):
    assert basic_allows(basic(f"{user}:{TOKEN}"), TOKEN) is True


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_the_basic_scheme_is_case_insensitive(scheme):
    assert basic_allows(basic(f"alice:{TOKEN}", scheme), TOKEN) is True


def test_a_password_with_colons_is_read_whole():
    assert basic_allows(basic("alice:pa:ss"), "pa:ss") is True
    assert basic_allows(basic("alice:pa:ss"), "ss") is False


def test_padded_credentials_are_read():
    assert basic_allows("Basic YTpzM2NyZXQ=", TOKEN) is True  # "a:s3cret"


def test_spaces_around_the_credentials_are_ignored():
    assert basic_allows(f"Basic   {base64.b64encode(f'u:{TOKEN}'.encode()).decode()}  ", TOKEN) is True


@pytest.mark.parametrize(("header", "token"), [
    (basic("alice:wrong"), TOKEN),
    (basic("alice:s3cre"), TOKEN),  # a prefix of the token
    (basic("alice:s3cret-and-more"), TOKEN),
    (basic("alice:S3CRET"), TOKEN),
    (basic(f"{TOKEN}:"), TOKEN),  # the token as user name, no password
    (basic(TOKEN), TOKEN),  # no colon in the credentials: no password
    (None, TOKEN),  # no Authorization header
    ("", TOKEN),
    (basic(f"alice:{TOKEN}"), None),  # no token configured: everything refused
    (basic("alice:"), ""),
    (basic(f"alice:{TOKEN}"), ""),
    (f"Bearer {TOKEN}", TOKEN),  # the admin scheme is not the viewers'
    (basic(f"alice:{TOKEN}", "Bearer"), TOKEN),
    (basic(f"alice:{TOKEN}", "Digest"), TOKEN),
    (base64.b64encode(f"alice:{TOKEN}".encode()).decode(), TOKEN),  # no scheme
    ("Basic", TOKEN),
    ("Basic ", TOKEN),
    ("Basic !!!not-base64!!!", TOKEN),
    ("Basic YTpzM2NyZXQ", TOKEN),  # "a:s3cret" with its padding missing
    ("Basic YTpzM2NyZXQ=\x00", TOKEN),
    ("Basic é", TOKEN),  # not ASCII
])
def test_anything_else_is_refused(header, token):
    assert basic_allows(header, token) is False


def test_bearer_tokens_are_checked_as_before():
    assert bearer_allows(f"Bearer {TOKEN}", TOKEN) is True
    assert bearer_allows(basic(f"alice:{TOKEN}"), TOKEN) is False


# --- redacted ----------------------------------------------------------------------------------------


DETAIL = {
    "status": "degraded",
    "tenant": "acme",
    "error": "boom for acme",
    "sinks": {
        "typesense": {"circuit": "open", "consecutive_failures": 3, "last_success_at": None,
                      "last_error": {"reason": "timeout", "error": "tenant acme: read timed out",
                                     "at": "2027-01-15T08:00:00.000Z"}},
        "postgres": {"circuit": "closed", "last_error": None},
    },
    "adapters": {"s3-main": {"kind": "s3", "last_error": "acme/bucket: access denied", "lag_records": 4}},
    "stalls": [{"tenant": "beta", "error": None, "seconds": 2.5},
               {"tenant": None, "nested": [{"error": {"code": 1}}]}],
    "dlq": {"since_start_by_reason": {"validation": 2}},
    "numbers": [1, 2.5, None, True, "text"],
}


def test_tenants_and_errors_are_hidden_at_any_depth_and_in_lists():
    assert redacted(DETAIL) == {
        "status": "degraded",
        "tenant": HIDDEN,
        "error": HIDDEN,
        "sinks": {
            "typesense": {"circuit": "open", "consecutive_failures": 3, "last_success_at": None,
                          "last_error": {"reason": "timeout", "error": HIDDEN,
                                         "at": "2027-01-15T08:00:00.000Z"}},
            "postgres": {"circuit": "closed", "last_error": None},
        },
        "adapters": {"s3-main": {"kind": "s3", "last_error": HIDDEN, "lag_records": 4}},
        "stalls": [{"tenant": HIDDEN, "error": None, "seconds": 2.5},
                   {"tenant": None, "nested": [{"error": HIDDEN}]}],
        "dlq": {"since_start_by_reason": {"validation": 2}},
        "numbers": [1, 2.5, None, True, "text"],
    }
    assert HIDDEN == "hidden"


def test_redacting_leaves_the_detail_itself_untouched():
    original = copy.deepcopy(DETAIL)
    redacted(DETAIL)
    assert original == DETAIL


@pytest.mark.parametrize("value", ["text", 3, None, [1, "a"], []])
def test_values_that_are_not_dicts_pass_through(value):
    assert redacted(value) == value


# --- query_minutes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "minutes"), [
    ({}, 60),
    ({"minutes": "1"}, 1),
    ({"minutes": "60"}, 60),
    ({"minutes": "05"}, 5),
    ({"tenant": "acme"}, 60),
])
def test_minutes_default_to_the_hour_and_take_1_to_60(query, minutes):
    assert query_minutes(query) == minutes


@pytest.mark.parametrize("raw", ["0", "61", "-1", "abc", "1.5", "", " 5", "1e1", "+5"])
def test_other_minutes_are_refused_with_a_reason_naming_minutes(raw):
    with pytest.raises(ValueError, match="minutes must be a whole number from 1 to 60"):
        query_minutes({"minutes": raw})


@pytest.mark.parametrize("raw", ["²", "1²"])
def test_unicode_digits_int_cannot_read_are_refused_with_a_reason_naming_minutes(raw):
    # str.isdigit() is true for superscripts, which int() cannot read
    with pytest.raises(ValueError, match="minutes must be a whole number from 1 to 60"):
        query_minutes({"minutes": raw})
