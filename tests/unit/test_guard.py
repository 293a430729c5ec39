"""The batch-wide rule of the per-record guard, and the canary that tells hostile records from a
broken pipeline."""

import pytest

from ingest_stream.config import PROJECT_ROOT, SOURCES
from ingest_stream.core.admission import canary_passes
from ingest_stream.core.dlq import Position
from ingest_stream.core.guard import BROKEN_BATCH_MIN_RECORDS, looks_broken
from ingest_stream.core.schemas import RecordValidator

TOPICS = frozenset(f"ingest.source.{s}" for s in SOURCES)
HERE = Position("ingest.source.kafka", 0, 0)


@pytest.mark.parametrize(("unexpected", "records", "verdict"), [
    (BROKEN_BATCH_MIN_RECORDS, BROKEN_BATCH_MIN_RECORDS, True),
    (BROKEN_BATCH_MIN_RECORDS - 1, BROKEN_BATCH_MIN_RECORDS, False),  # one record went through
    (5, 5, False),  # a few hostile records arriving alone are never judged
    (0, 500, False),
])
def test_only_a_sizeable_batch_failing_entirely_looks_broken(unexpected, records, verdict):
    assert looks_broken(unexpected, records) is verdict


def test_the_canary_passes_the_real_path_and_fails_a_broken_one(monkeypatch):
    validator = RecordValidator.from_directory(PROJECT_ROOT / "schemas", max_record_bytes=1 << 20)
    assert canary_passes(validator, here=HERE, source_topics=TOPICS)

    def broken(raw: bytes) -> None:
        raise RuntimeError("a dependency broke")

    monkeypatch.setattr(validator, "_check", broken)
    assert not canary_passes(validator, here=HERE, source_topics=TOPICS)
