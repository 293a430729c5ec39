"""`python -m bench.table_costs [--keys N]`: what a dedupe-table read and write cost per key through
Faust's table (what the source agent does today) against RocksDB itself (rocksdict, raw keys), on
the worker's own store (`ingest-rocksdb://`). No broker: the table is used without starting the app,
with a current event made by hand; RocksDB alone is a second instance with the same key bytes.
Prints µs per key. For issue 20's per-record cost work."""

from __future__ import annotations

import argparse
import tempfile
import time
import weakref

import faust
import orjson
import rocksdict
from faust.streams import _current_event

import ingest_stream.stream.tables  # noqa: F401  (registers the ingest-rocksdb:// store)


class _Message:
    partition = 1


class _Event:
    message = _Message()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table_costs")
    parser.add_argument("--keys", type=int, default=20_000)
    n = parser.parse_args().keys // 2
    app = faust.App("table-costs", broker="kafka://127.0.0.1:1", store="ingest-rocksdb://",
                    datadir=tempfile.mkdtemp(prefix="table-costs-"))
    table = app.Table("dedupe", key_type=str, value_type=str, partitions=4)
    event = _Event()
    _current_event.set(weakref.ref(event))  # type: ignore[arg-type]
    store = table.data
    keys = [f"{i:064x}" for i in range(2 * n)]
    figures: dict[str, float] = {}

    def timed(name: str, run: object) -> None:
        started = time.perf_counter()
        run()  # type: ignore[operator]
        figures[name] = (time.perf_counter() - started) / n * 1e6

    timed("faust set", lambda: [store.__setitem__(k, "0:1:2") for k in keys[:n]])
    timed("faust get (held)", lambda: [table.get(k) for k in keys[:n]])
    timed("faust get (absent)", lambda: [table.get(k) for k in keys[n:]])
    # RocksDB alone: the same key bytes (Faust's json of a str) in an instance of its own.
    db = rocksdict.Rdict(tempfile.mkdtemp(prefix="table-costs-raw-"),
                         options=rocksdict.Options(raw_mode=True))
    encoded = [orjson.dumps(k) for k in keys]
    for k in encoded[:n]:
        db.put(k, b'"0:1:2"')
    timed("rocksdb get", lambda: [db.get(k) for k in encoded[:n]])
    timed("rocksdb multi-get", lambda: db[encoded[:n]])
    batch = rocksdict.WriteBatch(raw_mode=True)
    timed("rocksdb write batch", lambda: ([batch.put(k, b'"0:1:2"') for k in encoded[n:]], db.write(batch)))
    for name, us in figures.items():
        print(f"{name:22s} {us:6.2f} µs/key")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
