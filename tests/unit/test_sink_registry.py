"""The sink registry is the one list of sinks: each entry's module names itself, builds itself
from the settings, owns its error rules, and has its contract stage."""

import pytest

from ingest_stream.config import Settings
from ingest_stream.core.reasons import Stage
from ingest_stream.errors import ConfigError
from ingest_stream.sinks.registry import SINK_NAMES, build_sink, sink_module


@pytest.mark.parametrize("name", SINK_NAMES)
def test_each_registered_sink_module_names_itself_builds_from_settings_and_has_its_stage(name):
    module = sink_module(name)
    assert name == module.NAME
    assert module.ERROR_RULES and all(types and reason for types, reason in module.ERROR_RULES)
    sink = build_sink(name, Settings())  # constructing connects to nothing: open() does
    assert sink.name == name
    assert Stage.for_sink(name).sink == name


def test_the_settings_default_to_every_registered_sink_and_refuse_others():
    assert Settings().sinks == SINK_NAMES
    with pytest.raises(ConfigError, match="unknown sink"):
        Settings.from_env({"INGEST_SINKS": "postgres,elastic"})
    with pytest.raises(ConfigError, match="unknown sink 'elastic'"):
        sink_module("elastic")
