import json

import pytest

from ingest_stream.config import PROJECT_ROOT
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.schemas import Accepted, RecordValidator, Rejected, load_schemas
from tests.dataset import mixed_dataset, v2

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def validator() -> RecordValidator:
    return RecordValidator.from_directory(PROJECT_ROOT / "schemas", max_record_bytes=LIMIT)


def test_valid_v2_is_accepted_with_defaults(validator):
    record = v2("acme-corp", "doc-1", 3)
    del record["priority"]
    verdict = validator.check(json.dumps(record).encode())
    assert isinstance(verdict, Accepted)
    assert verdict.version == 2
    assert verdict.record["priority"] == "normal"
    assert verdict.record["links"] == []
    assert verdict.record["deleted"] is False


def test_v1_is_upcast_to_v2(validator):
    legacy = {"tenant": "acme-corp", "source": "s3", "id": "x", "rev": 4, "ts": "2025-01-01T00:00:00Z",
              "data": {"title": "t"}}
    verdict = validator.check(json.dumps(legacy).encode())
    assert isinstance(verdict, Accepted)
    assert verdict.version == 1
    assert verdict.record == {
        "schema_version": 2, "tenant": "acme-corp", "source": "s3", "id": "x", "revision": 4,
        "event_time": "2025-01-01T00:00:00Z", "priority": "normal", "kind": "record",
        "attributes": {"title": "t"}, "links": [], "deleted": False,
    }


@pytest.mark.parametrize(("change", "reason", "path"), [
    ({"revision": "7"}, Reason.SCHEMA_DRIFT, "$.revision"),
    ({"attributes": []}, Reason.SCHEMA_DRIFT, "$.attributes"),
    ({"colour": "blue"}, Reason.SCHEMA_DRIFT, "$"),
    ({"revision": True}, Reason.SCHEMA_DRIFT, "$.revision"),
    ({"revision": -1}, Reason.VALIDATION_FAIL, "$.revision"),
    ({"tenant": "Acme"}, Reason.VALIDATION_FAIL, "$.tenant"),
    ({"source": "ftp"}, Reason.VALIDATION_FAIL, "$.source"),
    ({"id": ""}, Reason.VALIDATION_FAIL, "$.id"),
    ({"id": "x" * 257}, Reason.VALIDATION_FAIL, "$.id"),
    ({"event_time": "2025-02-30T00:00:00Z"}, Reason.VALIDATION_FAIL, "$.event_time"),
    ({"kind": "9lives"}, Reason.VALIDATION_FAIL, "$.kind"),
    ({"links": [{"rel": "CITES"}]}, Reason.SCHEMA_DRIFT, "$.links[0]"),
])
def test_rejections_are_classified_with_the_json_path(validator, change, reason, path):
    verdict = validator.check(json.dumps({**v2("acme-corp", "doc", 1), **change}).encode())
    assert isinstance(verdict, Rejected)
    assert verdict.reason is reason
    assert verdict.stage is Stage.VALIDATE
    assert verdict.error.startswith(f"{path}:")
    assert verdict.identity.get("tenant") == change.get("tenant", "acme-corp")[:256]


def test_shape_wins_over_value_when_both_are_wrong(validator):
    record = v2("acme-corp", "doc", -1)
    del record["kind"]
    verdict = validator.check(json.dumps(record).encode())
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.SCHEMA_DRIFT


def test_not_json_is_drift_at_decode(validator):
    verdict = validator.check(b"\x00garbage")
    assert isinstance(verdict, Rejected)
    assert (verdict.reason, verdict.stage) == (Reason.SCHEMA_DRIFT, Stage.DECODE)


def test_oversized_record_is_validation_fail_and_keeps_identity(validator):
    big = v2("acme-corp", "big", 1, attributes={"body": "x" * LIMIT})
    verdict = validator.check(json.dumps(big).encode())
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.VALIDATION_FAIL
    assert "limit is 65536" in verdict.error
    assert verdict.identity == {"tenant": "acme-corp", "source": "kafka", "id": "big"}


def test_unknown_schema_version_is_drift(validator):
    verdict = validator.check(json.dumps(v2("acme-corp", "d", 1, schema_version=3)).encode())
    assert isinstance(verdict, Rejected)
    assert verdict.reason is Reason.SCHEMA_DRIFT
    assert verdict.error.startswith("$.schema_version:")


def test_every_dataset_record_gets_the_modelled_verdict(validator):
    data = mixed_dataset("unit", max_record_bytes=LIMIT)
    for message in data.messages:
        verdict = validator.check(message.value)
        if message.rejected is None:
            assert isinstance(verdict, Accepted), (message.value[:200], verdict)
        else:
            assert isinstance(verdict, Rejected), message.value[:200]
            assert (verdict.reason.value, verdict.stage.value) == message.rejected, message.value[:200]


def test_fast_and_reference_validators_agree_on_every_dataset_record(validator):
    data = mixed_dataset("unit", max_record_bytes=LIMIT)
    documents = []
    for message in data.messages:
        try:
            documents.append(json.loads(message.value))
        except ValueError:
            continue
    documents += [{**v2("a", "b", 1), "revision": 1.5}, v2("a", "b", 1, deleted="yes"), {"schema_version": 2}]
    checked = 0
    for document in documents:
        version = document.get("schema_version", 1) if isinstance(document, dict) else 2
        per_version = validator._versions.get(version)
        if per_version is None:
            continue
        fast = per_version.fast_valid(document)
        reference = not per_version.reference_errors(document)
        assert fast == reference, document
        checked += 1
    assert checked > 100


def test_a_schema_version_without_an_upcaster_is_refused():
    schemas = load_schemas(PROJECT_ROOT / "schemas")
    with pytest.raises(ValueError, match="no upcaster"):
        RecordValidator(schemas, max_record_bytes=LIMIT, upcasters={})


def test_a_new_version_needs_only_a_schema_file_and_an_upcaster(tmp_path):
    schemas = load_schemas(PROJECT_ROOT / "schemas")
    v3 = json.loads(json.dumps(schemas[2]))
    v3["x-schema-version"] = 3
    v3["properties"]["schema_version"]["const"] = 3
    v3["properties"]["labels"] = {"type": "array", "items": {"type": "string"}}
    upcasters = {1: __import__("ingest_stream.core.transformers", fromlist=["v1_to_v2"]).v1_to_v2,
                 2: lambda r: {**r, "schema_version": 3, "labels": []}}
    validator = RecordValidator({**schemas, 3: v3}, max_record_bytes=LIMIT, upcasters=upcasters)
    verdict = validator.check(json.dumps(v2("acme-corp", "d", 1)).encode())
    assert isinstance(verdict, Accepted)
    assert verdict.record["schema_version"] == 3
    assert verdict.version == 2
