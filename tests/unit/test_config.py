from pathlib import Path

import pytest

from ingest_stream.config import FailurePolicy, Neo4jFlavor, Settings, effective, unknown_names
from ingest_stream.errors import ConfigError


def test_defaults():
    settings = Settings.from_env({})
    assert settings.app_id == "ingest-stream"
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.sinks == ("postgres", "neo4j", "typesense")
    assert settings.max_record_bytes == 1_048_576
    assert settings.web.port == 8080
    assert settings.web.admin_token is None
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
    assert settings.web.port == 9000
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


def test_settings_and_their_groups_are_frozen():
    with pytest.raises(AttributeError):
        Settings().app_id = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Settings().web.port = 1  # type: ignore[misc]


def test_groups_read_the_variables_the_settings_always_had():
    settings = Settings.from_env({
        "INGEST_BREAKER_WINDOW": "10", "INGEST_BREAKER_OPEN_S": "5", "INGEST_THROTTLE_RATE": "50",
        "INGEST_BACKPRESSURE_EXIT_RATIO": "0.25", "INGEST_LAG_CHECK_INTERVAL_S": "0.5",
        "INGEST_SINK_RETRY_ATTEMPTS": "3", "INGEST_MAX_CONCURRENT_SINK_WRITES": "2",
        "INGEST_ADMIN_TOKEN": "a", "INGEST_VIEWER_TOKEN": "v", "INGEST_SOURCE_POLL_INTERVAL_S": "2",
        "INGEST_DISABLED_SOURCES": "sftp", "INGEST_NEO4J_FLAVOR": "FalkorDB", "INGEST_POSTGRES_DSN": "postgresql://x",
    })
    assert (settings.breaker.window, settings.breaker.open_s) == (10, 5.0)
    assert settings.breaker.min_calls is None  # half the window: CircuitBreaker reads it so
    assert (settings.backpressure.throttle_rate, settings.backpressure.exit_ratio) == (50.0, 0.25)
    assert settings.backpressure.lag_check_interval_s == 0.5
    assert settings.sink_retry.max_attempts == 3 and settings.sink.max_concurrent_writes == 2
    assert (settings.web.admin_token, settings.web.viewer_token) == ("a", "v")
    assert settings.sources.poll_interval_s == 2.0 and settings.sources.disabled == ("sftp",)
    assert settings.neo4j.flavor is Neo4jFlavor.FALKORDB and settings.postgres.dsn == "postgresql://x"
    shown = effective(settings)
    assert shown["INGEST_BREAKER_WINDOW"] == "10" and shown["INGEST_ADMIN_TOKEN"] == "********"
    assert shown["INGEST_POSTGRES_DSN"] == "********" and shown["INGEST_SINK_FAILURE_POLICY"] == "hold"
    assert unknown_names({"INGEST_BREAKER_WINDOW": "1", "INGEST_BREAKR_WINDOW": "1"}) == [
        "INGEST_BREAKR_WINDOW (did you mean INGEST_BREAKER_WINDOW?)"]


def test_a_choice_lists_its_values_and_a_group_check_names_its_variables():
    with pytest.raises(ConfigError, match="INGEST_NEO4J_FLAVOR='mongo': expected one of neo4j, falkordb"):
        Settings.from_env({"INGEST_NEO4J_FLAVOR": "mongo"})
    with pytest.raises(ConfigError, match=r"INGEST_THROTTLE_LAG_S.*throttle_lag_s <= brownout_lag_s"):
        Settings.from_env({"INGEST_THROTTLE_LAG_S": "500"})
    assert Settings.from_env({"INGEST_SINK_FAILURE_POLICY": "dlq"}).sink.failure_policy is FailurePolicy.DLQ


def test_tenant_labels_are_bounded():
    from ingest_stream.metrics import OTHER_TENANTS, TenantLabel

    label = TenantLabel(limit=2)
    assert [label(t) for t in ("a", "b", "c", "a", None)] == ["a", "b", OTHER_TENANTS, "a", OTHER_TENANTS]


def test_a_dead_letter_fits_any_broker_default_whatever_the_record_limit():
    from ingest_stream.config import DEFAULT_KAFKA_MESSAGE_BYTES, MESSAGE_ENVELOPE_BYTES

    assert Settings(max_record_bytes=1_048_576).max_letter_bytes == DEFAULT_KAFKA_MESSAGE_BYTES
    assert Settings(max_record_bytes=16_384).max_letter_bytes == 16_384 + MESSAGE_ENVELOPE_BYTES
    assert Settings(max_record_bytes=1_048_576).max_message_bytes == 1_048_576 + MESSAGE_ENVELOPE_BYTES
