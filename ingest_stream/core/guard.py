"""The per-record guard's one batch-wide rule: when every record of a batch failed unexpectedly.

Each record's failure goes to the DLQ, so one hostile record never stops the flow. But when every
record of a sizeable batch fails with an exception no rule expected, the records are not the cause:
it is a bug of ours or a broken dependency, and dead-lettering everything would empty the source
topic into the DLQ. Then the worker stops (the batch is not acked, and is read again after the fix).
A small batch is not judged: a few hostile records arriving alone must not stop the worker.
"""

from __future__ import annotations

BROKEN_BATCH_MIN_RECORDS = 20


class BrokenBatchError(RuntimeError):
    """Every record of a batch failed unexpectedly: stop, do not dead-letter them all."""


def check_batch(unexpected: int, records: int, *, where: str) -> None:
    """Raises BrokenBatchError when all of `records` (at least BROKEN_BATCH_MIN_RECORDS) failed."""
    if records >= BROKEN_BATCH_MIN_RECORDS and unexpected == records:
        raise BrokenBatchError(
            f"{where}: all {records} records of a batch failed with unexpected errors "
            "(see the log and ingest_unexpected_errors_total); stopping rather than dead-lettering them")
