"""The in-process fan-out: one lane per sink between the processing agents and the sink.

The processing agents hand each validated batch to every sink's lane (`submit`) and ack the source
batch once every lane has settled its part: written (dead letters included) or spilled to the sink
topic and acknowledged by the broker. A lane is one ordered queue with one task that takes its
parts in order, so per-entity order holds across modes: it writes them through the sink agent's
processor (`SinkProcessor.write_direct`), or spills them to `ingest.sink.<name>` — into the
partition numbered as the source partition, which Faust's co-partitioning assigns to this worker
with it — where the sink agent drains them. When to do which is `core/lanes.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from faust.types import TP, EventT

from ingest_stream.core.admission import Forward
from ingest_stream.core.breaker import CircuitState
from ingest_stream.core.lanes import CpuShare, Lane, LaneMode, LanePolicy, shares
from ingest_stream.metrics import Metrics
from ingest_stream.sinks.base import Write
from ingest_stream.stream import faust_internals
from ingest_stream.stream.producer_batches import RecordBatches
from ingest_stream.stream.sink_agent import SinkProcessor

log = logging.getLogger(__name__)

SWITCH_POLL_S = 0.02  # how often a switching lane looks whether the sink agent has drained its topic
IDLE_POLL_S = 0.5  # how often an idle lane that is not in process looks whether it may be again
CPU_WINDOW_S = 2.0  # the worker's CPU use a slow lane's spill looks at: over this long (core/lanes.py)


@dataclass(frozen=True, slots=True)
class LaneRecord:
    """A validated record as the processing agent hands it over, with what a spill sends."""

    write: Write
    event: EventT[Any]  # the source event: a dead letter is taken from it
    forward: Forward  # what a spill sends: its canonical bytes and headers

    @property
    def partition(self) -> int:
        return self.event.message.partition

    @property
    def key(self) -> bytes:
        """The sink topic's message key: the entity's (worked out only for a spill)."""
        return self.write.key.encode()


@dataclass(slots=True)
class _Part:
    records: Sequence[LaneRecord]
    queued_at: float
    settled: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def worker_cpu_share() -> CpuShare:
    """The worker process's CPU use over the last `CPU_WINDOW_S`: one sampler, shared by its lanes."""
    return CpuShare(CPU_WINDOW_S, clock=time.monotonic, cpu=time.process_time)


class SinkLane:
    def __init__(self, processor: SinkProcessor, *, topic: str, policy: LanePolicy, metrics: Metrics,
                 producer: Callable[[], AIOKafkaProducer], acked: Mapping[Any, int], batch_size: int,
                 cpu: CpuShare, clock: Callable[[], float] = time.monotonic) -> None:
        self.processor = processor
        self.name = processor.sink.name
        self.topic = topic
        self._producer = producer
        self._acked = acked  # TP -> one past the highest offset an agent acked (the sink agent's)
        self._committed: dict[int, int] = {}  # partition -> the group's committed offset, measured
        self._batch_size = batch_size
        self._writers = max(1, processor.sink.sink.parallel_batches)
        self._clock = clock
        self._cpu = cpu  # the worker's, shared with the other lanes
        self.lane = Lane(policy, now=clock())
        self._queue: deque[_Part] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._partitions: list[int] | None = None  # the sink topic's, once known
        self.peers: list[SinkLane] = []  # the other sinks' lanes (set by the wiring)
        self._state = metrics.sink_lane_state.labels(self.name)
        self._spilled = metrics.sink_spilled.labels(self.name)
        self._reported = self.lane.mode
        self._state.set(self.lane.mode)

    # --- what the processing agents and the wiring call ----------------------------------------
    def submit(self, records: Sequence[LaneRecord]) -> asyncio.Future[None]:
        """Queue a batch's records; the future settles once they are written or spilled, and
        raises what should stop the worker (the broker refused a send, the sink is broken)."""
        if self._failure is not None:
            raise self._failure
        part = _Part(records, self._clock())
        if not records:
            part.settled.set_result(None)
            return part.settled
        self._queue.append(part)
        self._wake.set()
        self.start()
        return part.settled

    def start(self) -> None:
        """The lane's task (from the first batch on, or at assignment: an idle lane switches back too)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def assign(self, partitions: Sequence[int]) -> None:
        self.lane.assign(partitions, now=self._clock())
        self._report()
        self.start()
        self._wake.set()

    def measured(self, ends: Mapping[int, int], committed: Mapping[int, int]) -> None:
        """A lag measurement of the sink topic (the backpressure timer's, or one after `assign`)."""
        self._committed.update(committed)
        self.lane.measured(ends)
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def status(self) -> dict[str, Any]:
        backlog = self.lane.backlog(self._done())
        return {"mode": self.lane.mode.label, "reason": self.lane.reason,
                "since_s": round(self._clock() - self.lane.since, 1),
                "queued_batches": len(self._queue), "spilled_backlog": backlog}

    # --- the lane's task --------------------------------------------------------------------------
    async def _run(self) -> None:
        taken: list[_Part] = []
        try:
            while True:
                if not self._queue and self.lane.mode is LaneMode.DIRECT:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                head_wait = self.head_wait()
                behind = head_wait - min((peer.head_wait() for peer in self.peers), default=0.0)
                mode = self.lane.decide(sink_ok=self._sink_ok(), head_wait_s=head_wait, behind_s=behind,
                                        busy=self._cpu.share(), done=self._done(), now=self._clock())
                self._report()
                if not self._queue or mode is LaneMode.SWITCHING:
                    # Idle, or holding while the sink agent writes the last spills: look again soon.
                    self._wake.clear()
                    poll_s = SWITCH_POLL_S if self._queue else IDLE_POLL_S
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), poll_s)
                    continue
                if mode is LaneMode.DIRECT:
                    taken = self._take(self._batch_size * self._writers)
                    await self._write(taken)
                else:
                    taken = self._take(None)
                    await self._spill([r for part in taken for r in part.records])
                _settle(taken)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every waiting batch must learn it: its agent stops the worker
            self._failure = exc
            log.error("sink %s: the lane stopped: %r", self.name, exc)
            for part in [*taken, *self._queue]:
                if not part.settled.done():
                    part.settled.set_exception(exc)
            self._queue.clear()
            raise

    def _take(self, limit: int | None) -> list[_Part]:
        """The oldest parts, in order: up to `limit` records (at least one part), or all."""
        parts = [self._queue.popleft()]
        size = len(parts[0].records)
        while self._queue and (limit is None or size + len(self._queue[0].records) <= limit):
            part = self._queue.popleft()
            parts.append(part)
            size += len(part.records)
        return parts

    async def _write(self, parts: list[_Part]) -> None:
        """Write the parts' records in process: in up to `parallel_batches` batches side by side,
        each entity's records in one of them (entity order holds), all settled before the next.
        What an outage left unwritten is spilled, in order."""
        records = [r for part in parts for r in part.records]
        batches = shares(records, key=_entity, batch_size=self._batch_size, parallel=self._writers)
        results = await asyncio.gather(*(self.processor.write_direct([(r.write, r.event) for r in batch])
                                         for batch in batches), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        unwritten = [w for result in results if not isinstance(result, BaseException) for w in result]
        if unwritten:
            error = self.processor.sink.last_error
            self.lane.failed(str(error) if error else "sink down", now=self._clock())
            self._report()
            log.warning("sink %s: %d record(s) not written in process (%s): spilling to %s",
                        self.name, len(unwritten), error, self.topic)
            left = {id(w) for w in unwritten}
            await self._spill([r for r in records if id(r.write) in left])

    async def _spill(self, records: Sequence[LaneRecord]) -> None:
        """Produce to the sink topic and wait for the broker; then its agent owns them."""
        producer = self._producer()
        batches = RecordBatches(producer)
        partitions = await self._sink_partitions(producer)
        for record in records:
            partition = record.partition if record.partition in partitions else None
            forward = record.forward
            await batches.add(self.topic, record.key, forward.encoded, forward.headers, partition=partition)
        sent = await batches.send()
        for batch in sent:
            self.lane.spilled(batch.partition, await batch.last_offset() + 1)
        self._spilled.inc(len(records))

    async def _sink_partitions(self, producer: AIOKafkaProducer) -> list[int]:
        if self._partitions is None:
            await faust_internals.wait_on_metadata(producer, self.topic)
            self._partitions = sorted(faust_internals.partitions_for_topic(producer, self.topic))
        return self._partitions

    def _sink_ok(self) -> bool:
        sink = self.processor.sink
        return sink.breaker.state(sink.now()) is CircuitState.CLOSED and not sink.busy

    def head_wait(self) -> float:
        """How long the oldest queued batch has waited (0 when none waits)."""
        return self._clock() - self._queue[0].queued_at if self._queue else 0.0

    def _done(self) -> dict[int, int]:
        """How far the sink agent has written, per partition: its acks here, or the group's commits."""
        done = dict(self._committed)
        for partition in self.lane.need:
            acked = self._acked.get(TP(self.topic, partition))
            if acked is not None and acked > done.get(partition, 0):
                done[partition] = acked
        return done

    def _report(self) -> None:
        mode = self.lane.mode
        if mode is not self._reported:
            log.warning("sink %s: lane %s -> %s (%s)", self.name, self._reported.label, mode.label,
                        self.lane.reason)
            self._reported = mode
            self._state.set(mode)


def _entity(record: LaneRecord) -> str:
    return record.write.key


def _settle(parts: list[_Part]) -> None:
    for part in parts:
        if not part.settled.done():
            part.settled.set_result(None)

