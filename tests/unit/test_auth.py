import pytest

from ingest_stream.core.auth import bearer_allows


@pytest.mark.parametrize(("header", "token", "allowed"), [
    ("Bearer s3cret", "s3cret", True),
    ("bearer s3cret", "s3cret", True),
    ("Bearer s3cre", "s3cret", False),
    ("Bearer s3cret-and-more", "s3cret", False),
    ("Basic s3cret", "s3cret", False),
    ("s3cret", "s3cret", False),
    (None, "s3cret", False),
    ("Bearer ", "s3cret", False),
    ("Bearer anything", None, False),  # no token configured: everything refused
    ("Bearer ", "", False),
])
def test_bearer_allows(header, token, allowed):
    assert bearer_allows(header, token) is allowed
