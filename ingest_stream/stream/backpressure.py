"""Backpressure, wired: a timer measures the lag of every consumed topic, feeds the state machine
(`core/backpressure.py`), exports the gauges, and pauses fetching where the state says so. The
source agents ask it to pace batches (throttled) and whether a record is kept (brownout); every
agent waits here while paused.
"""

from __future__ import annotations

import asyncio
import logging
import random as random_module
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import faust

from ingest_stream.config import SOURCES, Settings
from ingest_stream.core.backpressure import Backpressure, Lag, State
from ingest_stream.core.files import S3Location, SftpLocation, parse_locations, parse_sftp_locations
from ingest_stream.core.tokenbucket import TokenBucket
from ingest_stream.metrics import Metrics
from ingest_stream.ops.lag import LagProbe, PartitionLag
from ingest_stream.stream import faust_internals
from ingest_stream.stream.consumer_batches import BatchDrainConsumer

log = logging.getLogger(__name__)


class BackpressureController:
    def __init__(self, app: faust.App, settings: Settings, metrics: Metrics, *,
                 clock: Callable[[], float] = time.monotonic,
                 random: Callable[[], float] = random_module.random) -> None:
        self._app = app
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._random = random
        self.machine = Backpressure(settings.backpressure, clock())
        rate = settings.backpressure.throttle_rate
        self._bucket = TokenBucket(rate, burst=max(1.0, rate))
        # Intake (webhook) has its own bucket: a record should not pay twice, at intake and processing.
        self._intake_bucket = TokenBucket(rate, burst=max(1.0, rate))
        self.disabled: set[str] = set(settings.sources.disabled)
        self.source_topics = {settings.source_topic(s): s for s in SOURCES}
        self.sink_topics = {settings.sink_topic(s): s for s in settings.sinks}
        self.lags: list[PartitionLag] = []
        self.adapter_health: dict[str, dict[str, Any]] = {}  # per source, kept by its adapter
        self._locations: dict[str, Sequence[S3Location | SftpLocation]] = {
            "s3": parse_locations(settings.sources.s3_sources),
            "sftp": parse_sftp_locations(settings.sources.sftp_sources)}
        self.measured_at: float | None = None  # time.time() of the last lag measurement
        self.sink_slots = asyncio.Semaphore(settings.sink.max_concurrent_writes)
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._probe: LagProbe | None = None
        self._measuring = asyncio.Lock()
        self._paused_by_us: set[Any] = set()
        self._pending: set[asyncio.Future[None]] = set()
        self._client_held: set[str] | None = None  # what the Kafka client was last told to hold
        metrics.backpressure_state.set(self.machine.state.gauge)

    # --- the timer ------------------------------------------------------------------------------
    async def tick(self) -> None:
        await self.measure()
        before = self.machine.state
        self.machine.observe(self._clock(), worst_lag(self.lags, exclude=self.not_driving()))
        if self.machine.state is not before:
            log.warning("backpressure %s -> %s: %s", before.value, self.machine.state.value,
                        self.machine.reason)
        await self.apply()

    async def measure(self) -> list[PartitionLag]:
        """The consumer group's lag on every topic it consumes, now, into `lags` and the gauges
        (the timer's, and the lanes' after a rebalance). Always the same topics: the probe's
        consumer keeps metadata only for the topics it was last assigned."""
        async with self._measuring:  # one probe consumer: its seeks and reads must not interleave
            if self._probe is None:
                self._probe = LagProbe(self._settings.kafka_bootstrap, self._settings.app_id)
                await self._probe.start()
            self.lags = await self._probe.measure([*self.source_topics, *self.sink_topics])
        self.measured_at = time.time()
        for lag in self.lags:
            self._metrics.consumer_lag_records.labels(lag.topic, str(lag.partition)).set(lag.records)
            self._metrics.consumer_lag_seconds.labels(lag.topic, str(lag.partition)).set(lag.seconds)
        return self.lags

    def known_ends(self) -> dict[tuple[str, int], int]:
        """End offsets as the last lag measurement saw them (records read past the high watermark
        included)."""
        return {(lag.topic, lag.partition): lag.end for lag in self.lags}

    async def stop(self) -> None:
        if self._probe is not None:
            await self._probe.stop()

    async def apply(self, *, assignment_changed: bool = False) -> None:
        """Make the state take effect: gauge, fetching paused or resumed, agents held or let go."""
        state = self.machine.state
        self._metrics.backpressure_state.set(state.gauge)
        if state is State.PAUSED:
            self._resumed.clear()
        else:
            self._resumed.set()
        held = self.held_topics()
        consumer = self._app.consumer
        assigned = set(consumer.assignment())
        pause = {tp for tp in assigned if tp.topic in held}
        resume = self._paused_by_us - pause
        if pause:
            consumer.pause_partitions(pause)
        if resume:
            consumer.resume_partitions(resume & assigned)
        self._paused_by_us = pause
        if assignment_changed or held != self._client_held:  # the consumer thread's queue is slow
            await self._pause_in_client(held)
            self._client_held = held

    def apply_soon(self) -> None:
        """`apply` for a new assignment, as a task: inside a rebalance the consumer thread is busy."""
        task = asyncio.ensure_future(self.apply(assignment_changed=True))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _pause_in_client(self, held: set[str]) -> None:
        """Faust's pause only stops it asking for a partition's records; aiokafka still fetches and
        buffers them. aiokafka's own client is paused too (`faust_internals.pause_in_client`)."""
        await faust_internals.pause_in_client(self._app.consumer, held)

    def guard_resumes(self) -> None:
        """Faust resumes every assigned partition when a rebalance's recovery completes, which would
        undo a drain, pause or disabled source until the next tick: filter held topics out of its
        resumes (`BatchDrainConsumer.resume_partitions`). Called whenever partitions are assigned
        (before recovery resumes); calling it again changes nothing."""
        consumer = self._app.consumer
        if isinstance(consumer, BatchDrainConsumer):
            consumer.hold_from_resumes(self.held_topics)

    def held_topics(self) -> set[str]:
        """Topics not fetched now: on purpose, so not a stall."""
        held = set(self.disabled_topics())
        if not self.machine.fetching:
            held |= set(self.source_topics)
        if self.machine.state is State.PAUSED:
            held |= set(self.sink_topics)
        return held

    def not_driving(self) -> list[str]:
        """Topics whose lag does not move the state: disabled sources, and the sink topics. What a
        sink topic holds (spills, redrives) waits there durably; slowing the intake would not make
        that sink faster, only slow the others (contract §1, step 5). A slow sink moves the state
        while it is written in process: its batches hold the source's acks, so the source topic's
        lag grows, until its lane spills. (A sink topic's lag counted once its lane was back in
        process moved the state at once: committed offsets trail the agent's acks by up to
        `INGEST_COMMIT_INTERVAL_S`, and its first uncommitted record was as old as the outage.)"""
        return [*self.disabled_topics(), *self.sink_topics]

    def disabled_topics(self) -> list[str]:
        return [t for t, s in self.source_topics.items() if s in self.disabled]

    # --- what the agents ask -----------------------------------------------------------------
    async def pace(self, records: int, *, source: bool) -> None:
        """Before a batch: wait while paused; a source batch waits for tokens while throttled."""
        await self._resumed.wait()
        if source and self.machine.state is State.THROTTLED:
            await asyncio.sleep(self._bucket.reserve(self._clock(), records))

    def input_retry_after(self, records: int) -> float | None:
        """For adapters taking records in (webhook): None to accept, else seconds to come back.
        Drain and pause take nothing new; throttled admits at the token bucket's rate."""
        state = self.machine.state
        if state in (State.DRAIN, State.PAUSED):
            return 30.0
        if state is State.THROTTLED:
            wait = self._intake_bucket.take(self._clock(), records)
            return wait if wait > 0 else None
        return None

    def keeps(self, source: str, priority: str) -> bool:
        if self.machine.keeps(priority, self._random()):
            return True
        self._metrics.brownout_dropped.labels(source).inc()
        return False

    # --- operators ------------------------------------------------------------------------------
    async def override(self, state: State, *, who: str, rate: float | None = None) -> None:
        """drain / paused / brownout by hand (ValueError for anything else or a bad rate)."""
        self.machine.override(self._clock(), state, who=who, rate=rate)
        log.warning("backpressure %s set by %s (rate %s)", state.value, who, rate)
        await self.apply()

    async def resume(self, *, who: str) -> None:
        self.machine.resume(self._clock(), who=who)
        log.warning("backpressure resumed by %s", who)
        await self.apply()

    async def set_source_enabled(self, source: str, enabled: bool) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
        (self.disabled.discard if enabled else self.disabled.add)(source)
        await self.apply()

    def adapters(self) -> dict[str, dict[str, Any]]:
        """Per adapter, by name: its kind, source topic (lag in records and seconds), enabled, and
        what its adapter keeps. Each S3/SFTP location is an adapter of its own (`s3-main`, …: the
        names of INGEST_S3_SOURCES / INGEST_SFTP_SOURCES); a kind without a location is listed by
        its kind (records can be written to its topic directly)."""
        found: dict[str, dict[str, Any]] = {}
        for topic, source in self.source_topics.items():
            mine = [lag for lag in self.lags if lag.topic == topic]
            health = dict(self.adapter_health.get(source, {}))
            per_location = health.pop("locations", {})
            common = {
                "kind": source,
                "topic": topic,
                "enabled": source not in self.disabled,
                "lag_records": sum(lag.records for lag in mine),
                "lag_seconds": round(max((lag.seconds for lag in mine), default=0.0), 3),
                **health,
            }
            located = self._locations.get(source, [])
            if not located:
                found[source] = common
            for location in located:
                found[location.name] = {**common, "location": location.label, "tenant": location.tenant,
                                        **per_location.get(location.name, {})}
        return found

    def status(self) -> dict[str, Any]:
        m = self.machine
        return {
            "state": m.state.value,
            "since_s_ago": round(self._clock() - m.since, 1),
            "reason": m.reason,
            "overridden": m.overridden,
            "brownout_rate": m.brownout_rate,
            "throttle_rate": self._settings.backpressure.throttle_rate,
            "worst_lag": _lag_dict(worst_lag(self.lags, exclude=self.not_driving())),
            "held_topics": sorted(self.held_topics()),
        }


def worst_lag(lags: Sequence[PartitionLag], *, exclude: Collection[str] = ()) -> Lag:
    """The pipeline's lag: the largest per-topic backlog in records, the oldest waiting record."""
    per_topic: dict[str, int] = {}
    seconds = 0.0
    for lag in lags:
        if lag.topic in exclude:
            continue
        per_topic[lag.topic] = per_topic.get(lag.topic, 0) + lag.records
        seconds = max(seconds, lag.seconds)
    return Lag(records=max(per_topic.values(), default=0), seconds=seconds)


def _lag_dict(lag: Lag) -> dict[str, float]:
    return {"records": lag.records, "seconds": round(lag.seconds, 3)}
