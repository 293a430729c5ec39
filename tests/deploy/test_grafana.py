"""The Grafana dashboard: well-formed, its datasource a variable, every query valid PromQL (promtool)
over metrics the product really exposes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from ingest_stream.metrics import Metrics
from tests.deploy.grafana import concrete, dashboards, exposed_families, expressions, metric_families
from tests.deploy.test_prometheus import PROMTOOL

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
