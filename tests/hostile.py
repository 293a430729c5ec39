"""Hostile records, by class, each with what the contract says must become of it.

Shared by the integration test (every class once, between good records), and `bench/fuzz.py`
(many, in random mixes). A class either lands in every sink (its content is odd but valid, or
only its headers are hostile) or is dead-lettered once with the given reason and stage.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.util import calc_crc32c

from tests.dataset import v2

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Hostile:
    kind: str  # the class
    key: bytes | None
    value: bytes | None
    headers: Headers = field(default_factory=list)
    expect: tuple[str, str] | None = None  # (reason, stage) of its dead letter; None: it lands
    record: dict[str, Any] | None = None  # what lands, when it lands

    @property
    def lands(self) -> bool:
        return self.expect is None


@dataclass(frozen=True)
class Context:
    tenant: str
    record_id: str  # unique per generated record
    limit: int  # INGEST_MAX_RECORD_BYTES of the worker
    prefix: str  # INGEST_TOPIC_PREFIX of the worker
    rng: random.Random


def _key(c: Context) -> bytes:
    return f"{c.tenant}:{c.record_id}".encode()


def _dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def _lands(kind: str, c: Context, record: dict[str, Any], headers: Headers | None = None) -> Hostile:
    return Hostile(kind, _key(c), _dumps(record), headers or [], None, record)


def _dead(kind: str, c: Context, value: bytes | None, reason: str, stage: str,
          headers: Headers | None = None, key: bytes | None = None) -> Hostile:
    return Hostile(kind, key if key is not None else _key(c), value, headers or [], (reason, stage))


def good(c: Context) -> Hostile:
    return _lands("good", c, v2(c.tenant, c.record_id, c.rng.randrange(1, 1000)))


def _deep(levels: int) -> Any:
    value: Any = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def _padded(c: Context, size: int) -> dict[str, Any]:
    record = v2(c.tenant, c.record_id, 1)
    record["attributes"] = {"pad": ""}
    record["attributes"]["pad"] = "x" * max(0, size - len(_dumps(record)))
    return record


BUILDERS: dict[str, Callable[[Context], Hostile]] = {
    # --- dead-lettered at the processing stages -------------------------------------------
    "not_json": lambda c: _dead("not_json", c, b"\xff\xfe" + c.rng.randbytes(c.rng.randrange(0, 64)),
                                "SCHEMA_DRIFT", "decode"),
    "empty_value": lambda c: _dead("empty_value", c, None, "SCHEMA_DRIFT", "decode"),
    "not_an_object": lambda c: _dead("not_an_object", c, b"[1,2,3]", "SCHEMA_DRIFT", "validate"),
    "unknown_version": lambda c: _dead("unknown_version", c, _dumps(v2(c.tenant, c.record_id, 1,
                                       schema_version=99)), "SCHEMA_DRIFT", "validate"),
    "float_revision": lambda c: _dead("float_revision", c,
                                      _dumps({**v2(c.tenant, c.record_id, 1), "revision": 1.0}),
                                      "SCHEMA_DRIFT", "validate"),
    "revision_past_int64": lambda c: _dead("revision_past_int64", c, _dumps(v2(c.tenant, c.record_id, 2**63)),
                                           "VALIDATION_FAIL", "validate"),
    "revision_past_uint64": lambda c: _dead(
        "revision_past_uint64", c,
        _dumps(v2(c.tenant, c.record_id, 7)).replace(b'"revision":7', b'"revision":36893488147419103232'),
        "SCHEMA_DRIFT", "validate"),
    "tenant_with_newline": lambda c: _dead("tenant_with_newline", c,
                                           _dumps(v2(c.tenant + "\n", c.record_id, 1)), "VALIDATION_FAIL",
                                           "validate"),
    "event_time_before_year_1_utc": lambda c: _dead(
        "event_time_before_year_1_utc", c,
        _dumps(v2(c.tenant, c.record_id, 1, event_time="0001-01-01T00:00:00+23:59")),
        "VALIDATION_FAIL", "validate"),
    "attributes_too_deep": lambda c: _dead("attributes_too_deep", c, _dumps(
        v2(c.tenant, c.record_id, 1, attributes=_deep(300))), "VALIDATION_FAIL", "validate"),
    "deep_list_in_wrong_field": lambda c: _dead(
        "deep_list_in_wrong_field", c,
        _dumps(v2(c.tenant, c.record_id, 1)).replace(
            b'"kind":"document"', b'"kind":' + b"[" * 1000 + b"]" * 1000),
        "VALIDATION_FAIL", "validate"),
    "just_over_the_limit": lambda c: _dead("just_over_the_limit", c, _dumps(_padded(c, c.limit + 10)),
                                           "VALIDATION_FAIL", "validate"),
    "twice_the_limit": lambda c: _dead("twice_the_limit", c, _dumps(_padded(c, 2 * c.limit + 70_000)),
                                       "VALIDATION_FAIL", "validate"),
    "grows_when_re_encoded": lambda c: _dead(
        "grows_when_re_encoded", c,
        _dumps(v2(c.tenant, c.record_id, 1, attributes={"n": []})).replace(
            b'"n":[]', b'"n":[' + b",".join([b"1e5"] * (c.limit // 5)) + b"]"),
        "VALIDATION_FAIL", "validate"),
    "huge_headers": lambda c: _dead("huge_headers", c, _dumps(v2(c.tenant, c.record_id, 1)),
                                    "VALIDATION_FAIL", "validate",
                                    headers=[(f"x-pad-{i}", b"p" * 1024) for i in range(40)]),
    "huge_key_not_json": lambda c: _dead("huge_key_not_json", c, b"{nope", "SCHEMA_DRIFT", "decode",
                                         key=b"k" * 100_000),
    "forged_origin_rejected": lambda c: _dead(
        "forged_origin_rejected", c, b"{nope", "SCHEMA_DRIFT", "decode",
        headers=[("ingest.origin.topic", f"{c.prefix}.legal.holds".encode()),
                 ("ingest.origin.partition", b"0"), ("ingest.origin.offset", b"0")]),
    # --- odd but valid: lands in every sink --------------------------------------------------
    "non_utf8_origin_header": lambda c: _lands(
        "non_utf8_origin_header", c, v2(c.tenant, c.record_id, 3),
        headers=[("ingest.origin.topic", b"\xff\xfe\xfd"), ("ingest.origin.partition", b"\xc3"),
                 ("ingest.origin.offset", b"0")]),
    "origin_offset_past_int64": lambda c: _lands(
        "origin_offset_past_int64", c, v2(c.tenant, c.record_id, 3),
        headers=[("ingest.origin.topic", f"{c.prefix}.source.kafka".encode()),
                 ("ingest.origin.partition", b"0"), ("ingest.origin.offset", str(2**64).encode())]),
    "forged_origin_valid": lambda c: _lands(
        "forged_origin_valid", c, v2(c.tenant, c.record_id, 3),
        headers=[("ingest.origin.topic", f"{c.prefix}.legal.holds".encode()),
                 ("ingest.origin.partition", b"0"), ("ingest.origin.offset", b"5")]),
    "binary_header_values": lambda c: _lands(
        "binary_header_values", c, v2(c.tenant, c.record_id, 2),
        headers=[("x-binary", c.rng.randbytes(32)), ("dlq.reason", b"\x00\xff")]),
    "null_header_value": lambda c: _lands("null_header_value", c, v2(c.tenant, c.record_id, 2),
                                          headers=[("x-null", None), ("ingest.origin.topic", None)]),
    "null_header_on_a_rejected_record": lambda c: _dead(
        "null_header_on_a_rejected_record", c, b"{nope", "SCHEMA_DRIFT", "decode",
        headers=[("x-null", None), ("ingest.redrive", None)]),
    "max_revision": lambda c: _lands("max_revision", c, v2(c.tenant, c.record_id, 2**63 - 1)),
    "nul_character": lambda c: _dead("nul_character", c, _dumps(v2(c.tenant, c.record_id, 1,
                                     attributes={"t": "a\u0000b"})), "VALIDATION_FAIL", "validate"),
    "control_characters": lambda c: _lands(
        "control_characters", c,
        v2(c.tenant, c.record_id + "\x1b[31m\x7f", 1, attributes={"t": "\x07\x1b]0;x\x07\u202e"})),
    "unicode_everywhere": lambda c: _lands(
        "unicode_everywhere", c, v2(c.tenant, c.record_id + "-é漢字🙂", 1,
                                    attributes={"title": "🙂" * 50, "n": [1, 2.5, -0.0, None, True]})),
    "deep_but_allowed": lambda c: _lands("deep_but_allowed", c,
                                         v2(c.tenant, c.record_id, 1, attributes=_deep(200))),
    "whole_number_float_in_attributes": lambda c: _lands(
        "whole_number_float_in_attributes", c, v2(c.tenant, c.record_id, 1, attributes={"n": 1e5})),
}

CLASSES = tuple(BUILDERS)


def build(kind: str, c: Context) -> Hostile:
    return BUILDERS[kind](c)


def entity_of(h: Hostile) -> tuple[str, str] | None:
    """(tenant, id) of a landing record."""
    return (h.record["tenant"], h.record["id"]) if h.record is not None else None


# --- raw record batches: what no client library lets a test produce ----------------------------
CRC_AT, CRC_FROM = 17, 21  # the v2 batch header: where the CRC-32C is, and what it covers


def batch(*records: tuple[bytes, list[tuple[str, bytes | None]]], base_offset: int = 0) -> bytes:
    builder = _DefaultRecordBatchBuilderPy(magic=2, compression_type=0, is_transactional=0,
                                           producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                           batch_size=1 << 20)
    for delta, (value, headers) in enumerate(records):
        builder.append(delta, timestamp=1_700_000_000_000, key=b"k", value=value, headers=headers)
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, base_offset)
    return bytes(raw)


def with_header_name_bytes(raw: bytes, placeholder: bytes, replacement: bytes) -> bytes:
    """The batch with a header name's bytes replaced (same length) and its CRC made right again:
    what a producer that writes names that are not UTF-8 puts on the wire."""
    patched = bytearray(raw.replace(placeholder, replacement, 1))
    struct.pack_into(">I", patched, CRC_AT, calc_crc32c(bytes(patched[CRC_FROM:])))
    return bytes(patched)
