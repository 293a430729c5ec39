"""The Faust app: settings → topics, tables, agents, timers and web views. Wiring only."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import faust
import mode
from faust.types import EventT

from ingest_stream.config import SOURCES, Settings, unknown_names
from ingest_stream.core.audit import IngestAudit
from ingest_stream.core.breaker import CircuitBreaker
from ingest_stream.core.dlq import RECORD_OVERHEAD_BYTES
from ingest_stream.core.schemas import RecordValidator
from ingest_stream.core.stall import StallDetector
from ingest_stream.metrics import LAG_BUCKETS_S, Metrics
from ingest_stream.ops.lag import PartitionLag
from ingest_stream.sinks.guarded import GuardedSink
from ingest_stream.sinks.registry import build_sink
from ingest_stream.stream.admin import AUDIT_FILE as ADMIN_AUDIT_FILE
from ingest_stream.stream.admin import AuditTrail, install_admin_routes
from ingest_stream.stream.backpressure import BackpressureController
from ingest_stream.stream.consumer_batches import BatchStream, IngestApp
from ingest_stream.stream.dlq import DeadLetters
from ingest_stream.stream.faust_internals import aiokafka_producer, recovery_state, track_produced_topics
from ingest_stream.stream.lanes import SinkLane, worker_cpu_share
from ingest_stream.stream.sink_agent import SinkProcessor
from ingest_stream.stream.source_agent import SourceProcessor
from ingest_stream.stream.sources import install_file_sources
from ingest_stream.stream.tables import (
    STORE_URL,
    SourceTables,
    block_cache_bytes,
    declare_tables,
    evict_expired,
    memtable_bytes,
)
from ingest_stream.stream.topics import Topics, declare_topics
from ingest_stream.stream.views import install_views
from ingest_stream.stream.watchdog import install_watchdog
from ingest_stream.stream.webhook import install_webhook

log = logging.getLogger(__name__)
# Records of batches whose sink writes may run while an agent handles the next ones (its memory
# bound). Acks are in order, so a slow sink's lane holds the oldest batch; the window lets the other
# lanes go on meanwhile, until the slow one spills (INGEST_SINK_LANE_MAX_WAIT_S). In a backlog
# every lane's oldest batch waits about window/rate, which must stay below that bound or every lane
# spills for nothing (20,000 records did, at 1 s). With 4 batches, a Typesense answering at a
# fifth of its speed held Postgres's p50 latency at 15 s; with this window and a 2 s bound, 0.16 s
# (p95 1.7 s): docs/design.md.
IN_FLIGHT_RECORDS = 10_000
# Handles a batch; may return what is left before the batch may be acked (waiting on the broker),
# which the agent overlaps with the next batch.
BatchHandler = Callable[[list[EventT[Any]]], Awaitable[Awaitable[None] | None]]
InFlight = deque[tuple[asyncio.Future[None], list[EventT[Any]]]]  # an agent's batches, acked in order


@dataclass
class Pipeline:
    """Everything the agents and views share, built once per app."""

    settings: Settings
    metrics: Metrics
    topics: Topics
    sinks: dict[str, GuardedSink]
    stalls: StallDetector
    backpressure: BackpressureController
    audit: IngestAudit
    tables: dict[str, SourceTables]
    admin_actions: AuditTrail
    lanes: dict[str, SinkLane]
    consuming: bool = False  # partitions assigned at least once: the worker has joined its group


def faust_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "broker": f"kafka://{settings.kafka_bootstrap}",
        "store": STORE_URL,
        "datadir": str(settings.data_dir),
        "web_port": settings.web.port,
        "web_bind": settings.web.host,
        "topic_partitions": settings.partitions,
        "table_standby_replicas": settings.table_standby_replicas,
        "producer_linger": settings.producer_linger_ms / 1000,
        "producer_acks": -1,
        "producer_max_request_size": settings.max_message_bytes + RECORD_OVERHEAD_BYTES,
        "broker_commit_interval": settings.commit_interval_s,
        "consumer_auto_offset_reset": "earliest",
        "stream_buffer_maxsize": 16384,
        "recovery_consistency_check": settings.recovery_consistency_check,
        # stream_wait_empty stays on (Faust's default): it also makes a rebalance wait for in-flight
        # batches to finish and ack before partitions move, the safer order for our manual acks.
        # An agent that raises leaves unacked records behind it: stop the worker, don't limp on.
        "agent_supervisor": mode.CrashingSupervisor,
        # Bodies past the webhook limit get our own 413 (with a message), not aiohttp's.
        "web_application_options": {"client_max_size": settings.sources.webhook_max_body_bytes + 1},
    }
    if settings.kafka_session_timeout_s is not None:
        options["broker_session_timeout"] = settings.kafka_session_timeout_s
        options["broker_heartbeat_interval"] = min(3.0, settings.kafka_session_timeout_s / 4)
    return options


def create_app(settings: Settings, metrics: Metrics | None = None) -> faust.App:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Typesense request
    for name in unknown_names(os.environ):
        log.warning("%s is not a setting: ignored (ingest-stream config lists them all)", name)
    app = IngestApp(settings.app_id, Stream=BatchStream,
                    fetch_max_wait_ms=settings.consumer_fetch_max_wait_ms, **faust_options(settings))
    metrics = metrics or Metrics(tenant_limit=settings.tenant_metrics_limit)
    topics = declare_topics(app, settings)
    tables = declare_tables(app, settings)
    metrics.rocksdb_block_cache.set_function(lambda: block_cache_bytes(settings))
    every_table = [t for pair in tables.values() for t in (pair.dedupe, pair.checkpoints)]
    metrics.rocksdb_memtables.set_function(lambda: memtable_bytes(every_table))
    validator = RecordValidator.from_directory(
        settings.schema_dir, max_record_bytes=settings.max_record_bytes)
    source_topics = frozenset(settings.source_topic(source) for source in SOURCES)
    audit = IngestAudit(LAG_BUCKETS_S)
    dead_letters = DeadLetters(topics.dlq, metrics, audit, clock=lambda: datetime.now(UTC),
                               source_topics=source_topics, max_letter_bytes=settings.max_letter_bytes)
    sinks = {
        name: GuardedSink(build_sink(name, settings), metrics=metrics, backoff=settings.sink_retry,
                          failure_policy=settings.sink.failure_policy,
                          timeout_s=settings.sink.timeout_s, breaker=CircuitBreaker(settings.breaker))
        for name in settings.sinks
    }
    backpressure = BackpressureController(app, settings, metrics)
    stalls = StallDetector(settings.stall_timeout_s)
    acked: dict[Any, int] = {}  # TP -> one past the highest offset an agent acked (watchdog, lanes)
    in_flight: dict[str, InFlight] = {}  # agent -> its batches waiting to settle (logged at a stall)
    sink_processors = {
        name: SinkProcessor(guarded, validator=validator, dead_letters=dead_letters, metrics=metrics,
                            audit=audit, gate=backpressure, source_topics=source_topics)
        for name, guarded in sinks.items()}
    worker_cpu = worker_cpu_share()
    lanes = {name: SinkLane(processor, topic=topics.sinks[name].get_topic_name(), policy=settings.lanes,
                            metrics=metrics, producer=lambda: aiokafka_producer(app), acked=acked,
                            batch_size=settings.sink.batch_size, cpu=worker_cpu)
             for name, processor in sink_processors.items()}
    for lane in lanes.values():
        lane.peers = [other for other in lanes.values() if other is not lane]
    pipeline = Pipeline(settings, metrics, topics, sinks, stalls, backpressure, audit, tables,
                        AuditTrail(settings.data_dir / ADMIN_AUDIT_FILE), lanes)
    app.pipeline = pipeline  # type: ignore[attr-defined]

    # Every topic this worker writes to: sink topics, the DLQ, table changelogs, and the source
    # topics its adapters write (the webhook, S3, SFTP): a webhook request hung here, once, on a
    # source topic the producer's metadata had dropped (faust_internals.track_produced_topics).
    written = (*topics.sinks.values(), topics.dlq, *topics.sources.values())
    produced = [t.get_topic_name() for t in written] + [
        table.changelog_topic.get_topic_name()
        for pair in tables.values() for table in (pair.dedupe, pair.checkpoints)]
    for source in SOURCES:
        processor = SourceProcessor(
            source, app=app, settings=settings, validator=validator, tables=tables[source],
            lanes=list(lanes.values()), source_topics=source_topics,
            dead_letters=dead_letters, metrics=metrics, audit=audit, gate=backpressure)
        _agent(app, f"process-{source}", topics.sources[source], processor.process,
               settings.source_batch_size, settings.batch_within_s, produced, acked, in_flight)
        _eviction_timer(app, settings, source, tables[source].dedupe, metrics)

    for name, sink_processor in sink_processors.items():
        _agent(app, f"sink-{name}", topics.sinks[name], sink_processor.process,
               settings.sink.batch_size, settings.batch_within_s, produced, acked, in_flight)

    install_watchdog(
        app, settings, acked=acked,
        consumed={t.get_topic_name() for t in (*topics.sources.values(), *topics.sinks.values())},
        sinks_by_topic={topics.sinks[name].get_topic_name(): sink for name, sink in sinks.items()},
        detector=pipeline.stalls, held=backpressure.held_topics, known_ends=backpressure.known_ends,
        describe=lambda: {"agents": {name: _in_flight_state(batches) for name, batches in in_flight.items()
                                     if batches},
                          "lanes": {name: lane.status() for name, lane in lanes.items()},
                          "recovery": recovery_state(app)})
    _backpressure_timer(app, settings, backpressure, lanes)
    install_views(app, pipeline)
    install_admin_routes(app, settings, backpressure, pipeline.admin_actions)
    install_webhook(app, settings, topics.sources["webhook"], backpressure, metrics)
    install_file_sources(app, settings, topics.sources, backpressure, metrics)
    return app


def _in_flight_state(batches: InFlight) -> dict[str, Any]:
    oldest = batches[0][0]
    return {"batches": len(batches), "records": sum(len(events) for _, events in batches),
            "oldest_settled": oldest.done(), "oldest_partitions": sorted(
                {f"{e.message.topic}[{e.message.partition}]" for e in batches[0][1]})}


def _agent(app: faust.App, name: str, topic: faust.TopicT, handle: BatchHandler, batch: int,
           within_s: float, produced: list[str], acked: dict[Any, int], agents: dict[str, InFlight],
           ) -> None:
    """An agent that takes batches without acking and acks a batch only once everything it caused
    is durable, so its offsets may be committed.

    What `handle` leaves to wait for (the broker's acknowledgements, the sinks' lanes) runs while
    the next batches are handled: up to `IN_FLIGHT_RECORDS`, settled and acked in order, and all
    of them before the agent waits for records (so an idle agent or a rebalance waiting for acks
    never waits on it)."""
    async def agent(stream: faust.StreamT[Any]) -> None:
        await track_produced_topics(app, produced)
        in_flight: InFlight = deque()
        agents[name] = in_flight  # a restarted agent's replaces its old one
        records_in_flight = 0

        def ack(events: list[EventT[Any]]) -> None:
            for tp, offset in stream.ack_batch(events).items():  # type: ignore[attr-defined]
                acked[tp] = max(acked.get(tp, 0), offset)

        async def settle(keep_records: int = 0) -> None:
            nonlocal records_in_flight
            while in_flight and records_in_flight > keep_records:
                rest, events = in_flight[0]
                await rest  # raises if the broker refused: the agent crashes, nothing is acked
                in_flight.popleft()
                records_in_flight -= len(events)
                ack(events)

        async for events in stream.unacked_batches(  # type: ignore[attr-defined]
                batch, within_s, before_waiting=settle):
            rest = await handle(events)
            if rest is None and not in_flight:
                ack(events)
                continue
            in_flight.append((asyncio.ensure_future(rest or _nothing()), events))
            records_in_flight += len(events)
            await settle(keep_records=IN_FLIGHT_RECORDS)  # the oldest first: acks stay in order

    agent.__name__ = name.replace("-", "_")
    app.agent(topic, name=name)(agent)


async def _nothing() -> None:
    return None


def _eviction_timer(
    app: faust.App, settings: Settings, source: str, table: faust.types.TableT[str, str],
    metrics: Metrics,
) -> None:
    topic_name = settings.source_topic(source)
    evicted = metrics.dedupe_evicted.labels(source)

    async def evict() -> None:
        owned = [tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic_name]
        evicted.inc(await evict_expired(table, now_ms=int(time.time() * 1000),
                                        ttl_ms=settings.dedupe_ttl_s * 1000, partitions=owned))

    evict.__name__ = f"evict_dedupe_{source}"
    app.timer(settings.dedupe_evict_interval_s)(evict)


def _backpressure_timer(app: faust.App, settings: Settings, controller: BackpressureController,
                        lanes: dict[str, SinkLane]) -> None:
    by_topic = {lane.topic: lane for lane in lanes.values()}

    def tell_lanes(lags: list[PartitionLag]) -> None:
        """How far each sink topic is written (committed) and where it ends, for the lanes."""
        for topic, lane in by_topic.items():
            mine = [lag for lag in lags if lag.topic == topic]
            lane.measured({lag.partition: lag.end for lag in mine},
                          {lag.partition: lag.committed for lag in mine if lag.committed is not None})

    async def measure_lag_and_apply_backpressure() -> None:
        try:
            await controller.tick()
        except Exception:  # a failed measurement must not end the timer; the next one may work
            log.warning("lag measurement failed; backpressure state kept", exc_info=True)
        else:
            tell_lanes(controller.lags)

    async def measure_for_lanes() -> None:
        """After a rebalance a lane spills until it knows what its topic holds: measure it now,
        not at the next tick (retried: a lane that never learns it never writes in process)."""
        for attempt in range(1, 61):
            try:
                tell_lanes(await controller.measure())
                return
            except Exception:
                log.warning("lag measurement for the sink lanes failed (attempt %d)", attempt, exc_info=True)
                await asyncio.sleep(1.0)

    measuring: set[asyncio.Future[None]] = set()

    app.timer(settings.backpressure.lag_check_interval_s)(measure_lag_and_apply_backpressure)

    @app.on_partitions_assigned.connect
    async def hold_what_is_held(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        app.pipeline.consuming = True  # type: ignore[attr-defined]
        owned = sorted(f"{tp.topic}[{tp.partition}]" for tp in app.assignor.assigned_actives())
        log.info("partitions owned after the rebalance (%d): %s", len(owned), " ".join(owned) or "none")
        controller.guard_resumes()
        controller.apply_soon()  # the consumer thread is inside this rebalance: queue behind it
        assigned = app.assignor.assigned_actives()
        for topic, lane in by_topic.items():
            lane.assign(sorted(tp.partition for tp in assigned if tp.topic == topic))
        task = asyncio.ensure_future(measure_for_lanes())
        measuring.add(task)
        task.add_done_callback(measuring.discard)

    @app.on_before_shutdown.connect
    async def stop_lag_probe(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await controller.stop()
        for lane in lanes.values():
            await lane.stop()
