"""Topic declarations (contract §3). Values travel as raw bytes; we decode them ourselves."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from ingest_stream.config import SOURCES, Settings


@dataclass(frozen=True)
class Topics:
    sources: dict[str, faust.TopicT]
    sinks: dict[str, faust.TopicT]
    dlq: faust.TopicT


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    def raw(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=settings.partitions)

    return Topics(
        sources={s: raw(settings.source_topic(s)) for s in SOURCES},
        sinks={s: raw(settings.sink_topic(s)) for s in settings.sinks},
        dlq=raw(settings.dlq_topic),
    )
