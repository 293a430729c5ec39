"""The validated (schema version 2) record and the identities derived from it."""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict, cast

import orjson

CURRENT_SCHEMA_VERSION = 2


class Link(TypedDict):
    rel: str
    to: str


class Record(TypedDict):
    """A record after validation and upcasting: always the current schema version, defaults filled."""

    schema_version: int
    tenant: str
    source: str
    id: str
    revision: int
    event_time: str
    priority: str
    kind: str
    attributes: dict[str, Any]
    links: list[Link]
    deleted: bool
    trace: NotRequired[dict[str, Any]]


def entity_key(tenant: str, record_id: str) -> str:
    """The Kafka key of an entity (`tenant:id`): one partition, so one writer, per entity."""
    return f"{tenant}:{record_id}"


def split_entity_key(key: str) -> tuple[str, str]:
    tenant, _, record_id = key.partition(":")
    return tenant, record_id


def with_defaults(record: dict[str, Any]) -> Record:
    """Fill the optional fields so equal records compare (and hash) equal however they were written."""
    record.setdefault("priority", "normal")
    record.setdefault("links", [])
    record.setdefault("deleted", False)
    return cast(Record, record)


def encode(record: Record) -> bytes:
    """Canonical JSON bytes: sorted keys, so one record always encodes to the same bytes."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_key(value: bytes) -> bytes | None:
    """The Kafka key of a raw record: `tenant:id` when it is JSON with both, else None (the
    partitioner chooses)."""
    try:
        document = orjson.loads(value)
        return entity_key(document["tenant"], document["id"]).encode()
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
