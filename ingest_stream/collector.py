"""Python's cyclic garbage collector, set for a worker that keeps tens of thousands of records in flight.

With Python's own thresholds (700, 10, 10) the worker spent 5.2–7.7 s of its 18–25 s of CPU in the
collector on the bench's (c) stage (`python -m bench.stage_c`, 100,000 records; timed with
`gc.callbacks`, docs/benchmark.md). Almost all of it was full collections, 100–250 ms each: every one
traverses the ~130,000 objects of the imported modules and the app, and every record in flight (up to
16,384 queued events and 10,000 records in the lanes, each a handful of objects). Faust adds a full
collection per table at each rebalance.

So, once the app is built and before the worker starts: collect, then freeze what is left
(`gc.freeze`: those objects are never traversed again; start-up objects live as long as the worker
does), and collect far less often. A collection is due when the tracked objects allocated since the
last one, net of those freed, pass the threshold: in a worker that is the records in flight swelling
(a backlog fills the lanes by ~150,000 objects, and drains them again), plus any cyclic garbage.
There is no steady cyclic garbage left: the sinks' HTTP responses were (sinks/typesense.py). So
the young generation waits for 50,000 instead of 700: a backlog sets off a few collections per
100,000 records rather than hundreds, and nothing piles up meanwhile. Measured the same way: 0.2 s
of collector time per 100,000 records, against 1.4–1.5 s with (3000, 10, 20) and 5.2–7.7 s with
Python's own. `INGEST_GC_TUNED=false` leaves Python's own behaviour.
"""

from __future__ import annotations

import gc

# The young generation at 50,000 (net of frees). The middle one every 10 young collections, as
# Python; a full collection every 2 middle ones (~1,000,000 net allocations), so that cycles from a
# rare path (an outage's exceptions and their tracebacks) that outlive two collections are not left
# for long. (3000, 10, 20) was the setting while the HTTP responses were cycles: larger young
# thresholds then let their garbage pile up.
WORKER_THRESHOLDS = (50_000, 10, 2)


def tune_collector(enabled: bool) -> int | None:
    """Freeze the objects alive now and set `WORKER_THRESHOLDS`; how many objects were frozen
    (None when not `enabled`). Call it once, after the imports and the app, before the work."""
    if not enabled:
        return None
    gc.collect()  # cycles among start-up garbage would otherwise be frozen with the rest
    gc.freeze()
    gc.set_threshold(*WORKER_THRESHOLDS)
    return gc.get_freeze_count()
