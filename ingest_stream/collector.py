"""Python's cyclic garbage collector, set for a worker that keeps tens of thousands of records in flight.

With Python's own thresholds (700, 10, 10) the worker spent 5.2–7.7 s of its 18–25 s of CPU in the
collector on the bench's (c) stage (`python -m bench.stage_c`, 100,000 records; timed with
`gc.callbacks`, docs/benchmark.md). Almost all of it was full collections, 100–250 ms each: every one
traverses the ~130,000 objects of the imported modules and the app, and every record in flight (up to
16,384 queued events and 10,000 records in the lanes, each a handful of objects). Faust adds a full
collection per table at each rebalance.

So, once the app is built and before the worker starts: collect, then freeze what is left
(`gc.freeze`: those objects are never traversed again; start-up objects live as long as the worker
does), and collect less often, so records in flight are traversed fewer times before they are gone.
Measured the same way: 2.1–2.4 s of collector time per 100,000 records instead of 5.2–7.7 s.
`INGEST_GC_TUNED=false` leaves Python's own behaviour.
"""

from __future__ import annotations

import gc

# The young generation every 3,000 allocations (net of frees) instead of 700: thresholds from 1,000
# to 6,000 measured alike, 50,000 made each young collection slower. The middle one every 10 young
# collections, as Python. A full collection every 20 middle ones instead of 10: at 100, requests
# that outlive two collections (the sinks' HTTP responses, cycles in httpx) were left to pile up
# as garbage in the old generation, and a 4-minute soak at 1,500 records/s grew 14-15 MiB (RocksDB
# aside) in its second half, against 6-7 MiB with 20 or with Python's own settings.
WORKER_THRESHOLDS = (3_000, 10, 20)


def tune_collector(enabled: bool) -> int | None:
    """Freeze the objects alive now and set `WORKER_THRESHOLDS`; how many objects were frozen
    (None when not `enabled`). Call it once, after the imports and the app, before the work."""
    if not enabled:
        return None
    gc.collect()  # cycles among start-up garbage would otherwise be frozen with the rest
    gc.freeze()
    gc.set_threshold(*WORKER_THRESHOLDS)
    return gc.get_freeze_count()
