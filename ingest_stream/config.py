"""One frozen Settings object, read from `INGEST_*` environment variables once and passed down.

Every default works with `ingest-stream dev` on one machine.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from ingest_stream.core.backpressure import Thresholds
from ingest_stream.core.files import parse_locations, parse_sftp_locations
from ingest_stream.core.webhook import parse_auth
from ingest_stream.errors import ConfigError
from ingest_stream.sinks.registry import SINK_NAMES

SOURCES = ("kafka", "webhook", "s3", "sftp")
FAILURE_POLICIES = ("hold", "dlq")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _default_schema_dir() -> Path:
    """The installed package's schemas (`ingest_stream/schemas` in the wheel), else the checkout's
    (an editable install runs the checkout, whose schemas are at its top)."""
    installed = Path(__file__).resolve().parent / "schemas"
    return installed if installed.is_dir() else PROJECT_ROOT / "schemas"


MESSAGE_ENVELOPE_BYTES = 64 * 1024  # headers and key beside a record's value (core/dlq.py caps them)
# What any Kafka broker takes with its defaults (message.max.bytes 1048588; the Java producer's
# max.request.size 1048576): a dead letter stays within it even where the DLQ topic was created
# before this version, or by other tooling, without our max.message.bytes.
DEFAULT_KAFKA_MESSAGE_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class Settings:
    app_id: str = "ingest-stream"
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_session_timeout_s: float | None = None  # None: Faust's default (60 s)
    # Faust refuses to start when a table's local offset is past its changelog's end (a wiped
    # topic). Tansu under-reports ends after multi-record batches, so the dev stack turns it off.
    recovery_consistency_check: bool = True
    topic_prefix: str = "ingest"
    partitions: int = 4
    table_standby_replicas: int = 1  # hot standby copies of each table partition on other workers
    sinks: tuple[str, ...] = SINK_NAMES
    postgres_dsn: str = field(default="postgresql://postgres@127.0.0.1:5432/postgres", repr=False)
    neo4j_uri: str = "bolt://127.0.0.1:7687"
    neo4j_user: str = "neo4j"
    neo4j_password: str = field(default="", repr=False)
    neo4j_batch_size: int = 200
    neo4j_max_request_bytes: int = 0  # 0: no limit (the FalkorDB stand-in needs ~3 KB)
    neo4j_concurrency: int = 1  # 1: one transaction per batch
    neo4j_flavor: str = "neo4j"  # "falkordb": the Bolt stand-in (no constraints, see infra.md)
    typesense_url: str = "http://127.0.0.1:8108"
    typesense_api_key: str = field(default="dev-typesense-key", repr=False)
    sink_failure_policy: str = "hold"
    admin_token: str | None = field(default=None, repr=False)
    # The operator page and the audit/KPI/checkpoint views: HTTP Basic, the token as the password.
    viewer_token: str | None = field(default=None, repr=False)
    web_host: str = "0.0.0.0"
    web_port: int = 8080
    data_dir: Path = Path("./data")
    schema_dir: Path = field(default_factory=_default_schema_dir)
    max_record_bytes: int = 1_048_576
    dedupe_ttl_s: int = 7 * 24 * 3600
    dedupe_evict_interval_s: float = 3600.0
    source_batch_size: int = 500
    sink_batch_size: int = 500
    batch_within_s: float = 0.05
    producer_linger_ms: int = 5
    consumer_fetch_max_wait_ms: int = 100  # Faust's own 1500 adds up to that per hop on some brokers
    commit_interval_s: float = 1.0  # Faust's 2.8: less to read again after a crash, lag trails less
    # RocksDB memory of the whole worker, shared by every table partition (stream/tables.py)
    rocksdb_write_buffer_mib: int = 16
    rocksdb_block_cache_mib: int = 32
    malloc_mmap_threshold_kib: int = 128  # held at worker start (malloc.py); 0: glibc's moving one
    sink_timeout_s: float = 10.0
    sink_retry_base_s: float = 0.2
    sink_retry_cap_s: float = 10.0
    sink_retry_attempts: int = 5  # per batch, with INGEST_SINK_FAILURE_POLICY=dlq
    breaker_failure_threshold: int = 5  # consecutive failed attempts that open a sink's circuit
    breaker_failure_rate: float = 0.5  # ... or this share of the last INGEST_BREAKER_WINDOW attempts
    breaker_window: int = 20
    breaker_open_s: float = 30.0  # open → half-open
    stall_timeout_s: float = 300.0  # records waiting, no progress this long: the worker exits (70)
    stall_check_interval_s: float = 10.0
    # Backpressure (core/backpressure.py): lag of the worker's consumed topics, checked every
    # interval; thresholds in seconds (now - timestamp of the first unprocessed record) or records.
    lag_check_interval_s: float = 5.0
    throttle_lag_s: float = 30.0
    brownout_lag_s: float = 120.0
    throttle_lag_records: int = 100_000
    brownout_lag_records: int = 1_000_000
    backpressure_exit_ratio: float = 0.5
    backpressure_cool_down_s: float = 30.0
    throttle_rate: float = 1000.0  # source records per second while throttled
    brownout_rate: float = 0.1  # share of low-priority records kept in an automatic brownout
    replay_approval_threshold: int = 10_000  # replays estimated above this many records need an RFA
    max_concurrent_sink_writes: int = 3  # sink batches in flight at once, across the sinks
    # Webhook source: {"tenant": {"token": "…"} | {"hmac_secret": "…"}} (core/webhook.py)
    webhook_auth: str = field(default="", repr=False)
    webhook_max_body_bytes: int = 1_048_576
    webhook_signature_window_s: float = 300.0
    # S3 source: [{"tenant": "acme", "bucket": "in", "prefix": "acme/"}, …] polled by the leader
    s3_sources: str = ""
    s3_endpoint_url: str | None = None  # None: AWS; set for MinIO, moto, …
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = field(default=None, repr=False)
    s3_secret_access_key: str | None = field(default=None, repr=False)
    # SFTP source: [{"tenant", "host", "port", "username", "password" | "client_key", "path", …}]
    sftp_sources: str = field(default="", repr=False)
    source_poll_interval_s: float = 10.0  # S3 and SFTP polling
    source_checkpoint_every: int = 500  # lines sent between checkpoints of a file
    # content of one S3/SFTP file, gunzipped: past it the file is given up (a gzip bomb)
    source_max_file_bytes: int = 4 * 2**30
    tenant_metrics_limit: int = 500  # distinct tenants labelled in metrics; later ones are "other"
    disabled_sources: tuple[str, ...] = ()  # isolated at start; /admin/sources/<s>/enable undoes it
    log_level: str = "info"

    def __post_init__(self) -> None:
        unknown = set(self.sinks) - set(SINK_NAMES)
        if unknown:
            raise ConfigError(f"INGEST_SINKS: unknown sink(s) {sorted(unknown)}; known: {SINK_NAMES}")
        if self.sink_failure_policy not in FAILURE_POLICIES:
            raise ConfigError(f"INGEST_SINK_FAILURE_POLICY must be one of {FAILURE_POLICIES}")
        try:
            parse_auth(self.webhook_auth)
        except ValueError as error:
            raise ConfigError(f"INGEST_WEBHOOK_AUTH: {error}") from None
        names: list[str] = []
        for name, parse, raw in (("INGEST_S3_SOURCES", parse_locations, self.s3_sources),
                                 ("INGEST_SFTP_SOURCES", parse_sftp_locations, self.sftp_sources)):
            try:
                names += [location.name for location in parse(raw)]
            except (ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"{name}: {error}") from None
        taken = next((n for n in names if names.count(n) > 1 or n in SOURCES), None)
        if taken is not None:  # adapters are looked up by name (/health/detailed .adapters[name])
            raise ConfigError(f"INGEST_S3_SOURCES / INGEST_SFTP_SOURCES: the name {taken!r} is taken")
        if set(self.disabled_sources) - set(SOURCES):
            raise ConfigError(f"INGEST_DISABLED_SOURCES: unknown source(s); known: {SOURCES}")
        try:
            self.backpressure_thresholds()
        except ValueError as error:
            raise ConfigError(f"INGEST_*_LAG_* / INGEST_BROWNOUT_RATE: {error}") from None
        if self.throttle_rate <= 0 or self.max_concurrent_sink_writes < 1:
            raise ConfigError("INGEST_THROTTLE_RATE and INGEST_MAX_CONCURRENT_SINK_WRITES must be positive")
        if self.partitions < 1 or self.max_record_bytes < 1:
            raise ConfigError("INGEST_PARTITIONS and INGEST_MAX_RECORD_BYTES must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build from `INGEST_<FIELD>` variables; unset or empty means the default."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for item in fields(cls):
            raw = environ.get(f"INGEST_{item.name.upper()}")
            if raw is None or (raw == "" and item.name != "neo4j_password"):
                continue
            values[item.name] = _parse(item.name, raw, hints[item.name])
        return cls(**values)

    def backpressure_thresholds(self) -> Thresholds:
        return Thresholds(
            throttle_lag_s=self.throttle_lag_s, brownout_lag_s=self.brownout_lag_s,
            throttle_lag_records=self.throttle_lag_records, brownout_lag_records=self.brownout_lag_records,
            exit_ratio=self.backpressure_exit_ratio, cool_down_s=self.backpressure_cool_down_s,
            brownout_rate=self.brownout_rate)

    @property
    def max_message_bytes(self) -> int:
        """The largest record this app produces: a record of the size limit and its headers (a
        dead letter's, capped in core/dlq.py). The producer and every topic it declares allow it."""
        return self.max_record_bytes + MESSAGE_ENVELOPE_BYTES

    @property
    def max_letter_bytes(self) -> int:
        """The largest dead letter: within any broker's defaults (a larger value is cut to a
        prefix, flagged; the whole record stays at its origin)."""
        return min(self.max_message_bytes, DEFAULT_KAFKA_MESSAGE_BYTES)

    # --- topic names (contract §3) ---------------------------------------------------------
    def source_topic(self, source: str) -> str:
        return f"{self.topic_prefix}.source.{source}"

    def sink_topic(self, sink: str) -> str:
        return f"{self.topic_prefix}.sink.{sink}"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def dlq_status_topic(self) -> str:
        """Dead-letter statuses (open/redriven/parked/purged), compacted."""
        return f"{self.dlq_topic}.status"

    @property
    def adapter_checkpoints_topic(self) -> str:
        return f"{self.topic_prefix}.adapter.checkpoints"

    @property
    def replay_plans_topic(self) -> str:
        return f"{self.topic_prefix}.replay.plans"

    @property
    def legal_holds_topic(self) -> str:
        return f"{self.topic_prefix}.legal.holds"


def unknown_names(environ: Mapping[str, str]) -> list[str]:
    """`INGEST_*` variables that name no setting (a misspelt name is otherwise silently ignored),
    each with the closest setting's name when there is one."""
    known = {f"INGEST_{item.name.upper()}" for item in fields(Settings)}
    found = []
    for name in sorted(environ):
        if name.startswith("INGEST_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found


def effective(settings: Settings) -> dict[str, str]:
    """Every setting by its variable name, as the worker sees it; secrets masked."""
    shown = {}
    for item in fields(settings):
        value = getattr(settings, item.name)
        secret = not item.repr and value not in (None, "")
        shown[f"INGEST_{item.name.upper()}"] = "********" if secret else (
            ",".join(value) if isinstance(value, tuple) else "" if value is None else str(value))
    return shown


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number"}


def _parse(name: str, raw: str, hint: Any) -> Any:
    env_name = f"INGEST_{name.upper()}"
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if hint in (int, int | None):
            return int(raw)
        if hint in (float, float | None):
            return float(raw)
        if hint is Path:
            return Path(raw)
        if hint == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        expected = next((text for kind, text in _EXPECTED.items() if hint in (kind, kind | None)), str(hint))
        raise ConfigError(f"{env_name}={raw[:80]!r}: expected {expected}") from None
