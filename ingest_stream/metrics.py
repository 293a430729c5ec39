"""Every metric of the product, declared in one place and created against a registry.

Labels are bounded: sink, source, reason, stage, outcome, and tenant only through TenantLabel's cap
(INGEST_TENANT_METRICS_LIMIT) — never a record id.
"""

from __future__ import annotations

import collections
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


OTHER_TENANTS = "other"


class TenantLabel:
    """A tenant as a label value, bounded: past `limit` distinct tenants, new ones count as
    "other", so a flood of tenants cannot blow up the series count. Only tenants of valid records
    earn a label: a rejected record's tenant is whatever its producer wrote."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def __call__(self, tenant: str | None, *, valid: bool = True) -> str:
        if tenant is None:
            return OTHER_TENANTS
        if tenant in self._known:
            return tenant
        if valid and len(self._known) < self._limit:
            self._known.add(tenant)
            return tenant
        return OTHER_TENANTS


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, tenant_limit: int = 500) -> None:
        self.registry = registry or CollectorRegistry()
        self.tenant = TenantLabel(tenant_limit)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.records = Counter(
            "ingest_records_total", "Source records processed, by outcome.",
            ["source", "outcome"], registry=r)
        self.dlq = Counter(
            "ingest_dlq_total", "Records sent to the dead-letter topic.",
            ["reason", "stage"], registry=r)
        self.duplicates = Counter(
            "ingest_duplicates_total", "Exact duplicates dropped by the dedupe table.",
            ["source"], registry=r)
        self.dedupe_evicted = Counter(
            "ingest_dedupe_evicted_total", "Dedupe keys removed after their TTL.",
            ["source"], registry=r)
        self.lag = Histogram(
            "ingest_lag_seconds", "Source event time to sink commit.",
            ["sink", "source"], buckets=LAG_BUCKETS_S, registry=r)
        self.sink_records = Counter(
            "ingest_sink_records_total", "Records handled by a sink, by revision decision.",
            ["sink", "decision"], registry=r)
        self.sink_batch = Histogram(
            "ingest_sink_batch_duration_seconds", "Time to apply one batch to a sink.",
            ["sink"], buckets=BATCH_BUCKETS_S, registry=r)
        self.retries = Counter(
            "ingest_retry_total", "Sink operation retries.", ["sink", "reason"], registry=r)
        self.sink_splits = Counter(
            "ingest_sink_splits_total",
            "Failing sink batches split to find the records that fail on their own: done (the sink "
            "took the rest) or stopped (the sink looked down).", ["sink", "result"], registry=r)
        self.circuit_state = Gauge(
            "ingest_circuit_state", "Circuit breaker state per sink: 0 closed, 1 half-open, 2 open.",
            ["sink"], registry=r)
        self.circuit_transitions = Counter(
            "ingest_circuit_transitions_total", "Circuit breaker state changes, by the state entered.",
            ["sink", "state"], registry=r)
        self.sink_lane_state = Gauge(
            "ingest_sink_lane_state", "How the processing agents hand a sink its records: 0 in process, "
            "1 spilling to its sink topic, 2 switching back (waiting for the topic to drain).", ["sink"],
            registry=r)
        self.sink_spilled = Counter(
            "ingest_sink_spilled_records_total", "Records spilled to a sink's topic instead of written in "
            "process (the sink was down or slow, or its topic was draining).", ["sink"], registry=r)
        self.consumer_lag_records = Gauge(
            "ingest_consumer_lag_records", "Records not yet committed by the worker's consumer group.",
            ["topic", "partition"], registry=r)
        self.consumer_lag_seconds = Gauge(
            "ingest_consumer_lag_seconds",
            "Now minus the timestamp of the first uncommitted record (0 when caught up).",
            ["topic", "partition"], registry=r)
        self.backpressure_state = Gauge(
            "ingest_backpressure_state",
            "0 normal, 1 throttled, 2 brownout, 3 drain, 4 paused.", registry=r)
        self.brownout_dropped = Counter(
            "ingest_brownout_dropped_total", "Low-priority records dropped in brownout.",
            ["source"], registry=r)
        self.last_sink_commit = Gauge(
            "ingest_last_sink_commit_timestamp_seconds", "When a sink last committed a batch.",
            ["sink"], registry=r)
        self.adapter_records = Counter(
            "ingest_adapter_records_total", "Records a source adapter wrote to its source topic.",
            ["source"], registry=r)
        self.webhook_requests = Counter(
            "ingest_webhook_requests_total", "Webhook requests, by HTTP status answered.",
            ["status"], registry=r)
        self.tenant_records = Counter(
            "ingest_tenant_records_total", "Source records per tenant (bounded), by outcome.",
            ["tenant", "outcome"], registry=r)
        # Set to read at scrape time by the app (stream/tables.py): what of the worker's memory is
        # RocksDB's, against its budget (INGEST_ROCKSDB_BLOCK_CACHE_MIB / _WRITE_BUFFER_MIB).
        self.rocksdb_block_cache = Gauge(
            "ingest_rocksdb_block_cache_bytes", "RocksDB block cache in use, shared by the worker's tables.",
            registry=r)
        self.rocksdb_memtables = Gauge(
            "ingest_rocksdb_memtable_bytes", "RocksDB memtables of every table partition open here.",
            registry=r)
        self.unexpected_errors = Counter(
            "ingest_unexpected_errors_total",
            "Records dead-lettered by an exception no rule expected: a bug to report, by stage and type.",
            ["stage", "error_type"], registry=r)
        self.tenant_dlq = Counter(
            "ingest_tenant_dlq_total", "Dead letters per tenant (bounded), by reason.",
            ["tenant", "reason"], registry=r)
        self.adapter_errors = Counter(
            "ingest_adapter_errors_total",
            "S3/SFTP lines not sent (reason tenant_mismatch, line_too_large) and files given up "
            "(file_corrupt, file_too_large) or skipped until the next poll (file_error).",
            ["source", "reason"], registry=r)


def observe_all(histogram: Histogram, amounts: Sequence[float]) -> None:
    """`histogram.observe(amount)` for each amount (of an unlabelled histogram or a `labels()`
    child), as one increment per bucket touched and one of the sum, instead of a locked increment
    and a scan of the buckets per amount. Each sink observes the lag of every record it applies:
    one by one, that was ~2.5 % of the worker's CPU on `bench.stage_c`. It reads prometheus_client's
    Histogram internals (the bounds, bucket and sum values); tests/unit/test_metrics.py holds the
    result to `observe`'s."""
    if not amounts:
        return
    bounds: list[float] = histogram._upper_bounds  # noqa: SLF001 (ascending, +Inf last)
    histogram._sum.inc(sum(amounts))  # noqa: SLF001
    buckets = histogram._buckets  # noqa: SLF001
    for index, count in collections.Counter(bisect_left(bounds, amount) for amount in amounts).items():
        buckets[index].inc(count)  # the first bucket whose bound is >= the amount, as observe()
