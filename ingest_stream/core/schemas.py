"""Decode, validate and upcast one raw input record.

jsonschema is the reference and classifies every rejection; a fastjsonschema function compiled from
the same schema file only answers "valid?" on the happy path (about 25x faster). Both use the same
`date-time` checker, and a test holds them to the same verdict on every test record.

SCHEMA_DRIFT means the shape is wrong (not JSON, not an object, unknown version, a required field
missing, an unexpected field, a wrong JSON type); VALIDATION_FAIL means a value is wrong (pattern,
enum, range, format, length, record size, nesting depth).

`check` never raises: whatever the bytes, the answer is a record or a classified rejection. The
schema is read as JSON Schema means it, not as Python's `re` and draft 7's number rules would:
`integer` is a JSON integer (`1.0` is not one: a float revision would be stored as a float by the
graph and compare wrongly for good), and a pattern's `$` is the end of the string (ECMA 262), not
"before a final newline" (`"acme\n"` would be a new tenant). An accepted record is re-encoded here
once (canonical bytes, for the dedupe key and the sinks), and must re-encode within the size limit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial, update_wrapper
from pathlib import Path
from typing import Any

import orjson
from fastjsonschema import JsonSchemaException
from fastjsonschema.draft04 import CodeGeneratorDraft04
from fastjsonschema.draft07 import CodeGeneratorDraft07
from fastjsonschema.ref_resolver import RefResolver
from jsonschema import Draft7Validator, FormatChecker, ValidationError, validators

from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.record import Record, encode, with_defaults
from ingest_stream.core.timefmt import is_rfc3339
from ingest_stream.core.transformers import UPCASTERS, Upcaster

LEGACY_VERSION = 1  # records without `schema_version` are version 1
SCHEMA_VERSION_KEY = "x-schema-version"
# Keywords whose failure means the record has the wrong shape; every other keyword judges a value.
_SHAPE_KEYWORDS = frozenset({"type", "required", "additionalProperties", "const"})
_MESSAGE_LIMIT = 300
# orjson encodes at most 254 levels (and every sink stores attributes as JSON): deeper is rejected.
MAX_NESTING_DEPTH = 254
_ECMA_END = re.compile(r"(?<!\\)\$")  # an unescaped `$`


@dataclass(frozen=True, slots=True)
class Accepted:
    record: Record
    version: int  # the version the producer wrote, before upcasting
    encoded: bytes = b""  # the record's canonical bytes (`record.encode`), what the sinks receive


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    stage: Stage
    error: str
    identity: Mapping[str, str] = field(default_factory=dict)  # tenant / source / id when readable
    unexpected: str | None = None  # the exception type, when a bug (not the record) was the cause


Verdict = Accepted | Rejected


def load_schemas(directory: Path) -> dict[int, dict[str, Any]]:
    """Every `input*.schema.json` in the directory, by the version it declares."""
    schemas: dict[int, dict[str, Any]] = {}
    for path in sorted(directory.glob("input*.schema.json")):
        schema = json.loads(path.read_text())
        version = schema.get(SCHEMA_VERSION_KEY)
        if not isinstance(version, int) or version in schemas:
            raise ValueError(f"{path}: missing or duplicate {SCHEMA_VERSION_KEY!r}")
        schemas[version] = _python_patterns(schema)
    if not schemas:
        raise ValueError(f"no input*.schema.json in {directory}")
    return schemas


def _python_patterns(schema: Any) -> Any:
    """The schema with each `pattern` in Python's spelling of ECMA 262: `$` becomes `\\Z`."""
    if isinstance(schema, list):
        return [_python_patterns(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: _ECMA_END.sub(r"\\Z", value) if key == "pattern" and isinstance(value, str)
            else _python_patterns(value) for key, value in schema.items()}


def _is_json_integer(_checker: Any, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictDraft7 = validators.extend(  # type: ignore[no-untyped-call]
    Draft7Validator, type_checker=Draft7Validator.TYPE_CHECKER.redefine("integer", _is_json_integer))


class _StrictIntegerCode(CodeGeneratorDraft07):
    """fastjsonschema's draft 7 code with draft 4's `type` rule: `integer` is an int, not `1.0`."""

    generate_type = CodeGeneratorDraft04.generate_type


def _compile_fast(schema: dict[str, Any], formats: dict[str, Callable[[Any], bool]]) -> Callable[[Any], Any]:
    """`fastjsonschema.compile`, with `_StrictIntegerCode` as the code generator."""
    resolver = RefResolver.from_schema(schema, handlers={}, store={})
    code = _StrictIntegerCode(schema, resolver=resolver, formats=formats)  # type: ignore[no-untyped-call]
    scope = code.global_state
    exec(code.func_code, scope)  # what fastjsonschema.compile does with the generated code
    func = scope[resolver.get_scope_name()]
    return update_wrapper(partial(func, custom_formats=formats), func)


class _VersionValidator:
    """One schema version: the compiled fast check and the reference validator."""

    def __init__(self, schema: dict[str, Any]) -> None:
        checker = FormatChecker(formats=())
        checker.checks("date-time")(is_rfc3339)
        self.reference = _StrictDraft7(schema, format_checker=checker)
        self.fast = _compile_fast(schema, {"date-time": is_rfc3339})

    def fast_valid(self, document: Any) -> bool:
        try:
            self.fast(document)
        except JsonSchemaException:
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
        """Never raises: an exception no rule expects is the record's rejection, flagged
        `unexpected` (the wiring counts and logs it: it is a bug to fix, not the record's fault)."""
        try:
            return self._check(raw)
        except RecursionError:
            return self._too_deep({})
        except Exception as exc:
            error = f"$: unexpected {type(exc).__name__} while validating: {_short(str(exc))}"
            return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error, unexpected=type(exc).__name__)

    def _check(self, raw: bytes) -> Verdict:
        oversize = len(raw) > self.max_record_bytes
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if oversize:
                return self._too_large(raw, {})
            return Rejected(Reason.SCHEMA_DRIFT, Stage.DECODE, f"$: not JSON: {exc}")
        if oversize:
            return self._too_large(raw, identity_of(document))
        if not isinstance(document, dict):
            error = f"$: expected a JSON object, got {type(document).__name__}"
            return Rejected(Reason.SCHEMA_DRIFT, Stage.VALIDATE, error, identity_of(document))
        version = document.get("schema_version", LEGACY_VERSION)
        validator = self._versions.get(version) if type(version) is int else None
        if validator is None:
            error = f"$.schema_version: unknown schema version {version!r}"
            return Rejected(Reason.SCHEMA_DRIFT, Stage.VALIDATE, error, identity_of(document))
        rejection = self._validate(validator, document, Stage.VALIDATE, named_by=document)
        if rejection is not None:
            return rejection
        if version != self.current_version:
            upcast = self._upcast(document, version)
            if isinstance(upcast, Rejected):
                return upcast
            document = upcast
        record = with_defaults(document)
        try:
            encoded = encode(record)
        except orjson.JSONEncodeError:  # deeper than orjson (and the sinks' JSON) can hold
            return self._too_deep(identity_of(document))
        if len(encoded) > self.max_record_bytes:  # `1e5` re-encodes as `100000.0`; defaults add bytes
            return self._too_large(encoded, identity_of(document), what="re-encoded for the sinks, ")
        if b"\\u0000" in encoded and _holds_nul(record):  # orjson writes U+0000 as \u0000
            error = "$: a string holds U+0000, which Postgres text and jsonb cannot store"
            return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error, identity_of(document))
        return Accepted(record, version, encoded)

    def _too_large(self, raw: bytes, identity: Mapping[str, str], what: str = "") -> Rejected:
        error = f"$: record is {what}{len(raw)} bytes; the limit is {self.max_record_bytes}"
        return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error, identity)

    @staticmethod
    def _too_deep(identity: Mapping[str, str]) -> Rejected:
        error = f"$: nested deeper than {MAX_NESTING_DEPTH} levels"
        return Rejected(Reason.VALIDATION_FAIL, Stage.VALIDATE, error, identity)

    def _upcast(self, original: dict[str, Any], version: int) -> dict[str, Any] | Rejected:
        document = original
        try:
            for step in range(version, self.current_version):
                document = self._upcasters[step](document)
        except (KeyError, TypeError, ValueError) as exc:
            error = f"$: upcast from version {version} failed: {exc!r}"
            return Rejected(Reason.SCHEMA_DRIFT, Stage.TRANSFORM, error, identity_of(original))
        # The transformer's output must itself be a valid current record.
        current = self._versions[self.current_version]
        return self._validate(current, document, Stage.TRANSFORM, named_by=original) or document

    @staticmethod
    def _validate(
        validator: _VersionValidator,
        document: dict[str, Any],
        stage: Stage,
        *,
        named_by: dict[str, Any],
    ) -> Rejected | None:
        """None when valid. The rejection names the record by `named_by` (as it arrived), worked
        out only when rejecting: most records pass."""
        if validator.fast_valid(document):
            return None
        if nesting_depth_exceeds(document, MAX_NESTING_DEPTH):  # jsonschema's messages recurse
            return RecordValidator._too_deep(identity_of(named_by))
        errors = validator.reference_errors(document)
        if not errors:  # the fast path disagreed with the reference: trust the reference
            return None
        shape = [e for e in errors if e.validator in _SHAPE_KEYWORDS]
        reason = Reason.SCHEMA_DRIFT if shape else Reason.VALIDATION_FAIL
        first = (shape or errors)[0]
        return Rejected(reason, stage, f"{first.json_path}: {_short(first.message)}", identity_of(named_by))


def nesting_depth_exceeds(document: Any, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` levels (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _holds_nul(document: Any) -> bool:
    """Whether a string (key or value) anywhere in the document holds U+0000."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def identity_of(document: Any) -> dict[str, str]:
    """tenant / source / id for the DLQ headers, when the document has them as strings."""
    if not isinstance(document, dict):
        return {}
    found = {k: document.get(k) for k in ("tenant", "source", "id")}
    return {k: v[:256] for k, v in found.items() if isinstance(v, str)}


def _short(message: str) -> str:
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 1] + "…"
