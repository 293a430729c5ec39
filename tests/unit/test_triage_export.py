"""Issue 16: an exported CSV cannot run formulas in a spreadsheet; a manifest names an archive in
its own directory only."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import PurePosixPath

import orjson
import pytest

from ingest_stream.core.dlq import DlqEnvelope, Position, failure_headers
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.triage import EXPORT_COLUMNS, DeadLetter, Manifest, Status, csv_cell, export_row

DIGEST = "ab" * 32


@pytest.mark.parametrize("text", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "\nx",
                                  "=HYPERLINK(\"http://evil\",\"x\")", "\uff1dcmd"])
def test_a_cell_starting_like_a_formula_gets_a_quote(text):
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize(("value", "cell"), [("doc-1", "doc-1"), ("a=b", "a=b"), (" =x", " =x"), ("", ""),
                                             (None, ""), (3, "3"), (-3, "'-3"), (True, "True")])
def test_other_cells_are_left_as_they_are(value, cell):
    assert csv_cell(value) == cell


def test_every_column_of_an_exported_row_is_neutralised():
    hostile = "=cmd|' /C calc'!A0"
    headers = failure_headers(
        [], reason=Reason.VALIDATION_FAIL, stage=Stage.VALIDATE, error=hostile, attempts=1,
        origin=Position("ingest.source.kafka", 0, 1), failed=None, failed_at=datetime(2026, 1, 1, tzinfo=UTC),
        identity={"tenant": "@tenant", "source": "+source", "id": "-id"})
    letter = DeadLetter(0, 1, b"k", hostile.encode(), tuple(headers), DlqEnvelope.from_headers(headers))
    row = export_row(letter, Status.OPEN)
    assert list(row) == list(EXPORT_COLUMNS)
    assert (row["error"], row["value"]) == ("'" + hostile, "'" + hostile)
    assert (row["tenant"], row["source"], row["record_id"]) == ("'@tenant", "'+source", "'-id")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
    writer.writerow(row)
    cells = next(csv.reader(io.StringIO(out.getvalue())))
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


def manifest(**fields: object) -> bytes:
    return orjson.dumps({"archive": "dlq-purge-x.jsonl.gz", "sha256": DIGEST, "records": 3, **fields})


def test_a_manifest_names_an_archive_beside_it():
    parsed = Manifest.parse(manifest(sha256=DIGEST.upper()))
    assert parsed == Manifest(PurePosixPath("dlq-purge-x.jsonl.gz"), DIGEST, 3)
    assert Manifest.parse(manifest(archive="sub/a.gz")).archive == PurePosixPath("sub/a.gz")


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.gz", "sub/../../x", "..", ".", "", "a\x00b",
                                  None, 7, ["a"]])
def test_a_manifest_naming_anything_outside_its_directory_is_refused(name):
    with pytest.raises(ValueError, match="archive"):
        Manifest.parse(manifest(archive=name))


@pytest.mark.parametrize(("raw", "problem"), [
    (b"not json", "not JSON"), (b"[]", "not a JSON object"), (manifest(sha256="x"), "sha256"),
    (manifest(sha256=None), "sha256"), (manifest(records=-1), "records"), (manifest(records="3"), "records"),
    (manifest(records=True), "records"), (manifest(records=1.5), "records")])
def test_a_garbled_manifest_is_refused(raw, problem):
    with pytest.raises(ValueError, match=problem):
        Manifest.parse(raw)
