"""Topic declarations (contract §3). Values travel as raw bytes; we decode them ourselves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust
from faust.types import AppT, Message

from ingest_stream.config import SOURCES, Settings
from ingest_stream.core.dlq import RECORD_OVERHEAD_BYTES


class RawBytesSchema(faust.Schema):  # type: ignore[type-arg]
    """Keys and values stay the message's bytes: the event is built directly.

    Faust's generic decode runs each key and value through the serializer registry (the `raw`
    codec) and looks the Event class up in the settings, per record — measurable on a profile
    for topics whose bytes we parse ourselves anyway."""

    def __init__(self) -> None:
        super().__init__(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    def compile(self, app: AppT, *, on_key_decode_error: Any = None, on_value_decode_error: Any = None,
                default_propagate: bool = False) -> Any:
        event_class: Any = app.conf.Event

        async def decode(message: Message, *, propagate: bool = default_propagate) -> Any:
            return event_class(app, message.key, message.value, message.headers, message)

        return decode


@dataclass(frozen=True)
class Topics:
    sources: dict[str, faust.TopicT]
    sinks: dict[str, faust.TopicT]
    dlq: faust.TopicT


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    # Room for a record of the size limit with its headers, on brokers whose default is 1 MB.
    config = {"max.message.bytes": str(settings.max_message_bytes + RECORD_OVERHEAD_BYTES)}

    def raw(name: str) -> faust.TopicT:
        return app.topic(name, schema=RawBytesSchema(), partitions=settings.partitions, config=config)

    return Topics(
        sources={s: raw(settings.source_topic(s)) for s in SOURCES},
        sinks={s: raw(settings.sink_topic(s)) for s in settings.sinks},
        dlq=raw(settings.dlq_topic),
    )
