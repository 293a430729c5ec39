"""(a) The raw pipeline, no framework: aiokafka consume → orjson → fastjsonschema → SHA-256 →
produce, batch by batch. The yardstick the others are compared with. Prints one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time

import fastjsonschema
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import machine_busy_seconds, process_figures
from ingest_stream.config import Settings


async def run(bootstrap: str, source: str, target: str, expected: int) -> dict[str, float]:
    schema = orjson.loads((Settings().schema_dir / "input.schema.json").read_bytes())
    validate = fastjsonschema.compile(schema)
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id="bench-raw",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_poll_records=2000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all",
                                max_batch_size=256 * 1024)
    await consumer.start()
    await producer.start()
    done, started, cpu_started, machine_started = 0, 0.0, 0.0, 0.0
    try:
        while done < expected:
            batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
            if not batches:
                continue
            if not started:
                started, cpu_started = time.monotonic(), time.process_time()
                machine_started = machine_busy_seconds()
            deliveries = []
            for records in batches.values():
                for record in records:
                    document = orjson.loads(record.value)
                    validate(document)
                    key = hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()
                    deliveries.append(await producer.send(target, value=record.value, key=key.encode()))
                    done += 1
            await asyncio.gather(*deliveries)
            await consumer.commit()
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu_started
        machine = machine_busy_seconds() - machine_started
    finally:
        await producer.stop()
        await consumer.stop()
    return {"records": done, "seconds": elapsed, "cpu_seconds": cpu, "machine_busy_seconds": machine,
            **process_figures()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--records", type=int, required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args.bootstrap, args.source, args.target, args.records))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
