"""Token checks for the admin routes (bearer) and the read-only views (HTTP Basic): constant-time,
and no token configured means no access."""

from __future__ import annotations

import base64
import hmac


def bearer_allows(authorization: str | None, token: str | None) -> bool:
    if not token or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def basic_allows(authorization: str | None, token: str | None) -> bool:
    """HTTP Basic with `token` as the password (the user name is the caller's to choose)."""
    if not token or not authorization:
        return False
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:  # binascii.Error is one
        return False
    _, _, password = decoded.partition(b":")
    return hmac.compare_digest(password, token.encode())
