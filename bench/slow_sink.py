"""`python -m bench.slow_sink [--rate R] [--seconds S] [--frozen F] [--sinks ...]`: how much one slow
sink slows the others.

One worker on a fresh embedded stack; records stamped as produced at `--rate` for `--seconds`, while
Typesense is frozen (SIGSTOP) `--frozen` seconds of every `--frozen` + 0.1 s (0: never): it answers,
slowly, without failing. Prints the latency stage's figures (Postgres p50/p95/p99: its own clock
minus the event time, per record; each sink's share within 1 s) and Postgres's latency per second of
event time. A lane that holds the source's acks for the slow sink shows in Postgres's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
import time

import asyncpg

from bench.run import IngestStages, fresh_stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=4000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--frozen", type=float, default=0.4, help="seconds frozen of every F + 0.1 s")
    parser.add_argument("--sinks", default="postgres,typesense")
    args = parser.parse_args()
    with fresh_stack("ingest-slow-sink-", args.sinks) as (stack, settings, work):
        stop = threading.Event()

        def freeze_typesense() -> None:
            process = stack.servers["typesense"].process
            assert process is not None
            while not stop.is_set():
                process.send_signal(signal.SIGSTOP)
                time.sleep(args.frozen)
                process.send_signal(signal.SIGCONT)
                time.sleep(0.1)

        if args.frozen > 0:
            threading.Thread(target=freeze_typesense, daemon=True).start()
        try:
            print(IngestStages(stack, settings, work, args.sinks).latency("slow", args.rate, args.seconds))
        finally:
            stop.set()
        for second, count, mean, worst in asyncio.run(_per_second(stack.postgres_dsn)):
            print(f"second {second:3d}: {count:5d} records, Postgres latency mean {mean} s, max {worst} s")
    return 0


async def _per_second(dsn: str) -> list[tuple[int, int, float, float]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT floor(extract(epoch FROM event_time))::bigint AS s, count(*) AS n, "
            "round(avg(extract(epoch FROM updated_at - event_time))::numeric, 3) AS mean, "
            "round(max(extract(epoch FROM updated_at - event_time))::numeric, 3) AS worst "
            "FROM ingest_records WHERE tenant LIKE 'slow-%' GROUP BY 1 ORDER BY 1")
    finally:
        await conn.close()
    first = rows[0]["s"] if rows else 0
    return [(r["s"] - first, r["n"], float(r["mean"]), float(r["worst"])) for r in rows]


if __name__ == "__main__":
    raise SystemExit(main())
