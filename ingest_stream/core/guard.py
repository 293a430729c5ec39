"""The per-record guard's one batch-wide rule: when every record of a batch failed unexpectedly.

Each record's failure goes to the DLQ, so one hostile record never stops the flow. When every
record of a sizeable batch fails with an exception no rule expected, either the records are all
hostile alike, or the pipeline itself is broken (a bug, a broken dependency) and dead-lettering
would empty the source topic into the DLQ. A canary tells them apart: a known-good record through
the same path (and, at a sink, the sink's probe write). If the canary passes, the records are the
cause: they are dead-lettered. If it fails too, the worker stops before anything is published or
acknowledged (the batch is read again after the fix), so a restart does not publish the letters
again. A small batch is not judged.
"""

from __future__ import annotations

BROKEN_BATCH_MIN_RECORDS = 20


class BrokenBatchError(RuntimeError):
    """Every record of a batch failed unexpectedly and so did the canary: stop."""


def looks_broken(unexpected: int, records: int) -> bool:
    """Whether all of `records` (at least BROKEN_BATCH_MIN_RECORDS) failed unexpectedly."""
    return records >= BROKEN_BATCH_MIN_RECORDS and unexpected == records


def broken(where: str, records: int) -> BrokenBatchError:
    return BrokenBatchError(
        f"{where}: all {records} records of a batch failed with unexpected errors, and so did a "
        "known-good record (see the log and ingest_unexpected_errors_total); stopping rather than "
        "dead-lettering them")
