"""One frozen Settings object, read from `INGEST_*` environment variables once and passed down.

Settings come in groups (one per sink, sink policy, retries, circuit breaker, backpressure, web,
sources), each a frozen dataclass; a core policy is its own group (BreakerPolicy, Thresholds,
BackoffPolicy), so its defaults are written once. The variables keep their names (`env_name`).
Every default works with `ingest-stream dev` on one machine.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, get_type_hints

from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.backpressure import Thresholds
from ingest_stream.core.breaker import BreakerPolicy
from ingest_stream.core.files import parse_locations, parse_sftp_locations
from ingest_stream.core.lanes import LanePolicy
from ingest_stream.core.webhook import parse_auth
from ingest_stream.errors import ConfigError
from ingest_stream.sinks.registry import SINK_NAMES

SOURCES = ("kafka", "webhook", "s3", "sftp")
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


class FailurePolicy(StrEnum):
    """INGEST_SINK_FAILURE_POLICY: what a sink's batch does once its retries are spent."""

    HOLD = "hold"  # retry until the sink answers: the agent holds, lag grows
    DLQ = "dlq"  # after INGEST_SINK_RETRY_ATTEMPTS, the records are dead-lettered


class Neo4jFlavor(StrEnum):
    NEO4J = "neo4j"
    FALKORDB = "falkordb"  # the Bolt stand-in of the dev stack: no constraints (docs/development.md)


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    dsn: str = field(default="postgresql://postgres@127.0.0.1:5432/postgres", repr=False)


@dataclass(frozen=True, slots=True)
class Neo4jSettings:
    uri: str = "bolt://127.0.0.1:7687"
    user: str = "neo4j"
    password: str = field(default="", repr=False)
    batch_size: int = 200
    max_request_bytes: int = 0  # 0: no limit (the FalkorDB stand-in needs ~3 KB)
    concurrency: int = 1  # 1: one transaction per batch
    flavor: Neo4jFlavor = Neo4jFlavor.NEO4J


@dataclass(frozen=True, slots=True)
class TypesenseSettings:
    url: str = "http://127.0.0.1:8108"
    api_key: str = field(default="dev-typesense-key", repr=False)


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """What every sink agent shares (retries: `Settings.sink_retry`, circuits: `Settings.breaker`)."""

    failure_policy: FailurePolicy = FailurePolicy.HOLD
    timeout_s: float = 10.0
    batch_size: int = 500
    max_concurrent_writes: int = 8  # sink batches in flight at once, across the sinks (and their lanes)


@dataclass(frozen=True, slots=True)
class WebSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    admin_token: str | None = field(default=None, repr=False)  # bearer token of /admin/*
    # The operator page and the audit/KPI/checkpoint views: HTTP Basic, the token as the password.
    viewer_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """The webhook, S3 and SFTP adapters, and sources isolated at start."""

    # Webhook: {"tenant": {"token": "…"} | {"hmac_secret": "…"}} (core/webhook.py)
    webhook_auth: str = field(default="", repr=False)
    webhook_max_body_bytes: int = 1_048_576
    webhook_signature_window_s: float = 300.0
    # S3: [{"tenant": "acme", "bucket": "in", "prefix": "acme/", "name": "s3-main"}, …] polled by the leader
    s3_sources: str = ""
    s3_endpoint_url: str | None = None  # None: AWS; set for MinIO, moto, …
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = field(default=None, repr=False)
    s3_secret_access_key: str | None = field(default=None, repr=False)
    # SFTP: [{"tenant", "host", "port", "username", "password" | "client_key", "path", …}]
    sftp_sources: str = field(default="", repr=False)
    poll_interval_s: float = 10.0  # S3 and SFTP polling
    checkpoint_every: int = 500  # lines sent between checkpoints of a file
    # content of one S3/SFTP file, gunzipped: past it the file is given up (a gzip bomb)
    max_file_bytes: int = 4 * 2**30
    disabled: tuple[str, ...] = ()  # isolated at start; /admin/sources/<s>/enable undoes it


# Each group of settings (a field of Settings whose type is a dataclass) reads INGEST_<PREFIX><FIELD>,
# the names the settings always had; a few fields keep a name of their own.
GROUP_PREFIXES: dict[str, str] = {
    "postgres": "POSTGRES_", "neo4j": "NEO4J_", "typesense": "TYPESENSE_", "sink": "SINK_",
    "sink_retry": "SINK_RETRY_", "breaker": "BREAKER_", "lanes": "SINK_LANE_", "backpressure": "",
    "web": "WEB_", "sources": "",
}
ENV_NAMES: dict[tuple[str, str], str] = {
    ("sink", "max_concurrent_writes"): "INGEST_MAX_CONCURRENT_SINK_WRITES",
    ("sink_retry", "max_attempts"): "INGEST_SINK_RETRY_ATTEMPTS",
    ("backpressure", "exit_ratio"): "INGEST_BACKPRESSURE_EXIT_RATIO",
    ("backpressure", "cool_down_s"): "INGEST_BACKPRESSURE_COOL_DOWN_S",
    ("web", "admin_token"): "INGEST_ADMIN_TOKEN",
    ("web", "viewer_token"): "INGEST_VIEWER_TOKEN",
    ("sources", "poll_interval_s"): "INGEST_SOURCE_POLL_INTERVAL_S",
    ("sources", "checkpoint_every"): "INGEST_SOURCE_CHECKPOINT_EVERY",
    ("sources", "max_file_bytes"): "INGEST_SOURCE_MAX_FILE_BYTES",
    ("sources", "disabled"): "INGEST_DISABLED_SOURCES",
}
EMPTY_IS_A_VALUE = {"INGEST_NEO4J_PASSWORD"}  # an empty password is a password (no auth)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the worker and the tools read, each default written once: here, or in the core
    policy it configures (BreakerPolicy, Thresholds, BackoffPolicy)."""

    app_id: str = "ingest-stream"
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_session_timeout_s: float | None = None  # None: Faust's default (60 s)
    # Faust refuses to start when a table's local offset is past its changelog's end (a wiped
    # topic). Tansu under-reports ends after multi-record batches, so the dev stack turns it off.
    recovery_consistency_check: bool = True
    topic_prefix: str = "ingest"
    partitions: int = 4
    table_standby_replicas: int = 1  # hot standby copies of each table partition on other workers
    data_dir: Path = Path("./data")
    schema_dir: Path = field(default_factory=_default_schema_dir)
    max_record_bytes: int = 1_048_576
    dedupe_ttl_s: int = 7 * 24 * 3600
    dedupe_evict_interval_s: float = 3600.0
    source_batch_size: int = 500
    batch_within_s: float = 0.05
    producer_linger_ms: int = 5
    consumer_fetch_max_wait_ms: int = 100  # Faust's own 1500 adds up to that per hop on some brokers
    commit_interval_s: float = 1.0  # Faust's 2.8: less to read again after a crash, lag trails less
    # RocksDB memory of the whole worker, shared by every table partition (stream/tables.py)
    rocksdb_write_buffer_mib: int = 16
    rocksdb_block_cache_mib: int = 32
    malloc_mmap_threshold_kib: int = 128  # held at worker start (malloc.py); 0: glibc's moving one
    gc_tuned: bool = True  # start-up objects frozen, fewer collections (collector.py); false: Python's
    stall_timeout_s: float = 300.0  # records waiting, no progress this long: the worker exits (70)
    stall_check_interval_s: float = 10.0
    replay_approval_threshold: int = 10_000  # replays estimated above this many records need an RFA
    tenant_metrics_limit: int = 500  # distinct tenants labelled in metrics; later ones are "other"
    log_level: str = "info"
    sinks: tuple[str, ...] = SINK_NAMES
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    neo4j: Neo4jSettings = field(default_factory=Neo4jSettings)
    typesense: TypesenseSettings = field(default_factory=TypesenseSettings)
    sink: SinkSettings = field(default_factory=SinkSettings)
    sink_retry: BackoffPolicy = field(default_factory=BackoffPolicy)  # per batch, under `dlq`
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)  # a circuit per sink
    lanes: LanePolicy = field(default_factory=LanePolicy)  # in process or spilled (core/lanes.py)
    backpressure: Thresholds = field(default_factory=Thresholds)  # core/backpressure.py
    web: WebSettings = field(default_factory=WebSettings)
    sources: SourceSettings = field(default_factory=SourceSettings)

    def __post_init__(self) -> None:
        unknown = set(self.sinks) - set(SINK_NAMES)
        if unknown:
            raise ConfigError(f"INGEST_SINKS: unknown sink(s) {sorted(unknown)}; known: {SINK_NAMES}")
        sources = self.sources
        try:
            parse_auth(sources.webhook_auth)
        except ValueError as error:
            raise ConfigError(f"INGEST_WEBHOOK_AUTH: {error}") from None
        names: list[str] = []
        for name, parse, raw in (("INGEST_S3_SOURCES", parse_locations, sources.s3_sources),
                                 ("INGEST_SFTP_SOURCES", parse_sftp_locations, sources.sftp_sources)):
            try:
                names += [location.name for location in parse(raw)]
            except (ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"{name}: {error}") from None
        taken = next((n for n in names if names.count(n) > 1 or n in SOURCES), None)
        if taken is not None:  # adapters are looked up by name (/health/detailed .adapters[name])
            raise ConfigError(f"INGEST_S3_SOURCES / INGEST_SFTP_SOURCES: the name {taken!r} is taken")
        if set(sources.disabled) - set(SOURCES):
            raise ConfigError(f"INGEST_DISABLED_SOURCES: unknown source(s); known: {SOURCES}")
        if self.sink.max_concurrent_writes < 1:
            raise ConfigError("INGEST_MAX_CONCURRENT_SINK_WRITES must be positive")
        if self.partitions < 1 or self.max_record_bytes < 1:
            raise ConfigError("INGEST_PARTITIONS and INGEST_MAX_RECORD_BYTES must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build from `INGEST_*` variables (`env_names`); unset or empty means the default."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            group = _group_type(item)
            if group is None:
                if (value := _read(environ, env_name(item.name), cls, item.name)) is not _UNSET:
                    values[item.name] = value
                continue
            members = {}
            for member in fields(group):
                raw = _read(environ, env_name(item.name, member.name), group, member.name)
                if raw is not _UNSET:
                    members[member.name] = raw
            if members:
                try:
                    values[item.name] = group(**members)
                except ValueError as error:  # the group's own checks (Thresholds, …)
                    names = ", ".join(env_name(item.name, m) for m in members)
                    raise ConfigError(f"{names}: {error}") from None
        return cls(**values)

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


def env_name(setting: str, member: str | None = None) -> str:
    """The variable of a setting, or of a member of a group of settings."""
    if member is None:
        return f"INGEST_{setting.upper()}"
    return ENV_NAMES.get((setting, member)) or f"INGEST_{GROUP_PREFIXES[setting]}{member}".upper()


def env_values(settings: Settings) -> Iterator[tuple[str, Any, bool]]:
    """Every setting as (variable, value, secret), groups flattened."""
    for item in fields(settings):
        value = getattr(settings, item.name)
        if _group_type(item) is None:
            yield env_name(item.name), value, not item.repr
            continue
        for member in fields(value):
            yield env_name(item.name, member.name), getattr(value, member.name), not member.repr


def unknown_names(environ: Mapping[str, str]) -> list[str]:
    """`INGEST_*` variables that name no setting (a misspelt name is otherwise silently ignored),
    each with the closest setting's name when there is one."""
    known = {name for name, _, _ in env_values(Settings())}
    found = []
    for name in sorted(environ):
        if name.startswith("INGEST_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
            found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found


def effective(settings: Settings) -> dict[str, str]:
    """Every setting by its variable name, as the worker sees it; secrets masked."""
    shown = {}
    for name, value, secret in env_values(settings):
        shown[name] = "********" if secret and value not in (None, "") else (
            ",".join(value) if isinstance(value, tuple) else "" if value is None else str(value))
    return shown


_UNSET = object()


def _group_type(item: Field[Any]) -> type | None:
    """The dataclass of a group of settings (None for a plain setting)."""
    return item.default_factory if item.name in GROUP_PREFIXES else None  # type: ignore[return-value]


def _read(environ: Mapping[str, str], name: str, owner: type, attribute: str) -> Any:
    raw = environ.get(name)
    if raw is None or (raw == "" and name not in EMPTY_IS_A_VALUE):
        return _UNSET
    return _parse(name, raw, get_type_hints(owner)[attribute])


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number"}


def _parse(env_name: str, raw: str, hint: Any) -> Any:
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
        if isinstance(hint, type) and issubclass(hint, StrEnum):
            return hint(raw.strip().lower())
        return raw
    except ValueError:
        if isinstance(hint, type) and issubclass(hint, StrEnum):
            expected = "one of " + ", ".join(choice.value for choice in hint)
        else:
            expected = next((text for kind, text in _EXPECTED.items() if hint in (kind, kind | None)),
                            str(hint))
        raise ConfigError(f"{env_name}={raw[:80]!r}: expected {expected}") from None
