"""(a) The raw pipeline, no framework: aiokafka consume → orjson → fastjsonschema → SHA-256 →
produce, batch by batch. The yardstick the others are compared with. Prints one JSON line.

With `--sink-topics`, (a') the same raw code in the contract's shape: each source record is
produced to every sink topic and, keyed by its SHA-256, to a dedupe log (ingest_stream's changelog);
the same consumer reads the sink topics back and parses and validates each record again, as the
sink agents do. No sink is written. What the contract's fan-out costs with no framework at all: a
ceiling for any implementation of it on this broker and machine."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time

import fastjsonschema
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import machine_busy_seconds, proc_figures
from ingest_stream.config import Settings


async def run(bootstrap: str, source: str, target: str, expected: int,
              sink_topics: list[str]) -> dict[str, float]:
    schema = orjson.loads((Settings().schema_dir / "input.schema.json").read_bytes())
    validate = fastjsonschema.compile(schema)
    consumer = AIOKafkaConsumer(source, *sink_topics, bootstrap_servers=bootstrap,
                                group_id=f"bench-raw-{source}", auto_offset_reset="earliest",
                                enable_auto_commit=False, max_poll_records=2000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all",
                                max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    # Plain: each record once, to `target`. Fanned out: done when every sink topic was read back.
    to_read = expected * len(sink_topics) if sink_topics else expected
    done, started, cpu_started, machine_started = 0, 0.0, 0.0, 0.0
    try:
        while done < to_read:
            batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
            if not batches:
                continue
            if not started:
                started, cpu_started = time.monotonic(), time.process_time()
                machine_started = machine_busy_seconds()
            deliveries = []
            for tp, records in batches.items():
                if tp.topic != source:  # a sink topic, read back: parsed and validated again
                    for record in records:
                        validate(orjson.loads(record.value))
                    done += len(records)
                    continue
                for record in records:
                    document = orjson.loads(record.value)
                    validate(document)
                    key = hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()
                    if not sink_topics:
                        deliveries.append(await producer.send(target, value=record.value, key=key.encode()))
                        done += 1
                        continue
                    for topic in sink_topics:
                        deliveries.append(await producer.send(topic, value=record.value, key=record.key))
                    deliveries.append(await producer.send(target, value=b"1", key=key.encode()))
            await asyncio.gather(*deliveries)
            await consumer.commit()
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu_started
        machine = machine_busy_seconds() - machine_started
    finally:
        await producer.stop()
        await consumer.stop()
    return {"records": expected, "seconds": elapsed, "cpu_seconds": cpu, "machine_busy_seconds": machine,
            # VmHWM: getrusage's ru_maxrss would include the parent's peak (inherited over fork)
            "peak_rss_mib": proc_figures(os.getpid())["peak_rss_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--sink-topics", default="",
                        help="comma-separated: fan each record out to these and read them back (a')")
    args = parser.parse_args()
    sink_topics = list(dict.fromkeys(t for t in args.sink_topics.split(",") if t))
    result = asyncio.run(run(args.bootstrap, args.source, args.target, args.records, sink_topics))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
