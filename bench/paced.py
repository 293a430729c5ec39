"""The paced stages' producer: records at a steady rate, at little CPU.

The latency run, the soak and the outage stage offer records at a rate and measure the worker, on
the cores the worker, the broker and the sink servers share. `ingest_stream.ops.produce` (aiokafka,
one `send` and one sleep per record) took 0.28 of a core at 6,400 records/s: CPU the stage under
test did not get. This one hands the records due every `TICK_S` to librdkafka (confluent-kafka),
which batches and sends them on its own thread: 0.11-0.14 of a core at that rate. Keys as `produce`
keys them (the entity, `record_key`), partitioned by murmur2 like aiokafka and Java clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from confluent_kafka import Producer

from ingest_stream.core.record import record_key

TICK_S = 0.005  # records are handed over in bursts this far apart: well below the latencies measured
FLUSH_TIMEOUT_S = 120.0


def produce_paced(bootstrap: str, values: Iterable[bytes], *, topic: str, rate: float,
                  linger_ms: float = 5.0) -> int:
    """Produce `values` to `topic` at `rate` records/s, each partition's records batched over up to
    `linger_ms`; returns how many, once the broker has acknowledged all of them (raises if it
    refused any)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": linger_ms, "acks": "all",
                         "enable.idempotence": False, "partitioner": "murmur2_random",
                         "queue.buffering.max.messages": 1_000_000})
    failures: list[str] = []

    def delivered(error: object, _message: object) -> None:
        if error is not None:
            failures.append(str(error))

    records = iter(values)
    sent = 0
    started = time.monotonic()
    exhausted = False
    while not exhausted:
        due = int((time.monotonic() - started) * rate) + 1
        while sent < due:
            value = next(records, None)
            if value is None:
                exhausted = True
                break
            _produce(producer, topic, value, delivered)
            sent += 1
        producer.poll(0)
        if not exhausted:
            time.sleep(TICK_S)
    left = producer.flush(FLUSH_TIMEOUT_S)
    if left or failures:
        raise RuntimeError(f"{topic}: {left} record(s) not acknowledged after {FLUSH_TIMEOUT_S:.0f}s, "
                           f"{len(failures)} refused{f' (first: {failures[0]})' if failures else ''}")
    return sent


def _produce(producer: Producer, topic: str, value: bytes, delivered: Callable[[object, object], None]
             ) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=record_key(value), on_delivery=delivered)
            return
        except BufferError:  # librdkafka's queue is full: let it send, then hand the record over
            producer.poll(0.05)
