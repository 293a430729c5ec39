"""`ingest-stream produce`: send input records from a JSONL file, or synthetic ones, to a source topic."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from ingest_stream.config import Settings
from ingest_stream.core.record import record_key
from ingest_stream.core.timefmt import format_rfc3339

log = logging.getLogger(__name__)


def synthetic_records(count: int, *, seed: int = 1, tenants: int = 3, entities: int = 1000,
                      source: str = "kafka", tenant_prefix: str = "tenant",
                      stamp_now: bool = False) -> Iterator[dict[str, Any]]:
    """Valid v2 records over a fixed set of entities; each entity's revisions grow in order.

    Event times are one second apart, ending now; with `stamp_now` each record's event time is the
    moment it is generated (for measuring source-to-sink latency of a paced stream)."""
    rng = random.Random(seed)
    revisions: dict[tuple[int, int], int] = {}
    start = datetime.now(UTC) - timedelta(seconds=count)
    for n in range(count):
        entity = (rng.randrange(tenants), rng.randrange(entities))
        revisions[entity] = revisions.get(entity, -1) + 1
        yield {
            "schema_version": 2, "tenant": f"{tenant_prefix}-{entity[0]}", "source": source,
            "id": f"doc-{entity[1]}", "revision": revisions[entity],
            "event_time": format_rfc3339(datetime.now(UTC) if stamp_now else start + timedelta(seconds=n)),
            "priority": rng.choice(("high", "normal", "normal", "low")), "kind": "document",
            "attributes": {"title": f"document {entity[1]} rev {revisions[entity]}",
                           "body": "lorem ipsum " * rng.randint(1, 8)},
            "links": [{"rel": "CITES", "to": f"doc-{rng.randrange(entities)}"}],
        }


def jsonl_records(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip(b"\n")


async def produce(settings: Settings, values: Iterable[bytes], *, topic: str,
                  rate: float | None = None, progress_every: int = 10_000) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5,
                                enable_idempotence=False, acks="all")
    try:
        await producer.start()
    except BaseException:
        await producer.stop()  # a producer that never started still holds its client
        raise
    sent = 0
    started = time.monotonic()
    try:
        pending = []
        for value in values:
            pending.append(await producer.send(topic, value=value, key=record_key(value)))
            sent += 1
            if rate:
                delay = started + sent / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if sent % progress_every == 0:
                await asyncio.gather(*pending)
                pending.clear()
                print(f"produced {sent} record(s) to {topic}", file=sys.stderr)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent
