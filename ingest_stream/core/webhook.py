"""Webhook requests, decided without I/O: who is calling (bearer token or HMAC signature per
tenant), whether a signature was used before (ReplayCache), how the body frames records (a JSON
object, a JSON array, or JSON lines), and whether each can be sent to Kafka at all.

Records are checked here only for framing — each must be a JSON object, of the caller's tenant;
the processing agent validates them against the schema like any other source.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

import orjson

SIGNATURE_PREFIX = "sha256="
# Signatures remembered at once. An entry lives until its window closes (at most 2 x window after
# it was used, for a timestamp ahead of the clock); 100 000 of them is ~330 signed requests a second
# sustained over the default 300 s window, in ~30 MB.
DEFAULT_REPLAY_CAPACITY = 100_000


class Refusal(IntEnum):
    UNAUTHORIZED = 401  # no or wrong credentials
    FORBIDDEN = 403  # a valid caller, not allowed this (another tenant's records, a stale signature)


@dataclass(frozen=True, slots=True)
class Signed:
    """A verified HMAC signature: good for one request until its window closes."""

    key: str  # the tenant and the signature
    expires_at_s: float  # the signature's timestamp + the window: refused as stale after that


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller; `signed` when it proved itself by signature (claim it in a
    ReplayCache), None for a bearer token."""

    tenant: str
    signed: Signed | None = None


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
                 *, now_s: float, window_s: float) -> Caller | Refusal:
    """The caller, when it is the tenant it says; else why not. Constant-time comparisons; a
    signature older or newer than the replay window is refused even when it matches (one used
    before within its window is the ReplayCache's to refuse)."""
    entry = auth.get(tenant or "")
    if tenant is None or entry is None:
        return Refusal.UNAUTHORIZED
    authorization = headers.get("Authorization", "")
    if entry.token and authorization.lower().startswith("bearer "):
        given = authorization[len("bearer "):].strip()
        if not hmac.compare_digest(given.encode(), entry.token.encode()):
            return Refusal.UNAUTHORIZED
        return Caller(tenant)
    signature, timestamp = headers.get("X-Signature"), headers.get("X-Signature-Timestamp")
    if entry.hmac_secret and signature and timestamp:
        if not hmac.compare_digest(signature.encode(), sign(entry.hmac_secret, timestamp, body).encode()):
            return Refusal.UNAUTHORIZED
        try:
            signed_at = float(timestamp)
        except ValueError:
            return Refusal.UNAUTHORIZED
        if not math.isfinite(signed_at) or abs(now_s - signed_at) > window_s:
            return Refusal.FORBIDDEN
        return Caller(tenant, Signed(f"{tenant}\n{signature}", signed_at + window_s))
    return Refusal.UNAUTHORIZED


class Claim(Enum):
    FIRST = "first"  # not used within its window: remembered now, the request goes on
    REPLAYED = "replayed"  # used before within its window: refuse (403)
    FULL = "full"  # `capacity` signatures are live: refuse for now (429), see ReplayCache


class ReplayCache:
    """The signatures used within their window, so each signs one request only.

    Bounded: at most `capacity` live signatures; one leaves when its window closes (the
    authentication refuses it as stale from then on). When full, a new signature is refused
    (FULL) until the oldest leaves; none is evicted early, since an evicted signature could be
    replayed for the rest of its window. A signature whose request was not accepted is released,
    so the sender can send the same request again."""

    def __init__(self, capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (expires_at_s, key), stale ones skipped lazily

    def __len__(self) -> int:
        return len(self._expiry)

    def claim(self, signed: Signed, *, now_s: float) -> Claim:
        self._expire(now_s)
        if signed.key in self._expiry:
            return Claim.REPLAYED
        if len(self._expiry) >= self.capacity:
            return Claim.FULL
        self._expiry[signed.key] = signed.expires_at_s
        heapq.heappush(self._heap, (signed.expires_at_s, signed.key))
        if len(self._heap) > 2 * self.capacity:  # released entries: bound the heap too
            self._heap = [(expiry, key) for key, expiry in self._expiry.items()]
            heapq.heapify(self._heap)
        return Claim.FIRST

    def release(self, signed: Signed) -> None:
        """Forget a claimed signature whose request was not accepted."""
        if self._expiry.get(signed.key) == signed.expires_at_s:
            del self._expiry[signed.key]

    def retry_after_s(self, *, now_s: float) -> float:
        """Seconds until the oldest live signature leaves (0 when there is room)."""
        self._expire(now_s)
        if len(self._expiry) < self.capacity:
            return 0.0
        return max(0.0, self._heap[0][0] - now_s)

    def _expire(self, now_s: float) -> None:
        """Drop signatures whose window closed, and stale heap entries on top."""
        heap = self._heap
        while heap:
            expires_at_s, key = heap[0]
            live = self._expiry.get(key) == expires_at_s
            if live and expires_at_s >= now_s:
                return
            heapq.heappop(heap)
            if live:
                del self._expiry[key]


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


def first_oversized(sizes: Iterable[int], limit: int) -> int | None:
    """The index of the first message larger than the producer's limit: it can never be sent."""
    return next((n for n, size in enumerate(sizes) if size > limit), None)
