"""`python -m bench.fuzz [--records 10000] [--seed S] [--max-record-bytes B]` (`make fuzz`).

Sends N records, hostile ones of every class in tests/hostile.py mixed at random with good ones,
through one ingest_stream worker on the real embedded servers (the dev stack), and accounts for
every record: each must land in every sink or be in the DLQ once with its class's reason and stage,
and the worker must never exit. Prints worker exits, records accounted for, the DLQ by reason and
the seconds it took; exits 1 when anything is unaccounted for or the worker exited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import asyncpg

from ingest_stream.config import SOURCES
from ingest_stream.ops.devstack import DevStack, free_port
from ingest_stream.sinks.postgres import migrate
from tests.hostile import CLASSES, Context, Hostile, build, good
from tests.integration.harness import Kafka, SinkReader, headers_of

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "fuzz"


def generate(count: int, seed: int, limit: int, tenants: list[str]) -> list[Hostile]:
    """About half good records, half hostile of a random class; each with its own entity id."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        context = Context(rng.choice(tenants), f"r{index}", limit, PREFIX, rng)
        records.append(good(context) if rng.random() < 0.5 else build(rng.choice(CLASSES), context))
    return records


def dead_letters(kafka: Kafka, source: str) -> Counter[tuple[int, int, str, str]]:
    """(partition, offset, reason, stage) of every DLQ record that came from the source topic."""
    found: Counter[tuple[int, int, str, str]] = Counter()
    for message in kafka.read_all(f"{PREFIX}.dlq", idle_s=3):
        h = headers_of(message)
        if h.get("dlq.origin.topic") == source:
            found[(int(h["dlq.origin.partition"]), int(h["dlq.origin.offset"]), h["dlq.reason"],
                   h["dlq.stage"])] += 1
    return found


async def migrate_postgres(dsn: str) -> None:
    """The sink's own migrations, so the table can be read before the worker first writes."""
    connection = await asyncpg.connect(dsn)
    try:
        await migrate(connection)
    finally:
        await connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--max-record-bytes", type=int, default=64 * 1024,
                        help="INGEST_MAX_RECORD_BYTES of the worker; oversized classes scale with it")
    parser.add_argument("--timeout-s", type=float, default=1800)
    args = parser.parse_args()
    tenants = [f"{PREFIX}-t{i}" for i in range(8)]
    records = generate(args.records, args.seed, args.max_record_bytes, tenants)
    work = Path(tempfile.mkdtemp(prefix="ingest-fuzz-"))
    with DevStack(work / "stack") as stack:
        kafka = Kafka(stack.kafka_bootstrap)
        asyncio.run(migrate_postgres(stack.postgres_dsn))
        kafka.create_topics([f"{PREFIX}.source.{s}" for s in SOURCES])
        env = {**os.environ, **stack.settings_env(), "INGEST_APP_ID": f"{PREFIX}-ingest",
               "INGEST_TOPIC_PREFIX": PREFIX, "INGEST_DATA_DIR": str(work / "data"),
               "INGEST_WEB_PORT": str(free_port()), "INGEST_WEB_HOST": "127.0.0.1",
               "INGEST_MAX_RECORD_BYTES": str(args.max_record_bytes)}
        log = work / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen([sys.executable, "-m", "ingest_stream.cli", "worker"], env=env,
                                      stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        started = time.monotonic()
        source = f"{PREFIX}.source.kafka"
        positions = kafka.produce(source, [(r.key, r.value) for r in records],
                                  headers_each=[r.headers for r in records])
        produced_s = time.monotonic() - started
        print(f"produced {len(records)} records in {produced_s:.1f}s; waiting for the worker",
              file=sys.stderr)
        landing = {(r.record["tenant"], r.record["id"]): r.record["revision"] for r in records if r.record}
        expected = Counter((*positions[i], *r.expect) for i, r in enumerate(records) if r.expect)
        sinks = SinkReader(stack)
        report: dict[str, object] = {}
        try:
            deadline = time.monotonic() + args.timeout_s
            while True:
                exited = worker.poll() is not None
                held = {
                    "postgres": {k: v["revision"] for k, v in sinks.postgres(tenants).items()},
                    "neo4j": {k: v["revision"] for k, v in sinks.graph_nodes(tenants).items()},
                    "typesense": sinks.search_documents(tenants),
                }
                letters = dead_letters(kafka, source)
                landed = {sink: sum(1 for k, rev in rows.items() if landing.get(k) == rev)
                          for sink, rows in held.items()}
                done = all(n == len(landing) for n in landed.values()) and letters == expected
                if done or exited or time.monotonic() > deadline:
                    break
                print(f"  landed {landed} of {len(landing)}; dead letters {sum(letters.values())} of "
                      f"{sum(expected.values())}", file=sys.stderr)
                time.sleep(5)  # a progress line every few seconds; each poll reads the DLQ anew
            seconds = time.monotonic() - started
            missing = expected - letters
            extra = letters - expected
            report = {
                "records": len(records),
                "worker_exits": 0 if worker.poll() is None else 1,
                "worker_exit_code": worker.poll(),
                "accounted_for": min(landed.values()) + sum((expected & letters).values()),
                "landed_in_every_sink": min(landed.values()),
                "expected_to_land": len(landing),
                "dead_lettered": sum(letters.values()),
                "expected_dead_letters": sum(expected.values()),
                "dlq_by_reason": dict(Counter(reason for (_, _, reason, _), n in letters.items()
                                              for _ in range(n))),
                "missing_dead_letters": sum(missing.values()),
                "unexpected_dead_letters": sum(extra.values()),
                "classes": Counter(r.kind for r in records),
                "seconds": round(seconds, 1),
                "seed": args.seed,
                "max_record_bytes": args.max_record_bytes,
            }
        finally:
            sinks.close()
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
    print(json.dumps(report, indent=2, default=dict))
    ok = (report["worker_exits"] == 0 and report["accounted_for"] == report["records"])
    if not ok:
        print(f"FAILED: see the worker's log {log}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
