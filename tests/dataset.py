"""The mixed test dataset of issue 1 and an independent model of what the pipeline must make of it.

The model is written from the contract, not from the product's code: records of one entity are
applied in production order; a higher revision replaces, an equal one is a no-op, a lower one is
rejected by every sink as OLDER_REVISION; exact re-sends are dropped; bad records are rejected with
the reason and stage the contract gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SINKS = ("postgres", "neo4j", "typesense")


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    rejected: tuple[str, str] | None = None  # (reason, stage) at the processing stage
    duplicate: bool = False


@dataclass
class Entity:
    revision: int
    deleted: bool
    kind: str
    attributes: dict[str, Any]
    links: list[dict[str, str]]


@dataclass
class Dataset:
    tenants: tuple[str, ...]
    messages: list[Message] = field(default_factory=list)
    # expected DLQ entries: (message index, reason, stage)
    dlq: list[tuple[int, str, str]] = field(default_factory=list)
    final: dict[tuple[str, str], Entity] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return sum(m.duplicate for m in self.messages)

    def add_record(self, record: dict[str, Any], *, legacy: bool = False) -> None:
        """A well-formed record: model the sinks' revision guard."""
        index = len(self.messages)
        value = json.dumps(record).encode()
        self.messages.append(Message(f"{record['tenant']}:{record['id']}".encode(), value))
        revision = record["rev"] if legacy else record["revision"]
        entity_id = (record["tenant"], record["id"])
        held = self.final.get(entity_id)
        if held is None or revision > held.revision:
            self.final[entity_id] = Entity(
                revision=revision,
                deleted=bool(record.get("deleted", False)),
                kind="record" if legacy else record["kind"],
                attributes=record["data"] if legacy else record["attributes"],
                links=[] if legacy else list(record.get("links", [])),
            )
        elif revision < held.revision:
            self.dlq.extend((index, "OLDER_REVISION", f"sink.{sink}") for sink in SINKS)

    def resend(self, index: int) -> None:
        """The exact bytes of an earlier message again: a duplicate, dropped silently."""
        original = self.messages[index]
        self.messages.append(Message(original.key, original.value, duplicate=True))

    def add_bad(self, value: bytes, reason: str, stage: str, key: bytes | None = None) -> None:
        index = len(self.messages)
        self.messages.append(Message(key, value, rejected=(reason, stage)))
        self.dlq.append((index, reason, stage))


def v2(tenant: str, record_id: str, revision: int, **overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "schema_version": 2,
        "tenant": tenant,
        "source": "kafka",
        "id": record_id,
        "revision": revision,
        "event_time": f"2025-01-01T00:{revision % 60:02d}:00Z",
        "priority": "normal",
        "kind": "document",
        "attributes": {"title": f"{record_id} revision {revision}", "body": "quarterly report"},
    }
    record.update(overrides)
    return record


def mixed_dataset(prefix: str, *, max_record_bytes: int, entities: int = 30) -> Dataset:
    acme, globex = f"{prefix}-acme", f"{prefix}-globex"
    data = Dataset(tenants=(acme, globex))
    valid_indexes: list[int] = []

    # Valid v2 records: entity i gets revisions 0..i%4, in order; some link to a neighbour.
    for tenant in (acme, globex):
        for i in range(entities):
            for revision in range(i % 4 + 1):
                links = [{"rel": "CITES", "to": f"doc-{(i + 1) % entities}"}] if i % 3 == 0 else []
                valid_indexes.append(len(data.messages))
                data.add_record(v2(tenant, f"doc-{i}", revision, links=links))
    # An id that needs escaping in a Typesense document id.
    data.add_record(v2(acme, "odd/id with spaces,and:colons", 0))

    # Legacy version 1 producers.
    for j in range(5):
        for rev in (0, 1):
            data.add_record({"tenant": acme, "source": "kafka", "id": f"legacy-{j}", "rev": rev,
                             "ts": "2024-12-31T23:59:59Z", "data": {"title": f"legacy {j}.{rev}"}},
                            legacy=True)

    # Out-of-order older revisions: a different body, so they are not exact duplicates.
    older = [i for i in range(entities) if i % 4 >= 2][:8]
    for i in older:
        data.add_record(v2(acme, f"doc-{i}", 1, attributes={"title": "stale", "body": "late"}))

    # Tombstones, then an older revision of some of the deleted entities.
    for i in range(6):
        top = i % 4
        data.add_record(v2(globex, f"doc-{i}", top + 1, deleted=True, attributes={}))
    for i in range(3):
        data.add_record(v2(globex, f"doc-{i}", i % 4, attributes={"title": "zombie"}))

    # Exact duplicates of earlier valid records.
    for index in valid_indexes[::9][:12]:
        data.resend(index)

    # Malformed input.
    drift, invalid = "SCHEMA_DRIFT", "VALIDATION_FAIL"
    data.add_bad(b"not json at all", drift, "decode")
    data.add_bad(b'{"tenant": "acme"', drift, "decode")
    data.add_bad(b"\xff\xfe\x00", drift, "decode")
    data.add_bad(b"[1, 2, 3]", drift, "validate")
    no_kind = v2(acme, "no-kind", 0)
    del no_kind["kind"]
    data.add_bad(json.dumps(no_kind).encode(), drift, "validate", key=f"{acme}:no-kind".encode())
    no_revision = v2(acme, "no-revision", 0)
    del no_revision["revision"]
    data.add_bad(json.dumps(no_revision).encode(), drift, "validate")
    data.add_bad(json.dumps(v2(acme, "extra", 0, colour="blue")).encode(), drift, "validate")
    data.add_bad(json.dumps({**v2(acme, "str-rev", 0), "revision": "7"}).encode(), drift, "validate")
    data.add_bad(json.dumps(v2(acme, "v9", 0, schema_version=9)).encode(), drift, "validate")
    data.add_bad(json.dumps(v2("Acme Corp", "bad-tenant", 0)).encode(), invalid, "validate")
    data.add_bad(json.dumps(v2(acme, "neg", -1)).encode(), invalid, "validate")
    data.add_bad(json.dumps(v2(acme, "month13", 0, event_time="2025-13-45T00:00:00Z")).encode(),
                 invalid, "validate")
    data.add_bad(json.dumps(v2(acme, "yesterday", 0, event_time="yesterday")).encode(), invalid, "validate")
    data.add_bad(json.dumps(v2(acme, "urgent", 0, priority="urgent")).encode(), invalid, "validate")
    big = v2(acme, "oversized", 0, attributes={"body": "x" * (max_record_bytes + 1000)})
    data.add_bad(json.dumps(big).encode(), invalid, "validate", key=f"{acme}:oversized".encode())
    legacy_bad = {"tenant": acme, "source": "kafka", "id": "legacy-bad", "rev": 0, "ts": "2024-12-31"}
    data.add_bad(json.dumps(legacy_bad).encode(), drift, "validate")  # v1 without `data`
    return data


def with_bulk_tenant(data: Dataset, tenant: str, *, revisions: int, entities: int = 1500) -> Dataset:
    """Add a tenant whose entities each get `revisions` revisions in order, linked in a chain:
    enough records that a worker is still busy when a test kills it."""
    data.tenants = (*data.tenants, tenant)
    for revision in range(revisions):
        for entity in range(entities):
            links = [{"rel": "NEXT", "to": f"e-{entity + 1}"}]
            data.add_record(v2(tenant, f"e-{entity}", revision, links=links))
    return data
