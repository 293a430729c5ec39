"""Bearer-token check for the admin routes: constant-time, and no token configured means no access."""

from __future__ import annotations

import hmac


def bearer_allows(authorization: str | None, token: str | None) -> bool:
    if not token or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
