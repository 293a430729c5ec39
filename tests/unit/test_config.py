from pathlib import Path

import pytest

from ingest_stream.config import Settings
from ingest_stream.errors import ConfigError


def test_defaults():
    settings = Settings.from_env({})
    assert settings.app_id == "ingest-stream"
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.sinks == ("postgres", "neo4j", "typesense")
    assert settings.max_record_bytes == 1_048_576
    assert settings.web_port == 8080
    assert settings.admin_token is None
    assert settings.kafka_session_timeout_s is None


def test_environment_overrides_and_types():
    settings = Settings.from_env({
        "INGEST_SINKS": "postgres, typesense", "INGEST_WEB_PORT": "9000",
        "INGEST_KAFKA_SESSION_TIMEOUT_S": "6", "INGEST_DATA_DIR": "/tmp/x", "INGEST_TOPIC_PREFIX": "p",
        "INGEST_NEO4J_PASSWORD": "", "INGEST_SINK_FAILURE_POLICY": "dlq",
        "INGEST_RECOVERY_CONSISTENCY_CHECK": "false",
    })
    assert settings.recovery_consistency_check is False
    assert settings.sinks == ("postgres", "typesense")
    assert settings.web_port == 9000
    assert settings.kafka_session_timeout_s == 6.0
    assert settings.data_dir == Path("/tmp/x")
    assert settings.source_topic("kafka") == "p.source.kafka"
    assert settings.sink_topic("neo4j") == "p.sink.neo4j"
    assert settings.dlq_topic == "p.dlq"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("INGEST_SINKS", "postgres,elastic", "unknown sink"),
    ("INGEST_WEB_PORT", "eighty", "INGEST_WEB_PORT"),
    ("INGEST_SINK_FAILURE_POLICY", "ignore", "INGEST_SINK_FAILURE_POLICY"),
    ("INGEST_RECOVERY_CONSISTENCY_CHECK", "maybe", "INGEST_RECOVERY_CONSISTENCY_CHECK"),
])
def test_bad_values_are_clear_errors(name, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({name: value})


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().web_port = 1  # type: ignore[misc]


def test_tenant_labels_are_bounded():
    from ingest_stream.metrics import OTHER_TENANTS, TenantLabel

    label = TenantLabel(limit=2)
    assert [label(t) for t in ("a", "b", "c", "a", None)] == ["a", "b", OTHER_TENANTS, "a", OTHER_TENANTS]


def test_a_dead_letter_fits_any_broker_default_whatever_the_record_limit():
    from ingest_stream.config import DEFAULT_KAFKA_MESSAGE_BYTES, MESSAGE_ENVELOPE_BYTES

    assert Settings(max_record_bytes=1_048_576).max_letter_bytes == DEFAULT_KAFKA_MESSAGE_BYTES
    assert Settings(max_record_bytes=16_384).max_letter_bytes == 16_384 + MESSAGE_ENVELOPE_BYTES
    assert Settings(max_record_bytes=1_048_576).max_message_bytes == 1_048_576 + MESSAGE_ENVELOPE_BYTES
