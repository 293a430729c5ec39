"""The in-memory ingestion audit behind GET /ingest/audit and GET /kpis: totals per source and
tenant, minute by minute over a bounded window, and the KPIs against their SLOs."""

import pytest

from ingest_stream.core.audit import DLQ_RATE_SLO, LAG_P95_SLO_S, THROUGHPUT_WINDOW_S, IngestAudit
from ingest_stream.metrics import LAG_BUCKETS_S

T = 1_800_000_000.0  # a minute boundary: 2027-01-15T08:00:00Z
T_AT = "2027-01-15T08:00:00.000Z"
MIN = 60.0
COUNT_KEYS = ("records_in", "forwarded", "duplicate", "rejected", "dropped", "refused", "dead_lettered")


def totals(forwarded=0, duplicate=0, rejected=0, dropped=0, refused=0):
    return {"records_in": forwarded + duplicate + rejected + dropped, "forwarded": forwarded,
            "duplicate": duplicate, "rejected": rejected, "dropped": dropped, "refused": refused,
            "dead_lettered": rejected + refused}


def only_row(rows):
    assert len(rows) == 1
    return rows[0]


def minutes_of(row):
    return [m["minute"] for m in row["per_minute"]]


def kpi_rows(log, **kwargs):
    return {row["tenant"]: row for row in log.kpis(**kwargs)["tenants"]}


# --- audit() ---------------------------------------------------------------------------------------


def test_a_row_totals_each_outcome_with_records_in_and_dead_lettered():
    log = IngestAudit(LAG_BUCKETS_S)
    for outcome, n in [("forwarded", 10), ("duplicate", 3), ("rejected", 2), ("dropped", 1), ("refused", 4)]:
        log.count("webhook", "acme", outcome, n, now_s=T + 1)
    row = only_row(log.audit(now_s=T + 30))
    assert row == {
        "source": "webhook", "tenant": "acme", **totals(10, 3, 2, 1, 4),
        "last_accepted_at": "2027-01-15T08:00:01.000Z",
        "per_minute": [{"minute": T_AT, **totals(10, 3, 2, 1, 4)}],
    }
    assert row["records_in"] == 16 and row["dead_lettered"] == 6


def test_counts_of_the_same_outcome_add_up_within_a_minute():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 2, now_s=T + 1)
    log.count("webhook", "acme", "forwarded", 5, now_s=T + 59)
    row = only_row(log.audit(now_s=T + 59))
    assert row["forwarded"] == 7
    assert row["per_minute"] == [{"minute": T_AT, **totals(forwarded=7)}]


def test_refused_records_are_dead_lettered_but_not_records_in():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "refused", 5, now_s=T)
    row = only_row(log.audit(now_s=T))
    assert (row["records_in"], row["refused"], row["dead_lettered"]) == (0, 5, 5)


def test_one_row_per_source_and_tenant_sorted_by_source_then_tenant():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T)
    log.count("s3", "beta", "forwarded", 2, now_s=T)
    log.count("s3", "acme", "duplicate", 3, now_s=T)
    rows = log.audit(now_s=T)
    assert [(r["source"], r["tenant"]) for r in rows] == [("s3", "acme"), ("s3", "beta"), ("webhook", "acme")]
    assert [r["records_in"] for r in rows] == [3, 2, 1]


def test_per_minute_lists_only_minutes_that_saw_records_oldest_first():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T - 10 * MIN + 5)
    log.count("webhook", "acme", "rejected", 2, now_s=T - 3 * MIN + 59)
    log.count("webhook", "acme", "forwarded", 4, now_s=T + 5)
    row = only_row(log.audit(now_s=T + 5))
    assert minutes_of(row) == ["2027-01-15T07:50:00.000Z", "2027-01-15T07:57:00.000Z", T_AT]
    assert [m["records_in"] for m in row["per_minute"]] == [1, 2, 4]
    assert row["records_in"] == 7


def test_a_minute_older_than_the_window_asked_is_left_out():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T - 5 * MIN)  # 5 minutes before this one
    log.count("webhook", "acme", "forwarded", 2, now_s=T - 4 * MIN)  # the oldest of the last 5
    row = only_row(log.audit(now_s=T + 30, minutes=5))
    assert minutes_of(row) == ["2027-01-15T07:56:00.000Z"]
    assert row["forwarded"] == 2


def test_the_default_window_is_the_last_60_minutes_this_one_included():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T - 60 * MIN)
    log.count("webhook", "acme", "forwarded", 2, now_s=T - 59 * MIN)
    log.count("webhook", "acme", "forwarded", 4, now_s=T)
    row = only_row(log.audit(now_s=T))
    assert minutes_of(row) == ["2027-01-15T07:01:00.000Z", T_AT]
    assert row["forwarded"] == 6


def test_a_source_and_tenant_with_nothing_in_the_window_has_no_row():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "old", "forwarded", 1, now_s=T - 2 * MIN)
    log.count("webhook", "acme", "forwarded", 1, now_s=T)
    assert [r["tenant"] for r in log.audit(now_s=T, minutes=2)] == ["acme"]
    assert [r["tenant"] for r in log.audit(now_s=T, minutes=3)] == ["acme", "old"]


@pytest.mark.parametrize(("asked", "counted"), [(0, 1), (-3, 1), (1, 1), (60, 60), (61, 60), (1000, 60)])
def test_minutes_asked_are_clamped_to_one_and_the_window(asked, counted):
    log = IngestAudit(LAG_BUCKETS_S)
    for back in range(61, -1, -1):  # one record in each of the last 62 minutes, oldest first
        log.count("webhook", "acme", "forwarded", 1, now_s=T - back * MIN)
    assert only_row(log.audit(now_s=T, minutes=asked))["forwarded"] == counted


def test_minutes_are_clamped_to_a_smaller_window_too():
    log = IngestAudit(LAG_BUCKETS_S, window_minutes=3)
    for back in range(3):
        log.count("webhook", "acme", "forwarded", 1, now_s=T - back * MIN)
    assert only_row(log.audit(now_s=T, minutes=60))["forwarded"] == 3
    assert log.kpis(now_s=T, minutes=60)["window_minutes"] == 3
    assert log.kpis(now_s=T, minutes=0)["window_minutes"] == 1


def test_rows_can_be_filtered_by_tenant_by_source_or_both():
    log = IngestAudit(LAG_BUCKETS_S)
    for source, tenant in [("webhook", "acme"), ("webhook", "beta"), ("s3", "acme"), ("s3", "beta")]:
        log.count(source, tenant, "forwarded", 1, now_s=T)

    def pairs(**kwargs):
        return [(r["source"], r["tenant"]) for r in log.audit(now_s=T, **kwargs)]

    assert pairs(tenant="acme") == [("s3", "acme"), ("webhook", "acme")]
    assert pairs(source="webhook") == [("webhook", "acme"), ("webhook", "beta")]
    assert pairs(tenant="beta", source="s3") == [("s3", "beta")]
    assert pairs(tenant="nobody") == []


def test_last_accepted_at_only_moves_on_forwarded_records():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T + 1)
    for outcome in ("duplicate", "rejected", "dropped", "refused"):
        log.count("webhook", "acme", outcome, 1, now_s=T + 20)
    assert only_row(log.audit(now_s=T + 30))["last_accepted_at"] == "2027-01-15T08:00:01.000Z"
    log.count("webhook", "acme", "forwarded", 1, now_s=T + 25.5)
    assert only_row(log.audit(now_s=T + 30))["last_accepted_at"] == "2027-01-15T08:00:25.500Z"


def test_a_source_and_tenant_that_never_forwarded_has_no_last_accepted_at():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "rejected", 3, now_s=T)
    assert only_row(log.audit(now_s=T))["last_accepted_at"] is None


def test_an_unknown_outcome_is_refused_and_nothing_is_counted():
    log = IngestAudit(LAG_BUCKETS_S)
    with pytest.raises(ValueError, match="unknown outcome 'accepted'"):
        log.count("webhook", "acme", "accepted", 1, now_s=T)
    assert log.audit(now_s=T) == []


def test_only_the_last_window_minutes_are_kept_in_memory():
    log = IngestAudit(LAG_BUCKETS_S, window_minutes=3)
    for back in (4, 3, 2, 1, 0):  # five distinct minutes, oldest first
        log.count("webhook", "acme", "forwarded", 1, now_s=T - back * MIN)
        log.lags("acme", "typesense", [1.0], now_s=T - back * MIN)
        log.letter("validation", now_s=T - back * MIN)
    kept = log._series["webhook", "acme"].minutes
    assert [m.minute for m in kept] == [int(T // 60) - 2, int(T // 60) - 1, int(T // 60)]
    assert len(log._lags["acme", "typesense"]) == 3
    assert len(log._letters.minutes) == 3
    row = only_row(log.audit(now_s=T))
    assert minutes_of(row) == ["2027-01-15T07:58:00.000Z", "2027-01-15T07:59:00.000Z", T_AT]


# --- kpis() ----------------------------------------------------------------------------------------


def test_kpis_say_their_window_and_slos():
    answer = IngestAudit(LAG_BUCKETS_S).kpis(now_s=T)
    assert answer == {"window_minutes": 60, "throughput_window_s": THROUGHPUT_WINDOW_S,
                      "slo": {"dlq_rate": DLQ_RATE_SLO, "lag_p95_s": LAG_P95_SLO_S}, "tenants": []}
    assert (DLQ_RATE_SLO, LAG_P95_SLO_S, THROUGHPUT_WINDOW_S) == (0.005, 60.0, 300)


def test_the_overall_row_comes_first_and_sums_every_tenant_over_every_source():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "beta", "forwarded", 7, now_s=T - 30 * MIN)
    log.count("webhook", "acme", "forwarded", 10, now_s=T)
    log.count("s3", "acme", "rejected", 2, now_s=T - MIN)
    log.count("s3", "beta", "duplicate", 4, now_s=T)
    log.count("s3", "beta", "refused", 1, now_s=T)
    log.count("webhook", "acme", "dropped", 3, now_s=T)
    rows = log.kpis(now_s=T + 30)["tenants"]
    assert [r["tenant"] for r in rows] == ["*", "acme", "beta"]
    overall, acme, beta = rows
    assert {k: acme[k] for k in COUNT_KEYS} == totals(forwarded=10, rejected=2, dropped=3)
    assert {k: beta[k] for k in COUNT_KEYS} == totals(forwarded=7, duplicate=4, refused=1)
    assert {k: overall[k] for k in COUNT_KEYS} == {k: acme[k] + beta[k] for k in COUNT_KEYS}


def test_kpis_leave_out_minutes_older_than_the_window():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 100, now_s=T - 10 * MIN)
    log.count("webhook", "acme", "forwarded", 1, now_s=T)
    assert kpi_rows(log, now_s=T, minutes=10)["acme"]["forwarded"] == 1
    assert kpi_rows(log, now_s=T, minutes=11)["acme"]["forwarded"] == 101
    log.count("webhook", "gone", "forwarded", 1, now_s=T - 10 * MIN)
    assert set(kpi_rows(log, now_s=T, minutes=10)) == {"*", "acme"}


@pytest.mark.parametrize(("forwarded", "rejected", "refused", "rate", "ok"), [
    (996, 4, 0, 0.004, True),
    (995, 5, 0, 0.005, False),  # the SLO is "below 0.5 %": exactly 0.5 % is a breach
    (997, 3, 2, 0.005, False),  # refused records are dead letters too
    (1000, 0, 0, 0.0, True),
])
def test_dlq_rate_is_dead_lettered_over_records_in_against_the_slo(forwarded, rejected, refused, rate, ok):
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", forwarded, now_s=T)
    log.count("webhook", "acme", "rejected", rejected, now_s=T)
    log.count("webhook", "acme", "refused", refused, now_s=T)
    row = kpi_rows(log, now_s=T)["acme"]
    assert (row["records_in"], row["dead_lettered"]) == (1000, rejected + refused)
    assert (row["dlq_rate"], row["dlq_rate_ok"]) == (rate, ok)


def test_a_tenant_without_records_in_has_a_zero_dlq_rate():
    log = IngestAudit(LAG_BUCKETS_S)
    log.lags("acme", "typesense", [1.0], now_s=T)
    row = kpi_rows(log, now_s=T)["acme"]
    assert (row["records_in"], row["dlq_rate"], row["dlq_rate_ok"]) == (0, 0.0, True)


def test_throughput_is_records_in_over_four_whole_minutes_and_this_one_so_far():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 999, now_s=T - 5 * MIN + 59)  # before the last 5 minutes
    log.count("webhook", "acme", "forwarded", 100, now_s=T - 4 * MIN)
    log.count("s3", "acme", "duplicate", 150, now_s=T - MIN + 10)
    log.count("s3", "acme", "rejected", 50, now_s=T - MIN + 20)
    log.count("webhook", "acme", "dropped", 240, now_s=T + 29)
    log.count("webhook", "acme", "refused", 50, now_s=T + 29)  # not records in
    log.count("webhook", "beta", "forwarded", 27, now_s=T + 1)
    rows = kpi_rows(log, now_s=T + 30)
    # 4 whole minutes (240 s) and 30 s of this one: 270 s.
    assert rows["acme"]["throughput_per_s"] == (100 + 150 + 50 + 240) / 270 == 2.0
    assert rows["beta"]["throughput_per_s"] == 27 / 270 == 0.1
    assert rows["*"]["throughput_per_s"] == 567 / 270 == 2.1
    assert rows["acme"]["records_in"] == 999 + 540  # the hour still counts the older minute


def test_throughput_is_rounded_to_three_decimals():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T + 15)
    # 240 s + 20 s of this minute
    assert kpi_rows(log, now_s=T + 20)["acme"]["throughput_per_s"] == round(1 / 260, 3) == 0.004


@pytest.mark.parametrize(("lags", "p95"), [
    ([0.2] * 95 + [50.0] * 5, 0.25),  # the 95th of 100 is in the bucket up to 0.25 s
    ([0.2] * 94 + [50.0] * 6, 60),  # one more slow record and it is not
    ([0.3] * 100, 0.5),
    ([1.0] * 20, 1),  # a bound is the upper end of its own bucket
    ([60.0] * 20, 60),
    ([60.001] * 20, 120),
    ([5000.0] * 3, 3600),  # past the last bound: the last bound ("at least that")
])
def test_lag_p95_is_the_upper_bound_of_the_bucket_holding_the_95th_percentile(lags, p95):
    log = IngestAudit(LAG_BUCKETS_S)
    log.lags("acme", "typesense", lags, now_s=T)
    assert kpi_rows(log, now_s=T)["acme"]["lag_p95_s"] == p95
    assert kpi_rows(log, now_s=T)["*"]["lag_p95_s"] == p95


@pytest.mark.parametrize(("lag", "ok"), [(59.0, True), (60.0, True), (60.5, False), (10_000.0, False)])
def test_lag_is_ok_up_to_and_including_60_seconds(lag, ok):
    log = IngestAudit(LAG_BUCKETS_S)
    log.lags("acme", "typesense", [lag] * 10, now_s=T)
    assert kpi_rows(log, now_s=T)["acme"]["lag_ok"] is ok


def test_a_tenant_lag_is_its_slowest_sinks_p95():
    log = IngestAudit(LAG_BUCKETS_S)
    log.lags("acme", "typesense", [0.2] * 10, now_s=T)
    log.lags("acme", "postgres", [25.0] * 10, now_s=T)
    log.lags("beta", "typesense", [3.0] * 10, now_s=T)
    rows = kpi_rows(log, now_s=T)
    assert (rows["acme"]["lag_p95_s"], rows["beta"]["lag_p95_s"], rows["*"]["lag_p95_s"]) == (30, 5, 30)
    assert all(row["lag_ok"] for row in rows.values())


def test_lags_of_every_minute_in_the_window_are_merged_and_older_ones_left_out():
    log = IngestAudit(LAG_BUCKETS_S)
    log.lags("acme", "typesense", [500.0] * 100, now_s=T - 10 * MIN)
    log.lags("acme", "typesense", [0.2] * 50, now_s=T - MIN)
    log.lags("acme", "typesense", [0.2] * 50, now_s=T)
    assert kpi_rows(log, now_s=T, minutes=10)["acme"]["lag_p95_s"] == 0.25
    assert kpi_rows(log, now_s=T, minutes=11)["acme"]["lag_p95_s"] == 600


def test_without_lags_the_p95_is_none_and_ok():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T)
    row = kpi_rows(log, now_s=T)["acme"]
    assert (row["lag_p95_s"], row["lag_ok"]) == (None, True)


def test_freshness_is_seconds_since_the_last_forwarded_record():
    log = IngestAudit(LAG_BUCKETS_S)
    log.count("webhook", "acme", "forwarded", 1, now_s=T + 10)
    log.count("s3", "acme", "forwarded", 1, now_s=T + 20)
    log.count("webhook", "acme", "duplicate", 1, now_s=T + 40)  # not accepted: no fresher
    log.count("webhook", "beta", "forwarded", 1, now_s=T - 2 * MIN)
    log.count("webhook", "never", "rejected", 1, now_s=T)
    rows = kpi_rows(log, now_s=T + 42.5)
    assert rows["acme"]["freshness_s"] == 22.5
    assert rows["beta"]["freshness_s"] == 162.5
    assert rows["*"]["freshness_s"] == 22.5  # the freshest tenant
    assert rows["never"]["freshness_s"] is None


# --- dead letters ---------------------------------------------------------------------------------


def test_dead_letters_are_counted_by_reason_over_the_window():
    log = IngestAudit(LAG_BUCKETS_S)
    log.letter("validation", now_s=T - 60 * MIN)  # just out of the hour
    log.letter("validation", now_s=T - 59 * MIN)
    log.letter("sink_refused", now_s=T - 5 * MIN)
    log.letter("validation", now_s=T + 1)
    log.letter("brownout", now_s=T + 2)
    assert log.letters_by_reason(now_s=T + 3) == {"brownout": 1, "sink_refused": 1, "validation": 2}
    assert list(log.letters_by_reason(now_s=T + 3)) == ["brownout", "sink_refused", "validation"]
    assert log.letters_by_reason(now_s=T + 3, minutes=5) == {"brownout": 1, "validation": 1}
    assert log.letters_by_reason(now_s=T + 3, minutes=0) == {"brownout": 1, "validation": 1}
    assert log.letters_by_reason(now_s=T + 3, minutes=6) == {
        "brownout": 1, "sink_refused": 1, "validation": 1}


def test_no_dead_letters_is_an_empty_count():
    assert IngestAudit(LAG_BUCKETS_S).letters_by_reason(now_s=T) == {}


def test_a_wall_clock_stepped_back_counts_in_the_newest_minute_so_minutes_stay_in_order():
    audit = IngestAudit(LAG_BUCKETS_S)
    audit.count("kafka", "acme", "forwarded", 1, now_s=T + 5 * MIN)
    audit.count("kafka", "acme", "forwarded", 2, now_s=T + 2 * MIN)  # NTP stepped the clock back
    audit.lags("acme", "postgres", [1.0], now_s=T + 5 * MIN)
    audit.lags("acme", "postgres", [1.0], now_s=T + 2 * MIN)
    [row] = audit.audit(now_s=T + 5 * MIN)
    assert [(m["minute"], m["forwarded"]) for m in row["per_minute"]] == [("2027-01-15T08:05:00.000Z", 3)]
    assert audit.kpis(now_s=T + 5 * MIN)["tenants"][0]["lag_p95_s"] == 1.0
