"""The operator's view on a worker of the real stack: checkpoints, dedupe stats, ingest audit and
KPIs agree with what was sent; the viewer token guards them; the operator page, rendered by
Debian's headless Chromium, shows what /health/detailed says."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.dataset import v2
from tests.integration.browser import ARTIFACTS, read_page, rendered_dom, screenshot
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, assert_equal, eventually
from tests.integration.pipeline_helpers import source_topics

VIEWER = "viewer-s3cret"
ADMIN = "admin-s3cret"
GUARDED = ["/", "/operator/state", "/ingest/audit", "/kpis", "/checkpoints", "/checkpoints/x/kafka",
           "/dedupe/stats"]


@pytest.fixture
def fed_worker(kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> tuple[WorkerProcess, str, str]:
    """A worker with the viewer token, after two tenants' records, a duplicate and a record that is
    not JSON went through it."""
    tenant, other = f"{prefix}-acme", f"{prefix}-beta"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_VIEWER_TOKEN=VIEWER, INGEST_ADMIN_TOKEN=ADMIN)
    worker.start()
    records = [v2(tenant, f"doc-{i}", 1) for i in range(5)] + [v2(other, f"doc-{i}", 1) for i in range(2)]
    sent = [(f"{r['tenant']}:{r['id']}".encode(), json.dumps(r).encode()) for r in records]
    kafka.produce(f"{prefix}.source.kafka", [*sent, sent[0], (b"junk", b"{not json")])
    eventually(lambda: assert_equal(len(sinks.postgres([tenant, other])), 7), timeout_s=120,
               context=worker.log_tail)
    eventually(lambda: assert_equal(worker.metric("ingest_dlq_total"), 1.0, "dead letters"), timeout_s=60,
               context=worker.log_tail)
    return worker, tenant, other


def json_of(worker: WorkerProcess, path: str) -> Any:
    status, body = worker.get(path, password=VIEWER)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


def test_views_answer_from_the_workers_state_behind_the_viewer_token(fed_worker, prefix: str) -> None:
    worker, tenant, other = fed_worker
    for path in GUARDED:
        status, _ = worker.get(path)
        assert status == 401, path
        status, _ = worker.get(path, password="wrong")
        assert status == 401, path

    # /health/detailed stays open (probes), without tenant ids or error text unless the token is sent
    status, body = worker.get("/health/detailed")
    assert status == 200 and json.loads(body)["dlq"]["since_start_by_reason"]
    assert all(a.get("tenant") in (None, "hidden") for a in json.loads(body)["adapters"].values())

    def audit_agrees() -> None:
        audit = json_of(worker, "/ingest/audit?source=kafka")
        rows = {r["tenant"]: r for r in audit["rows"]}
        assert_equal({t: (r["records_in"], r["forwarded"], r["duplicate"], r["rejected"])
                      for t, r in rows.items()},
                     {tenant: (6, 5, 1, 0), other: (2, 2, 0, 0), "other": (1, 0, 0, 1)}, "audit")
        assert rows[tenant]["last_accepted_at"] and rows["other"]["last_accepted_at"] is None
        assert sum(m["records_in"] for m in rows[tenant]["per_minute"]) == 6

    eventually(audit_agrees, timeout_s=30, context=worker.log_tail)
    assert json_of(worker, f"/ingest/audit?tenant={other}")["rows"][0]["tenant"] == other
    status, body = worker.get("/ingest/audit?minutes=0", password=VIEWER)
    assert status == 400 and b"minutes" in body

    kpis = json_of(worker, "/kpis")
    overall, mine = kpis["tenants"][0], {t["tenant"]: t for t in kpis["tenants"]}[tenant]
    assert overall["tenant"] == "*" and overall["records_in"] == 9 and overall["dead_lettered"] == 1
    assert overall["dlq_rate"] == pytest.approx(1 / 9, abs=1e-6) and overall["dlq_rate_ok"] is False
    # event times of 2025: far past the 60 s lag SLO, past the histogram's last bound
    assert mine["lag_p95_s"] == 3600 and mine["lag_ok"] is False and mine["dlq_rate_ok"] is True
    assert mine["freshness_s"] is not None and mine["throughput_per_s"] > 0
    assert kpis["slo"] == {"dlq_rate": 0.005, "lag_p95_s": 60.0}

    # checkpoints and dedupe keys: this worker holds every partition, so it answers for all
    everything = json_of(worker, "/checkpoints")
    assert everything["worker"]["partitions"]["kafka"] == [0, 1, 2, 3]
    assert {(r["tenant"], r["source"]) for r in everything["checkpoints"]} == {
        (tenant, "kafka"), (other, "kafka")}
    one = json_of(worker, f"/checkpoints/{other}/kafka")["checkpoints"]
    assert {r["tenant"] for r in one} == {other} and all(r["topic"] == f"{prefix}.source.kafka" for r in one)
    assert json_of(worker, f"/checkpoints/{other}/webhook")["checkpoints"] == []
    status, _ = worker.get(f"/checkpoints/{other}/nosuch", password=VIEWER)
    assert status == 404
    dedupe = {row["source"]: row for row in json_of(worker, "/dedupe/stats")["sources"]}
    assert dedupe["kafka"]["keys"] == 7 and dedupe["webhook"]["keys"] == 0
    assert dedupe["kafka"]["expired_not_evicted"] == 0 and dedupe["kafka"]["oldest_first_seen"]


def test_the_operator_page_in_chromium_shows_what_health_detailed_says(fed_worker) -> None:
    worker, tenant, _ = fed_worker
    status, _ = worker.post("/admin/sources/sftp/disable", token=ADMIN, X_Operator="alice")
    assert status == 200
    url = f"http://ops:{VIEWER}@127.0.0.1:{worker.web_port}/"
    page = read_page(rendered_dom(url))
    assert page.body.get("loaded") == "yes", page.by_id.get("error")
    health = json_of(worker, "/health/detailed")

    assert page.by_id["state"] == health["backpressure"]["state"]
    assert page.by_id["status"] == health["status"]
    for name, adapter in health["adapters"].items():
        shown = page.rows["adapter", name]
        assert float(shown["lag_records"]) == adapter["lag_records"], name
        assert float(shown["lag_seconds"]) == pytest.approx(adapter["lag_seconds"], abs=1.0), name
    assert {name for kind, name in page.rows if kind == "adapter"} == set(health["adapters"])
    assert health["adapters"]["sftp"]["enabled"] is False and page.rows["adapter", "sftp"]["cell2"] == "no"
    assert page.rows["adapter", "kafka"]["cell2"] == "yes"
    # the newest admin action first: who, what, and that it went through
    assert [page.rows["action", "0"][f"cell{n}"] for n in (1, 2, 3)] == ["alice", "source-disable", "ok"]
    for name, sink in health["sinks"].items():
        assert page.rows["sink", name]["cell1"] == sink["circuit"], name
        assert page.rows["sink", name]["last_success_at"] == (sink["last_success_at"] or "—"), name
    for reason, count in health["dlq"]["since_start_by_reason"].items():
        assert int(page.rows["reason", reason]["since_start"]) == count
        assert int(page.rows["reason", reason]["last_hour"]) == health["dlq"]["last_hour_by_reason"][reason]
    assert int(page.rows["tenant", "*"]["records_in"]) == 9
    assert int(page.rows["tenant", tenant]["dead_lettered"]) == 0

    laptop = screenshot(url, ARTIFACTS / "operator-page-laptop.png", width=1280, height=1300)
    phone_url = url
    phone = read_page(rendered_dom(phone_url, width=390, height=844))
    assert phone.body.get("fits") == "true", "the page is wider than a phone's screen"
    screenshot(phone_url, ARTIFACTS / "operator-page-phone.png", width=390, height=844)
    assert laptop.exists()

    # without the token the page itself is refused
    refused = read_page(rendered_dom(f"http://127.0.0.1:{worker.web_port}/"))
    assert "loaded" not in refused.body and not refused.rows
