"""Decode, validate and upcast one raw input record.

jsonschema is the reference and classifies every rejection; a fastjsonschema function compiled from
the same schema file only answers "valid?" on the happy path (about 25x faster). Both use the same
`date-time` checker, and a test holds them to the same verdict on every test record.

SCHEMA_DRIFT means the shape is wrong (not JSON, not an object, unknown version, a required field
missing, an unexpected field, a wrong JSON type); VALIDATION_FAIL means a value is wrong (pattern,
enum, range, format, length, record size).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastjsonschema
import orjson
from jsonschema import Draft7Validator, FormatChecker, ValidationError

from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.record import Record, with_defaults
from ingest_stream.core.timefmt import is_rfc3339
from ingest_stream.core.transformers import UPCASTERS, Upcaster

LEGACY_VERSION = 1  # records without `schema_version` are version 1
SCHEMA_VERSION_KEY = "x-schema-version"
# Keywords whose failure means the record has the wrong shape; every other keyword judges a value.
_SHAPE_KEYWORDS = frozenset({"type", "required", "additionalProperties", "const"})
_MESSAGE_LIMIT = 300


@dataclass(frozen=True, slots=True)
class Accepted:
    record: Record
    version: int  # the version the producer wrote, before upcasting


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    stage: Stage
    error: str
    identity: Mapping[str, str] = field(default_factory=dict)  # tenant / source / id when readable


Verdict = Accepted | Rejected


def load_schemas(directory: Path) -> dict[int, dict[str, Any]]:
    """Every `input*.schema.json` in the directory, by the version it declares."""
    schemas: dict[int, dict[str, Any]] = {}
    for path in sorted(directory.glob("input*.schema.json")):
        schema = json.loads(path.read_text())
        version = schema.get(SCHEMA_VERSION_KEY)
        if not isinstance(version, int) or version in schemas:
            raise ValueError(f"{path}: missing or duplicate {SCHEMA_VERSION_KEY!r}")
        schemas[version] = schema
    if not schemas:
        raise ValueError(f"no input*.schema.json in {directory}")
    return schemas


class _VersionValidator:
    """One schema version: the compiled fast check and the reference validator."""

    def __init__(self, schema: dict[str, Any]) -> None:
        checker = FormatChecker(formats=())
        checker.checks("date-time")(is_rfc3339)
        self.reference = Draft7Validator(schema, format_checker=checker)
        self.fast: Callable[[Any], Any] = fastjsonschema.compile(
            schema, formats={"date-time": is_rfc3339}
        )

    def fast_valid(self, document: Any) -> bool:
        try:
            self.fast(document)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    def reference_errors(self, document: Any) -> list[ValidationError]:
        return sorted(self.reference.iter_errors(document), key=lambda e: list(e.absolute_path))


class RecordValidator:
    """Turns raw bytes into a current-version `Record` or a classified `Rejected`."""

    def __init__(
        self,
        schemas: Mapping[int, dict[str, Any]],
        *,
        max_record_bytes: int,
        upcasters: Mapping[int, Upcaster] = UPCASTERS,
    ) -> None:
        self.current_version = max(schemas)
        missing = [v for v in schemas if v < self.current_version and v not in upcasters]
        if missing:
            raise ValueError(f"no upcaster from schema version(s) {missing}")
        self._versions = {v: _VersionValidator(s) for v, s in schemas.items()}
        self._upcasters = upcasters
        self.max_record_bytes = max_record_bytes

    @classmethod
    def from_directory(cls, directory: Path, *, max_record_bytes: int) -> RecordValidator:
        return cls(load_schemas(directory), max_record_bytes=max_record_bytes)

    def check(self, raw: bytes) -> Verdict:
        oversize = len(raw) > self.max_record_bytes
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if oversize:
                return self._too_large(raw, {})
            return Rejected(Reason.SCHEMA_DRIFT, Stage.DECODE, f"$: not JSON: {exc}")
        if oversize:
            return self._too_large(raw, _identity(document))
        if not isinstance(document, dict):
            error = f"$: expected a JSON object, got {type(document).__name__}"
            return Rejected(Reason.SCHEMA_DRIFT, Stage.VALIDATE, error, _identity(document))
        version = document.get("schema_version", LEGACY_VERSION)
        validator = self._versions.get(version) if type(version) is int else None
        if validator is None:
            error = f"$.schema_version: unknown schema version {version!r}"
            return Rejected(Reason.SCHEMA_DRIFT, Stage.VALIDATE, error, _identity(document))
        rejection = self._validate(validator, document, Stage.VALIDATE, identity_of=document)
        if rejection is not None:
            return rejection
        if version != self.current_version:
            upcast = self._upcast(document, version)
            if isinstance(upcast, Rejected):
                return upcast
            document = upcast
        return Accepted(with_defaults(document), version)

    def _too_large(self, raw: bytes, identity: Mapping[str, str]) -> Rejected:
        error = f"$: record is {len(raw)} bytes; the limit is {self.max_record_bytes}"
        return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error, identity)

    def _upcast(self, original: dict[str, Any], version: int) -> dict[str, Any] | Rejected:
        document = original
        try:
            for step in range(version, self.current_version):
                document = self._upcasters[step](document)
        except (KeyError, TypeError, ValueError) as exc:
            error = f"$: upcast from version {version} failed: {exc!r}"
            return Rejected(Reason.SCHEMA_DRIFT, Stage.TRANSFORM, error, _identity(original))
        # The transformer's output must itself be a valid current record.
        current = self._versions[self.current_version]
        return self._validate(current, document, Stage.TRANSFORM, identity_of=original) or document

    @staticmethod
    def _validate(
        validator: _VersionValidator,
        document: dict[str, Any],
        stage: Stage,
        *,
        identity_of: dict[str, Any],
    ) -> Rejected | None:
        """None when valid. The rejection names the record by `identity_of` (as it arrived), worked
        out only when rejecting: most records pass."""
        if validator.fast_valid(document):
            return None
        errors = validator.reference_errors(document)
        if not errors:  # the fast path disagreed with the reference: trust the reference
            return None
        shape = [e for e in errors if e.validator in _SHAPE_KEYWORDS]
        reason = Reason.SCHEMA_DRIFT if shape else Reason.VALIDATION_FAIL
        first = (shape or errors)[0]
        return Rejected(reason, stage, f"{first.json_path}: {_short(first.message)}", _identity(identity_of))


def _identity(document: Any) -> dict[str, str]:
    """tenant / source / id for the DLQ headers, when the document has them as strings."""
    if not isinstance(document, dict):
        return {}
    found = {k: document.get(k) for k in ("tenant", "source", "id")}
    return {k: v[:256] for k, v in found.items() if isinstance(v, str)}


def _short(message: str) -> str:
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 1] + "…"
