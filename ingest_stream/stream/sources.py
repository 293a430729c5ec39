"""Source adapters wired into the worker: each configured adapter polls on a timer, on the leader
only (one worker reads a bucket or a directory), with its health under `adapters` in
/health/detailed (`last_file_error`: a file the last poll skipped or gave up), its records counted
in `ingest_adapter_records_total{source}` and the lines and files it could not send in
`ingest_adapter_errors_total{source, reason}` (sources/feeder.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Protocol

import faust

from ingest_stream.config import Settings
from ingest_stream.core.files import parse_locations, parse_sftp_locations
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.metrics import Metrics
from ingest_stream.ops.kafka_io import CompactedStore
from ingest_stream.sources.feeder import CheckpointStore, FileFeeder
from ingest_stream.sources.s3 import S3Source
from ingest_stream.sources.sftp import SftpSource
from ingest_stream.stream.backpressure import BackpressureController

log = logging.getLogger(__name__)


class Poller(Protocol):
    name: str

    async def poll(self) -> None: ...


def install_file_sources(app: faust.App, settings: Settings, sources: dict[str, faust.TopicT],
                         controller: BackpressureController, metrics: Metrics) -> None:
    sftp_locations = parse_sftp_locations(settings.sources.sftp_sources)
    wanted = ((["s3"] if parse_locations(settings.sources.s3_sources) else [])
              + (["sftp"] if sftp_locations else []))
    if sftp_locations and any(location.known_hosts is None for location in sftp_locations):
        log.warning("SFTP: host keys are not checked for locations without known_hosts")
    sftp_seen: dict[str, tuple[int, int]] = {}
    if not wanted:
        return
    checkpoint_topic = app.topic(settings.adapter_checkpoints_topic, key_type=bytes, value_type=bytes,
                                 key_serializer="raw", value_serializer="raw", partitions=1,
                                 compacting=True)
    state: dict[str, Any] = {"store": None}

    async def store() -> CheckpointStore:
        if state["store"] is None:
            await checkpoint_topic.maybe_declare()
            loaded = await CompactedStore(settings.kafka_bootstrap, settings.adapter_checkpoints_topic).load()

            async def save(name: str, raw: bytes) -> None:
                await (await checkpoint_topic.send(key=name.encode(), value=raw))

            state["store"] = CheckpointStore(loaded, save)
        return state["store"]  # type: ignore[no-any-return]

    for source in wanted:
        health = controller.adapter_health.setdefault(source, {"last_poll_at": None, "last_error": None,
                                                               "last_file_error": None,
                                                               "backlog_files": None})
        topic = sources[source]
        counter = metrics.adapter_records.labels(source)

        async def send(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
                       topic: faust.TopicT = topic) -> Any:
            return await topic.send(key=key, value=value, headers=headers)

        def make(feeder: FileFeeder, source: str = source, health: dict[str, Any] = health) -> Poller:
            if source == "s3":
                return S3Source(settings, feeder, health)
            return SftpSource(sftp_locations, feeder, health, sftp_seen)

        def count_error(reason: str, source: str = source) -> None:
            metrics.adapter_errors.labels(source, reason).inc()

        _poll_timer(app, settings, source, controller, health, store, send, counter, count_error, make)


def _poll_timer(app: faust.App, settings: Settings, source: str, controller: BackpressureController,
                health: dict[str, Any], store: Any, send: Any, counter: Any, count_error: Any,
                make: Any) -> None:
    async def poll_source() -> None:
        if source in controller.disabled or not controller.machine.fetching:
            return  # isolated, drained or paused: take nothing new in
        health["last_poll_at"] = format_rfc3339(datetime.now(UTC))
        feeder: FileFeeder | None = None
        try:
            feeder = FileFeeder(send, await store(), every=settings.sources.checkpoint_every,
                                counted=counter.inc, max_record_bytes=settings.max_record_bytes,
                                max_file_bytes=settings.sources.max_file_bytes, errors=count_error)
            await make(feeder).poll()
            health["last_error"] = None
        except Exception as error:  # a failed poll is reported and retried next interval
            health["last_error"] = f"{type(error).__name__}: {error}"[:300]
            log.warning("%s poll failed: %s", source, error, exc_info=True)
        finally:  # a file this poll skipped or gave up, if any (the others went on)
            health["last_file_error"] = feeder.last_error if feeder else None

    poll_source.__name__ = f"poll_{source}"
    app.timer(settings.sources.poll_interval_s, on_leader=True)(poll_source)
