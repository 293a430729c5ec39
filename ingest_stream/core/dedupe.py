"""Exact-duplicate detection: a SHA-256 key per record and the rule for a key already seen.

The table remembers where a key was first seen (source partition and offset). A record that comes
back from the *same* position is a redelivery after a crash, not a duplicate: it must be processed
again, or a crash between "key stored" and "offset committed" would lose it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum


def dedupe_key(encoded: bytes) -> str:
    """SHA-256 of the record's canonical JSON (`record.encode`: current version, defaults filled)."""
    return hashlib.sha256(encoded).hexdigest()


@dataclass(frozen=True, slots=True)
class SeenEntry:
    partition: int
    offset: int
    first_seen_ms: int

    def encode(self) -> str:
        return f"{self.partition}:{self.offset}:{self.first_seen_ms}"

    @classmethod
    def decode(cls, text: str) -> SeenEntry:
        partition, offset, first_seen_ms = (int(part) for part in text.split(":"))
        return cls(partition, offset, first_seen_ms)

    def expired(self, now_ms: int, ttl_ms: int) -> bool:
        return now_ms - self.first_seen_ms >= ttl_ms


class DedupeDecision(StrEnum):
    NEW = "new"  # process, and remember the key
    REDELIVERY = "redelivery"  # the same source record again: process, the key stays
    DUPLICATE = "duplicate"  # the same content from another position: drop, count


def decide(
    seen: SeenEntry | None, *, partition: int, offset: int, now_ms: int, ttl_ms: int
) -> DedupeDecision:
    if seen is None or seen.expired(now_ms, ttl_ms):
        return DedupeDecision.NEW
    if seen.partition == partition and seen.offset == offset:
        return DedupeDecision.REDELIVERY
    return DedupeDecision.DUPLICATE
