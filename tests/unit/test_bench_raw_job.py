"""bench/raw_job.py, stage (a''): it writes rows and documents of the shape ingest_stream's sinks
write, so the two stages do the same job."""

from __future__ import annotations

from typing import Any

import orjson

from bench import raw_job
from ingest_stream.core.record import with_defaults
from ingest_stream.ops.produce import synthetic_records
from ingest_stream.sinks import postgres, typesense
from ingest_stream.sinks.base import Write

ODD = {"schema_version": 2, "tenant": "benchjob-1", "source": "kafka", "id": "a b/c:ü", "revision": 3,
       "event_time": "2026-01-02T03:04:05.678Z", "kind": "document",
       "attributes": {"n": 1.5, "flag": True, "none": None, "nested": [{"x": "deep", "y": 7}], "t": "top"}}


def _records() -> list[dict[str, Any]]:
    return [*synthetic_records(50, entities=50, tenant_prefix="benchjob"), ODD]


def test_rows_are_ingest_streams_rows() -> None:
    for record in _records():
        write = Write(with_defaults(record), origin_tp="bench.job.in:2", origin_offset=41)
        expected = list(postgres._rows([write])[0][1:])  # the sink's COPY row, less its `rewrite` flag
        assert list(raw_job.row(record, "bench.job.in:2", 41)) == expected


def test_documents_are_ingest_streams_documents() -> None:
    for record in _records():
        write = Write(with_defaults(record), origin_tp="bench.job.in:2", origin_offset=41)
        assert raw_job.search_document(record, "bench.job.in:2", 41) == typesense._document(write)


def test_newest_revisions_keeps_each_entitys_newest() -> None:
    values = [orjson.dumps({"tenant": "t", "id": i, "revision": r})
              for i, r in (("a", 0), ("a", 2), ("b", 1))]
    assert raw_job.newest_revisions(values) == {("t", "a"): 2, ("t", "b"): 1}
