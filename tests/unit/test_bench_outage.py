"""bench/outage.py, stage (o) of bench/run.py: `--outage SINK:SECONDS` parsed, the worker's /metrics
read, and the per-second samples summarised."""

from __future__ import annotations

import argparse

import pytest

from bench import outage
from bench.outage import Outage, Sample

METRICS = """# HELP ingest_sink_records_total Records handled by a sink, by revision decision.
# TYPE ingest_sink_records_total counter
ingest_sink_records_total{sink="postgres",decision="applied"} 120.0
ingest_sink_records_total{sink="postgres",decision="skipped"} 3.0
ingest_sink_records_total{sink="typesense",decision="applied"} 80.0
ingest_sink_records_total{sink="neo4j",decision="applied"} 7.0
ingest_sink_records_created{sink="postgres",decision="applied"} 1.7e+09
ingest_dlq_total{reason="OLDER_REVISION",stage="sink.typesense"} 2.0
ingest_dlq_total{reason="SCHEMA_INVALID",stage="validate"} 5.0
ingest_backpressure_state 1.0
ingest_brownout_dropped_total{source="kafka"} 0.0
"""
LANES = """ingest_sink_lane_state{sink="postgres"} 0.0
ingest_sink_lane_state{sink="typesense"} 1.0
ingest_sink_spilled_records_total{sink="typesense"} 450.0
"""


def test_parses_sink_and_seconds() -> None:
    assert outage.parse_outage("typesense:60") == Outage("typesense", 60.0)
    assert outage.parse_outage("neo4j:2.5") == Outage("neo4j", 2.5)


@pytest.mark.parametrize(("text", "message"), [
    ("typesense", "expected SINK:SECONDS"),
    ("elastic:60", "unknown sink 'elastic'; one of postgres, neo4j, typesense"),
    ("typesense:soon", "SECONDS must be a number"),
    ("typesense:", "SECONDS must be a number"),
    ("typesense:0", "SECONDS must be a positive number"),
    ("typesense:-5", "SECONDS must be a positive number"),
    ("typesense:inf", "SECONDS must be a positive number"),
    ("typesense:nan", "SECONDS must be a positive number"),
])
def test_refuses_what_is_not_sink_colon_seconds(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        outage.parse_outage(text)


def test_the_option_reports_a_bad_value_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outage", type=outage.parse_outage)
    with pytest.raises(SystemExit):
        parser.parse_args(["--outage", "typesense=60"])
    assert "argument --outage: 'typesense=60': expected SINK:SECONDS" in capsys.readouterr().err


def test_series_reads_labels_and_skips_other_metrics_and_comments() -> None:
    assert outage.series(METRICS, "ingest_sink_records_total") == [
        ({"sink": "postgres", "decision": "applied"}, 120.0),
        ({"sink": "postgres", "decision": "skipped"}, 3.0),
        ({"sink": "typesense", "decision": "applied"}, 80.0),
        ({"sink": "neo4j", "decision": "applied"}, 7.0)]
    assert outage.series(METRICS, "ingest_backpressure_state") == [({}, 1.0)]
    assert outage.series(METRICS, "ingest_dlq") == []  # a prefix of a name is not the name


def test_by_label_is_none_for_a_metric_the_worker_does_not_export() -> None:
    assert outage.by_label(METRICS, "ingest_sink_lane_state", "sink") is None
    assert outage.by_label(LANES, "ingest_sink_lane_state", "sink") == {"postgres": 0.0, "typesense": 1.0}
    assert outage.by_label(METRICS, "ingest_sink_records_total", "sink", decision="applied") == {
        "postgres": 120.0, "typesense": 80.0, "neo4j": 7.0}


def test_a_sample_counts_the_run_sinks_and_the_older_revision_letters() -> None:
    sample = outage.sample_of(METRICS, 3.0, 130, ["postgres", "typesense"])
    assert sample.applied == {"postgres": 120.0, "typesense": 80.0}
    assert sample.handled == {"postgres": 123.0, "typesense": 80.0}
    assert (sample.older_letters, sample.dlq, sample.backpressure) == (2.0, 7.0, 1.0)
    assert sample.lane_state is None and sample.spilled is None
    lanes = outage.sample_of(METRICS + LANES, 4.0, 140, ["postgres", "typesense"])
    assert lanes.lane_state == {"postgres": 0.0, "typesense": 1.0}
    assert lanes.spilled == {"typesense": 450.0}


def test_window_rate_is_the_counters_change_over_the_points_inside() -> None:
    points = [(0.0, 0.0), (1.0, 100.0), (2.0, 200.0), (3.0, 200.0), (4.0, 250.0)]
    assert outage.window_rate(points, 0, 2) == 100.0
    assert outage.window_rate(points, 2, 4) == 25.0
    assert outage.window_rate(points, 0.5, 3.5) == 50.0  # from t=1 to t=3
    assert outage.window_rate(points, 3.5, 4.5) is None  # one point: no rate
    assert outage.window_rate([], 0, 10) is None


def test_transitions_keep_only_the_changes() -> None:
    timeline = [(-2.0, 0.0), (-1.0, 0.0), (0.0, 0.0), (1.04, 1.0), (2.0, 1.0), (3.0, 2.0), (4.0, 0.0)]
    assert outage.transitions(timeline) == [[-2.0, 0.0], [1.0, 1.0], [3.0, 2.0], [4.0, 0.0]]
    assert outage.transitions([(0.0, None), (1.0, None)]) == [[0.0, None]]


def _run(lane: bool = False) -> list[Sample]:
    """100 records/s for 40 s; Typesense down from t=10 to t=20 (nothing applied), back at t=21,
    catches up at 300/s; Postgres 100/s throughout but 90/s while Typesense is down."""
    samples, pg, ts = [], 0.0, 0.0
    for t in range(41):
        if t:
            pg += 90 if 10 < t <= 20 else 100
            if t <= 10:
                ts += 100
            elif t > 21:
                ts = min(ts + 300, 100.0 * t)
        lanes = {"typesense": 1.0 if 10 < t <= 25 else 0.0} if lane else None
        samples.append(Sample(t=float(t), produced=100 * t, applied={"postgres": pg, "typesense": ts},
                              handled={"postgres": pg, "typesense": ts}, lane_state=lanes,
                              spilled={"typesense": ts} if lane else None, backpressure=0.0))
    return samples


def test_summary_rates_share_kept_and_catch_up() -> None:
    report = outage.summarize(_run(), sink="typesense", sinks=["postgres", "typesense"], seconds=10,
                              stopped=10, restarted=20, ready=21, produced_at_restart=2000,
                              production_ended=40, window_s=10)
    assert report["windows_s"] == {"before": [-10, 0], "during": [0, 10], "after": [11, 30]}
    assert report["produced_per_s"] == {"before": 100.0, "during": 100.0, "after": 100.0}
    assert report["applied_per_s"]["postgres"] == {"before": 100.0, "during": 90.0, "after": 100.0}
    assert report["applied_per_s"]["typesense"]["during"] == 0.0
    assert report["others_during_vs_before"] == {"postgres": 0.9}
    # the backlog of 1,100 records (11 s × 100/s) is written at 300/s, 200/s net: 6 s after t=21
    assert report["caught_up_s"] == 6.0
    assert report["caught_up_with_others_s"] == 5.0  # Postgres lost 100 records on the way: 1 s less
    assert report["outage_backlog_written_s"] == 4.0  # 2,000 produced by the restart, handled by t=25
    assert report["lane_state"] is None and report["spilled_records"] is None
    assert report["backpressure_state"] == [[-10.0, 0.0]]
    checked = outage.checks({**report, "lost": 0})
    assert checked == {"others_kept_80pct": True, "caught_up": True, "nothing_lost": True,
                       "no_older_revision_letters": True}


def test_summary_lane_timeline_and_what_fails_the_bar() -> None:
    samples = _run(lane=True)
    samples[-1].older_letters = 1.0
    report = outage.summarize(samples, sink="typesense", sinks=["postgres", "typesense"], seconds=10,
                              stopped=10, restarted=20, ready=21, produced_at_restart=2000,
                              production_ended=40, window_s=10)
    assert report["lane_state"] == {"typesense": [[-10.0, 0.0], [1.0, 1.0], [16.0, 0.0]]}
    assert report["spilled_records"] == {"typesense": 4000.0}
    report["others_during_vs_before"]["postgres"] = 0.79
    assert outage.checks({**report, "lost": 3}) == {
        "others_kept_80pct": False, "caught_up": True, "nothing_lost": False,
        "no_older_revision_letters": False}


def test_a_run_with_one_sink_has_no_others_to_compare() -> None:
    samples = _run()
    for sample in samples:
        del sample.applied["postgres"], sample.handled["postgres"]
    report = outage.summarize(samples, sink="typesense", sinks=["typesense"], seconds=10, stopped=10,
                              restarted=20, ready=21, produced_at_restart=2000, production_ended=40,
                              window_s=10)
    assert report["others_during_vs_before"] == {}
    assert (report["caught_up_s"], report["caught_up_with_others_s"]) == (6.0, None)
