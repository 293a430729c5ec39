"""The Grafana dashboard: well-formed, its datasource a variable, every query valid PromQL (promtool)
over metrics the product really exposes and narrowed by the job / instance variables, the SLOs drawn
on their panels, and a link to the runbook the alerts link."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from ingest_stream.metrics import Metrics
from tests.deploy.grafana import (
    concrete,
    dashboards,
    exposed_families,
    expressions,
    metric_families,
    selectors,
    variables,
)
from tests.deploy.test_prometheus import PROMTOOL, runbook_base

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboards_have_unique_uids_and_panel_ids_and_use_the_datasource_variable():
    found = dashboards()
    assert found, "no dashboard provisioned"
    uids = [d["uid"] for d in found.values()]
    assert len(uids) == len(set(uids)) and all(uids)
    for path, dashboard in found.items():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        datasource = variables["datasource"]
        assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
        assert {"tenant", "source"} <= set(variables)
        for panel in dashboard["panels"]:
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]


def test_every_query_is_valid_promql(tmp_path: Path):
    rules = [{"record": f"dashboard:query_{n}", "expr": concrete(expr)}
             for dashboard in dashboards().values() for n, expr in enumerate(expressions(dashboard))]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_metric_queried_is_one_the_product_exposes():
    exposed = exposed_families(generate_latest(Metrics().registry).decode())
    for dashboard in dashboards().values():
        for expr in expressions(dashboard):
            assert metric_families(expr) <= exposed, expr


def test_the_dashboard_covers_what_operators_watch():
    queried = set().union(*(metric_families(e) for d in dashboards().values() for e in expressions(d)))
    assert queried >= {"ingest_lag_seconds", "ingest_consumer_lag_records", "ingest_consumer_lag_seconds",
                       "ingest_dlq_total", "ingest_records_total", "ingest_sink_records_total",
                       "ingest_backpressure_state", "ingest_circuit_state", "ingest_retry_total",
                       "ingest_duplicates_total", "ingest_brownout_dropped_total",
                       "ingest_tenant_records_total"}


def test_job_and_instance_variables_narrow_every_query():
    for path, dashboard in dashboards().items():
        found = variables(dashboard)
        for name in ("job", "instance"):
            variable = found.get(name)
            assert variable, f"{path.name}: no ${name} variable"
            assert variable["type"] == "query" and variable["datasource"] == DATASOURCE, name
            assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*", name
        assert '{job=~"$job"}' in found["instance"]["definition"], "the worker list follows the job"
        for expr in expressions(dashboard):
            for metric, matchers in selectors(expr):
                assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (metric, expr)


def slo_lines(panel: dict) -> set[float]:
    """Threshold values the panel draws as lines or areas (the base step has no value)."""
    defaults = panel["fieldConfig"]["defaults"]
    style = defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
    steps = defaults.get("thresholds", {}).get("steps", [])
    return set() if style == "off" else {s["value"] for s in steps if s["value"] is not None}


def test_the_slos_are_drawn_on_the_lag_and_dlq_panels():
    # contract §7: p95 of ingest_lag_seconds <= 60 s; DLQ rate < 0.5 % of records.
    lag = dlq = 0
    for dashboard in dashboards().values():
        for panel in dashboard["panels"]:
            exprs = " ".join(t["expr"] for t in panel["targets"])
            if "histogram_quantile(0.95" in exprs and "ingest_lag_seconds_bucket" in exprs:
                assert panel["fieldConfig"]["defaults"]["unit"] == "s", panel["title"]
                assert 60 in slo_lines(panel), panel["title"]
                lag += 1
            if "ingest_dlq_total" in exprs and "/ sum(rate(ingest_records_total" in exprs:
                assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit", panel["title"]
                assert 0.005 in slo_lines(panel), panel["title"]
                dlq += 1
    assert lag and dlq, "no lag p95 or DLQ share panel"


def test_the_dashboard_links_the_runbook_the_alerts_link():
    for path, dashboard in dashboards().items():
        links = {link["title"]: link for link in dashboard.get("links", [])}
        assert links.get("Runbook", {}).get("url") == runbook_base(), path.name
