"""Every sink, by name: the one list. Each sink module owns its construction from the settings
(`from_settings`), its error rules (`ERROR_RULES`, `classify`) and its `NAME`; adding a sink is a
module, a line here, its stage in core/reasons.Stage (the contract's `sink.<name>`), and its tests
(docs/design.md). Modules are imported when a sink is built: a worker loads only the drivers of
the sinks it writes."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from ingest_stream.errors import ConfigError

if TYPE_CHECKING:
    from ingest_stream.config import Settings
    from ingest_stream.sinks.base import Sink

SINK_MODULES: dict[str, str] = {
    "postgres": "ingest_stream.sinks.postgres",
    "neo4j": "ingest_stream.sinks.neo4j",
    "typesense": "ingest_stream.sinks.typesense",
}
SINK_NAMES = tuple(SINK_MODULES)


def sink_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(SINK_MODULES[name])
    except KeyError:
        raise ConfigError(f"unknown sink {name!r}; known: {', '.join(SINK_NAMES)}") from None


def build_sink(name: str, settings: Settings) -> Sink:
    sink: Sink = sink_module(name).from_settings(settings)
    return sink
