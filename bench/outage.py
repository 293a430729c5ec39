"""Stage (o) of bench/run.py, its pure part: `--outage SINK:SECONDS` parsed, the worker's /metrics read
into one sample a second, and the samples summarised (rates per window, catch-up, lane timeline).

The stage itself (a worker, a paced producer, the sink's server stopped and started) is
`IngestStages.outage` in bench/run.py; everything here is arithmetic on what it recorded, unit-tested
in tests/unit/test_bench_outage.py.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ingest_stream.sinks.registry import SINK_NAMES

# The DevStack server behind each sink (DevStack.servers).
SERVER_OF_SINK = {"postgres": "postgres", "neo4j": "graph", "typesense": "typesense"}
MIN_SHARE_KEPT = 0.8  # the bar: the other sinks keep this share of their rate before the outage
DECISIONS = ("applied", "skipped", "older", "failed")  # ingest_sink_records_total's decisions


@dataclass(frozen=True)
class Outage:
    sink: str
    seconds: float


def parse_outage(text: str) -> Outage:
    """`SINK:SECONDS` (e.g. `typesense:60`); argparse's `type=` (ArgumentTypeError is its message)."""
    sink, colon, seconds = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SINK:SECONDS, e.g. typesense:60")
    sink = sink.strip()
    if sink not in SINK_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown sink {sink!r}; one of {', '.join(SINK_NAMES)}")
    try:
        value = float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: SECONDS must be a number of seconds, e.g. {sink}:60") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a positive number of seconds")
    return Outage(sink, value)


def series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` in a Prometheus text exposition: (labels, value) each."""
    found = []
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head == name:
            labels: dict[str, str] = {}
        elif head.startswith(name + "{") and head.endswith("}"):
            labels = {}
            for part in head[len(name) + 1:-1].split('",'):
                key, _, raw = part.partition("=")
                if key:
                    labels[key.strip(", ")] = raw.strip().strip('"')
        else:
            continue  # another metric whose name starts with this one
        found.append((labels, float(value)))
    return found


def by_label(text: str, name: str, label: str, **where: str) -> dict[str, float] | None:
    """Metric `name`'s samples matching `where`, summed per value of `label`; None when the worker
    does not export the metric at all."""
    samples = series(text, name)
    if not samples:
        return None
    sums: dict[str, float] = {}
    for labels, value in samples:
        if all(labels.get(k) == v for k, v in where.items()) and label in labels:
            sums[labels[label]] = sums.get(labels[label], 0.0) + value
    return sums


@dataclass
class Sample:
    """One scrape of the worker's /metrics, at `t` (monotonic seconds), with the records produced by then."""

    t: float
    produced: int
    applied: dict[str, float] = field(default_factory=dict)
    handled: dict[str, float] = field(default_factory=dict)  # every decision: applied, skipped, ...
    lane_state: dict[str, float] | None = None  # ingest_sink_lane_state, where exported
    spilled: dict[str, float] | None = None  # ingest_sink_spilled_records_total, where exported
    backpressure: float | None = None
    older_letters: float = 0.0
    dlq: float = 0.0
    dropped: float = 0.0


def sample_of(text: str, t: float, produced: int, sinks: Sequence[str]) -> Sample:
    records = series(text, "ingest_sink_records_total")
    applied = dict.fromkeys(sinks, 0.0)
    handled = dict.fromkeys(sinks, 0.0)
    for labels, value in records:
        sink = labels.get("sink", "")
        if sink in handled and labels.get("decision") in DECISIONS:
            handled[sink] += value
            if labels["decision"] == "applied":
                applied[sink] += value
    backpressure = series(text, "ingest_backpressure_state")
    return Sample(t=t, produced=produced, applied=applied, handled=handled,
                  lane_state=by_label(text, "ingest_sink_lane_state", "sink"),
                  spilled=by_label(text, "ingest_sink_spilled_records_total", "sink"),
                  backpressure=backpressure[0][1] if backpressure else None,
                  older_letters=sum(v for labels, v in series(text, "ingest_dlq_total")
                                    if labels.get("reason") == "OLDER_REVISION"),
                  dlq=sum(v for _, v in series(text, "ingest_dlq_total")),
                  dropped=sum(v for _, v in series(text, "ingest_brownout_dropped_total")))


def window_rate(points: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """The rate of a counter over [start, end], from (time, value) points in time order: its change
    between the first point in the window and the last, over their distance; None with fewer than
    two points there."""
    inside = [(t, v) for t, v in points if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (t0, v0), (t1, v1) = inside[0], inside[-1]
    return round((v1 - v0) / (t1 - t0), 1)


def first_time(points: Sequence[tuple[float, float]], since: float, at_least: float) -> float | None:
    """The first time at or after `since` at which the value reached `at_least`; None if never."""
    return next((t for t, v in points if t >= since and v >= at_least), None)


def transitions(points: Sequence[tuple[float, float | None]]) -> list[list[float | None]]:
    """A per-second timeline reduced to its changes: [time, value] where the value differs from the
    one before (the first point always)."""
    changes: list[list[float | None]] = []
    for t, value in points:
        if not changes or changes[-1][1] != value:
            changes.append([round(t, 1), value])
    return changes


def share(part: float | None, whole: float | None) -> float | None:
    return round(part / whole, 3) if part is not None and whole else None


def summarize(samples: Sequence[Sample], *, sink: str, sinks: Sequence[str], seconds: float,
              stopped: float, restarted: float, ready: float, produced_at_restart: int,
              production_ended: float, window_s: float) -> dict[str, Any]:
    """The outage's figures from the samples. Times are monotonic seconds; the report counts them
    from the moment the server was stopped. Windows: `before` the `window_s` up to the stop,
    `during` from the stop to the restart, `after` from the server answering again to the end of
    production (the down sink's rate there includes its catch-up).

    Caught up (`caught_up_s`, from the server answering again): the first second at which the down
    sink's backlog (records produced minus records it handled) is back to the most it was in the
    `before` window; where backpressure throttled the source meanwhile, that backlog includes the
    source's lag, and it is the whole pipeline catching up. `caught_up_with_others_s`: the same
    against the other sinks (the slowest one's records handled), None without another sink;
    `outage_backlog_written_s`: when it had handled every record produced up to the restart."""
    windows = {"before": (stopped - window_s, stopped), "during": (stopped, restarted),
               "after": (ready, production_ended)}

    def rates(points: list[tuple[float, float]]) -> dict[str, float | None]:
        return {name: window_rate(points, *bounds) for name, bounds in windows.items()}

    applied = {s: rates([(x.t, x.applied[s]) for x in samples]) for s in sinks}
    kept = {s: share(applied[s]["during"], applied[s]["before"]) for s in sinks if s != sink}
    backlog = [(x.t, x.produced - x.handled[sink]) for x in samples]
    before_backlog = [b for t, b in backlog if windows["before"][0] <= t <= stopped]
    caught_up = written = None
    if before_backlog:
        normal = max(before_backlog)
        caught_up = next((t - ready for t, b in backlog if t >= ready and b <= normal), None)
    others = [s for s in sinks if s != sink]
    with_others = None
    if others:
        gap = [(x.t, min(x.handled[o] for o in others) - x.handled[sink]) for x in samples]
        before_gap = [g for t, g in gap if windows["before"][0] <= t <= stopped]
        if before_gap:
            normal = max(before_gap)
            with_others = next((t - ready for t, g in gap if t >= ready and g <= normal), None)
    reached = first_time([(x.t, x.handled[sink]) for x in samples], ready, produced_at_restart)
    if reached is not None:
        written = reached - ready
    lanes = {s for x in samples if x.lane_state for s in x.lane_state}
    spilled = {s for x in samples if x.spilled for s in x.spilled}
    last = samples[-1] if samples else None

    def at(t: float) -> float:
        return round(t - stopped, 1)

    return {
        "sink": sink, "seconds": seconds,
        "windows_s": {name: [at(a), at(b)] for name, (a, b) in windows.items()},
        "produced_per_s": rates([(x.t, float(x.produced)) for x in samples]),
        "applied_per_s": applied,
        "others_during_vs_before": kept,
        "caught_up_s": None if caught_up is None else round(caught_up, 1),
        "caught_up_with_others_s": None if with_others is None else round(with_others, 1),
        "outage_backlog_written_s": None if written is None else round(written, 1),
        "lane_state": {s: transitions([(at(x.t), (x.lane_state or {}).get(s)) for x in samples])
                       for s in sorted(lanes)} or None,
        "spilled_records": {s: max((x.spilled or {}).get(s, 0.0) for x in samples)
                            for s in sorted(spilled)} or None,
        "backpressure_state": transitions([(at(x.t), x.backpressure) for x in samples]),
        "brownout_dropped": last.dropped if last else None,
        "dlq_older_revision": last.older_letters if last else None,
        "dlq_total": last.dlq if last else None,
    }


def checks(report: dict[str, Any]) -> dict[str, bool]:
    """The acceptance bar, on a finished report (with its `completeness`)."""
    kept = report["others_during_vs_before"].values()
    return {"others_kept_80pct": all(k is not None and k >= MIN_SHARE_KEPT for k in kept),
            "caught_up": report["caught_up_s"] is not None,
            "nothing_lost": report.get("lost") == 0,
            "no_older_revision_letters": report["dlq_older_revision"] == 0}
