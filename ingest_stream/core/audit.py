"""Recent ingestion, minute by minute over the last hour, per source and tenant: what
`GET /ingest/audit` and `GET /kpis` answer from.

Counters the agents already pass through (one call per batch and tenant, not per record), kept in
memory: no topic is scanned on a request. Memory is bounded: at most `window_minutes` minutes per
(source, tenant), and tenants are the bounded metric labels (metrics.TenantLabel: later ones count
as "other"). A worker knows what *it* processed: with several workers, each answers for its own
partitions (the views say which).

Lag is kept as a histogram per minute, tenant and sink, in the buckets of `ingest_lag_seconds`:
p95 is the upper bound of the bucket holding it, as the alert's `histogram_quantile` reads the
same buckets (60 s is a bound, so "within the 60 s SLO" is exact).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ingest_stream.core.timefmt import format_rfc3339

WINDOW_MINUTES = 60
DLQ_RATE_SLO = 0.005  # runbook: DLQ rate < 0.5 % of records
LAG_P95_SLO_S = 60.0  # runbook: p95 lag (source event to sink commit) <= 60 s
THROUGHPUT_WINDOW_S = 300  # throughput: records in over the last 5 minutes, per second
# What the source agent decides for each record it reads ("records in" is their sum: rejected is
# dead-lettered by validation, dropped by brownout), and a sink's refusal of a forwarded record.
# Dead-lettered = rejected + refused, as ingest_dlq_total counts (and the DLQ rate alert divides).
IN_OUTCOMES = ("forwarded", "duplicate", "rejected", "dropped")
OUTCOMES = (*IN_OUTCOMES, "refused")
ALL = "*"


def _minute(now_s: float) -> int:
    return int(now_s // 60)


def _at(seconds: float) -> str:
    return format_rfc3339(datetime.fromtimestamp(seconds, UTC))


@dataclass
class _Minute:
    minute: int  # minutes since the epoch
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class _Lags:
    minute: int
    buckets: list[int]  # one count per bound, then one past the last bound


class _Series:
    """One key's minutes, newest last, at most `keep` of them."""

    def __init__(self, keep: int) -> None:
        self.minutes: deque[_Minute] = deque(maxlen=keep)
        self.last_accepted_s: float | None = None

    def add(self, minute: int, outcome: str, n: int) -> None:
        # A wall clock stepped back counts in the newest minute: minutes stay in order, each once.
        if not self.minutes or self.minutes[-1].minute < minute:
            self.minutes.append(_Minute(minute))
        self.minutes[-1].counts[outcome] += n

    def since(self, first_minute: int) -> Iterator[_Minute]:
        return (m for m in self.minutes if m.minute >= first_minute)


class IngestAudit:
    def __init__(self, lag_bounds_s: Sequence[float], *, window_minutes: int = WINDOW_MINUTES) -> None:
        self.window_minutes = window_minutes
        self._bounds = tuple(lag_bounds_s)
        self._series: dict[tuple[str, str], _Series] = {}  # (source, tenant)
        self._lags: dict[tuple[str, str], deque[_Lags]] = {}  # (tenant, sink)
        self._letters = _Series(window_minutes)  # dead letters by reason, whatever the stage

    # --- what the agents report ------------------------------------------------------------------
    def count(self, source: str, tenant: str, outcome: str, n: int, *, now_s: float) -> None:
        """`n` records of `tenant` from `source` had `outcome` (one of OUTCOMES)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        series = self._series.get((source, tenant))
        if series is None:
            series = self._series[source, tenant] = _Series(self.window_minutes)
        series.add(_minute(now_s), outcome, n)
        if outcome == "forwarded":
            series.last_accepted_s = now_s

    def letter(self, reason: str, *, now_s: float) -> None:
        """A dead letter was published, for `reason`."""
        self._letters.add(_minute(now_s), reason, 1)

    def letters_by_reason(self, *, now_s: float, minutes: int = WINDOW_MINUTES) -> dict[str, int]:
        """Dead letters in the last `minutes`, by reason."""
        total: Counter[str] = Counter()
        for m in self._letters.since(_minute(now_s) - _clamp(minutes, self.window_minutes) + 1):
            total.update(m.counts)
        return dict(sorted(total.items()))

    def lags(self, tenant: str, sink: str, seconds: Iterable[float], *, now_s: float) -> None:
        """Source event to sink commit, for records of `tenant` that `sink` committed."""
        minutes = self._lags.get((tenant, sink))
        if minutes is None:
            minutes = self._lags[tenant, sink] = deque(maxlen=self.window_minutes)
        minute = _minute(now_s)
        if not minutes or minutes[-1].minute < minute:  # as _Series.add: a clock stepped back
            minutes.append(_Lags(minute, [0] * (len(self._bounds) + 1)))
        buckets = minutes[-1].buckets
        for value in seconds:
            buckets[bisect.bisect_left(self._bounds, value)] += 1

    # --- what the views answer -------------------------------------------------------------------
    def audit(self, *, now_s: float, minutes: int = WINDOW_MINUTES, tenant: str | None = None,
              source: str | None = None) -> list[dict[str, Any]]:
        """Per source and tenant with anything in the last `minutes`: totals, last accepted at,
        and each minute that saw records (oldest first)."""
        first = _minute(now_s) - _clamp(minutes, self.window_minutes) + 1
        rows = []
        for (row_source, row_tenant), series in sorted(self._series.items()):
            if (source is not None and row_source != source) or (tenant is not None and row_tenant != tenant):
                continue
            recent = list(series.since(first))
            if not recent:
                continue
            total: Counter[str] = Counter()
            for m in recent:
                total.update(m.counts)
            rows.append({
                "source": row_source, "tenant": row_tenant, **_totals(total),
                "last_accepted_at": None if series.last_accepted_s is None else _at(series.last_accepted_s),
                "per_minute": [{"minute": _at(m.minute * 60), **_totals(m.counts)} for m in recent],
            })
        return rows

    def kpis(self, *, now_s: float, minutes: int = WINDOW_MINUTES) -> dict[str, Any]:
        """Per tenant and overall ("*"): throughput, DLQ rate against its SLO, p95 lag against its
        SLO, freshness (seconds since the tenant's last accepted record)."""
        minutes = _clamp(minutes, self.window_minutes)
        first = _minute(now_s) - minutes + 1
        # The last 5 minutes: the 4 whole ones before this one, and this one so far.
        recent_first = _minute(now_s) - THROUGHPUT_WINDOW_S // 60 + 1
        recent_s = THROUGHPUT_WINDOW_S - 60 + now_s % 60
        totals: dict[str, Counter[str]] = {}
        recent_in: Counter[str] = Counter()
        last_accepted: dict[str, float] = {}
        for (_, tenant), series in self._series.items():
            for m in series.since(first):
                for key in (tenant, ALL):
                    totals.setdefault(key, Counter()).update(m.counts)
                    if m.minute >= recent_first:
                        recent_in[key] += sum(m.counts[o] for o in IN_OUTCOMES)
            if series.last_accepted_s is not None:
                for key in (tenant, ALL):
                    last_accepted[key] = max(last_accepted.get(key, 0.0), series.last_accepted_s)
        lag_buckets: dict[tuple[str, str], list[int]] = {}  # (tenant, sink) and (ALL, sink)
        for (tenant, sink), lag_minutes in self._lags.items():
            for lags in lag_minutes:
                if lags.minute < first:
                    continue
                for pair in ((tenant, sink), (ALL, sink)):
                    merged = lag_buckets.setdefault(pair, [0] * (len(self._bounds) + 1))
                    for i, n in enumerate(lags.buckets):
                        merged[i] += n
        tenants = sorted(set(totals) | {t for t, _ in lag_buckets}, key=lambda t: (t != ALL, t))
        rows = []
        for tenant in tenants:
            counts = totals.get(tenant, Counter())
            per_sink = [self._p95(buckets) for (t, _), buckets in lag_buckets.items() if t == tenant]
            p95 = max((v for v in per_sink if v is not None), default=None)  # the slowest sink's
            shown = _totals(counts)
            rate = shown["dead_lettered"] / shown["records_in"] if shown["records_in"] else 0.0
            rows.append({
                "tenant": tenant, **shown,
                "throughput_per_s": round(recent_in[tenant] / recent_s, 3),
                "dlq_rate": round(rate, 6), "dlq_rate_ok": rate < DLQ_RATE_SLO,
                "lag_p95_s": p95, "lag_ok": p95 is None or p95 <= LAG_P95_SLO_S,
                "freshness_s": round(now_s - last_accepted[tenant], 1) if tenant in last_accepted else None,
            })
        return {"window_minutes": minutes, "throughput_window_s": THROUGHPUT_WINDOW_S,
                "slo": {"dlq_rate": DLQ_RATE_SLO, "lag_p95_s": LAG_P95_SLO_S}, "tenants": rows}

    def _p95(self, buckets: list[int]) -> float | None:
        """The upper bound of the bucket holding the 95th percentile (past the last bound: the
        last bound, "at least that")."""
        total = sum(buckets)
        if not total:
            return None
        wanted = math.ceil(0.95 * total)
        seen = 0
        bucket = 0
        while seen + buckets[bucket] < wanted:
            seen += buckets[bucket]
            bucket += 1
        return self._bounds[min(bucket, len(self._bounds) - 1)]


def _clamp(minutes: int, most: int) -> int:
    return max(1, min(minutes, most))


def _totals(counts: Counter[str]) -> dict[str, int]:
    return {"records_in": sum(counts[o] for o in IN_OUTCOMES), **{o: counts[o] for o in OUTCOMES},
            "dead_lettered": counts["rejected"] + counts["refused"]}
