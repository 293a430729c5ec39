"""`observe_all` against prometheus_client's own `observe`: the same buckets, count and sum."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram

from ingest_stream.metrics import LAG_BUCKETS_S, observe_all


def _samples(histogram: Histogram) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value
            for metric in histogram.collect() for s in metric.samples if not s.name.endswith("_created")}


def _pair() -> tuple[Histogram, Histogram]:
    registry = CollectorRegistry()
    return tuple(Histogram(f"lag_{n}", "lag", ["sink"], buckets=LAG_BUCKETS_S, registry=registry)
                 for n in ("one_by_one", "all"))  # type: ignore[return-value]


def test_observe_all_counts_as_observe_one_by_one() -> None:
    one_by_one, at_once = _pair()
    rng = random.Random(7)
    # on every bound, between bounds, 0, and past the last finite bound (+Inf's bucket)
    amounts = [*LAG_BUCKETS_S, 0.0, 7200.0, *(rng.uniform(0, 4000) for _ in range(500))]
    for amount in amounts:
        one_by_one.labels("pg").observe(amount)
    observe_all(at_once.labels("pg"), amounts[:300])
    observe_all(at_once.labels("pg"), amounts[300:])
    observe_all(at_once.labels("pg"), [])
    expected = {(name.replace("one_by_one", "all"), le): v for (name, le), v in _samples(one_by_one).items()}
    assert _samples(at_once) == pytest.approx(expected)
    assert _samples(at_once)[("lag_all_count", "")] == len(amounts)

