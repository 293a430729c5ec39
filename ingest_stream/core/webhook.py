"""Webhook requests, decided without I/O: who is calling (bearer token or HMAC signature per
tenant), and how the body frames records (a JSON object, a JSON array, or JSON lines).

Records are checked here only for framing — each must be a JSON object, of the caller's tenant;
the processing agent validates them against the schema like any other source.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

SIGNATURE_PREFIX = "sha256="


class Refusal(IntEnum):
    UNAUTHORIZED = 401  # no or wrong credentials
    FORBIDDEN = 403  # a valid caller, not allowed this (another tenant's records, a stale signature)


@dataclass(frozen=True, slots=True)
class TenantAuth:
    token: str | None = None
    hmac_secret: str | None = None


def parse_auth(raw: str) -> dict[str, TenantAuth]:
    """`INGEST_WEBHOOK_AUTH`: {"tenant": {"token": "…"} or {"hmac_secret": "…"}, …}."""
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError("a JSON object of tenant -> {token | hmac_secret}")
    auth = {}
    for tenant, entry in data.items():
        if not isinstance(entry, dict) or not (entry.get("token") or entry.get("hmac_secret")):
            raise ValueError(f"tenant {tenant!r}: give a token or an hmac_secret")
        auth[tenant] = TenantAuth(entry.get("token"), entry.get("hmac_secret"))
    return auth


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature a sender puts in X-Signature: HMAC-SHA256 over `timestamp.body`."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def authenticate(tenant: str | None, headers: Mapping[str, str], body: bytes, auth: Mapping[str, TenantAuth],
                 *, now_s: float, window_s: float) -> Refusal | None:
    """None when the caller is the tenant it says; else why not. Constant-time comparisons; a
    signature older or newer than the replay window is refused even when it matches."""
    entry = auth.get(tenant or "")
    if entry is None:
        return Refusal.UNAUTHORIZED
    authorization = headers.get("Authorization", "")
    if entry.token and authorization.lower().startswith("bearer "):
        given = authorization[len("bearer "):].strip()
        return None if hmac.compare_digest(given.encode(), entry.token.encode()) else Refusal.UNAUTHORIZED
    signature, timestamp = headers.get("X-Signature"), headers.get("X-Signature-Timestamp")
    if entry.hmac_secret and signature and timestamp:
        if not hmac.compare_digest(signature.encode(), sign(entry.hmac_secret, timestamp, body).encode()):
            return Refusal.UNAUTHORIZED
        try:
            age = abs(now_s - float(timestamp))
        except ValueError:
            return Refusal.UNAUTHORIZED
        return None if age <= window_s else Refusal.FORBIDDEN
    return Refusal.UNAUTHORIZED


class FramingError(ValueError):
    """The body is not records; the message says where."""


def parse_records(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """A JSON object, a JSON array of objects, or JSON lines (application/x-ndjson, or any body
    that is not one JSON document)."""
    text = body.strip()
    if not text:
        raise FramingError("empty body")
    jsonl = "ndjson" in content_type or "jsonl" in content_type
    if not jsonl:
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError:
            jsonl = b"\n" in text  # several documents, one a line
            if not jsonl:
                raise FramingError("body is not JSON") from None
        else:
            items = document if isinstance(document, list) else [document]
            return [_object(item, f"item {n}") for n, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(_object(orjson.loads(line), f"line {number}"))
        except orjson.JSONDecodeError:
            raise FramingError(f"line {number} is not JSON") from None
    return records


def _object(item: object, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise FramingError(f"{where} is not a JSON object")
    return item


def foreign_tenant(records: list[dict[str, Any]], tenant: str) -> int | None:
    """The index of the first record naming another tenant, if any."""
    return next((n for n, r in enumerate(records) if r.get("tenant", tenant) != tenant), None)
