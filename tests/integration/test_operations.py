"""Issue 4: the operator's surface — admin routes behind a token, drain/resume, per-source isolation,
`ingest-stream lag`, lag-driven backpressure, and a `/metrics` scrape promtool accepts."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ingest_stream.core.webhook import sign
from ingest_stream.ops.devstack import DevStack
from tests.dataset import v2
from tests.deploy.grafana import dashboards, exposed_families, expressions, metric_families
from tests.integration.harness import (
    PROJECT_ROOT,
    Kafka,
    SinkReader,
    WorkerProcess,
    assert_equal,
    eventually,
    run_tool,
)
from tests.integration.pipeline_helpers import source_topics

TOKEN = "test-admin-token"
QUICK_LAG = {"INGEST_LAG_CHECK_INTERVAL_S": "0.5", "INGEST_ADMIN_TOKEN": TOKEN}


def records(tenant: str, count: int, *, start: int = 0, priority: str = "normal"
            ) -> list[tuple[bytes, bytes]]:
    return [(f"{tenant}:r{i}".encode(), json.dumps(v2(tenant, f"r{i}", 1, priority=priority)).encode())
            for i in range(start, start + count)]


def state(worker: WorkerProcess) -> str:
    return str(worker.get_json("/health/detailed")["backpressure"]["state"])


def transitions(worker: WorkerProcess) -> list[tuple[str, str]]:
    """Every automatic state change the worker logged, in order: polling /health/detailed can miss
    a short-lived state."""
    return re.findall(r"backpressure (\w+) -> (\w+):", worker.log_path.read_text(errors="replace"))


def test_admin_routes_refuse_without_the_token_and_audit_every_attempt(make_worker, kafka: Kafka,
                                                                      prefix: str) -> None:
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(**QUICK_LAG)
    worker.start()
    assert worker.post("/admin/drain")[0] == 401
    assert worker.post("/admin/drain", token="wrong")[0] == 401
    assert state(worker) == "normal"
    status, body = worker.post("/admin/drain", token=TOKEN, X_Operator="alice")
    assert status == 200 and body["backpressure"]["state"] == "drain"
    assert state(worker) == "drain"
    status, body = worker.post("/admin/brownout?rate=0.25", token=TOKEN, X_Operator="alice")
    assert (status, body["backpressure"]["state"], body["backpressure"]["brownout_rate"]) == (
        200, "brownout", 0.25)
    assert worker.post("/admin/brownout?rate=7", token=TOKEN)[0] == 400
    assert worker.post("/admin/resume", token=TOKEN, X_Operator="bob")[0] == 200
    assert state(worker) == "normal"
    assert worker.metric("ingest_backpressure_state") == 0
    trail = worker.get_json("/admin/audit", token=TOKEN)["entries"]
    assert [(e["action"], e["result"].split(":")[0]) for e in trail] == [
        ("drain", "refused"), ("drain", "refused"), ("drain", "ok"), ("brownout", "ok"),
        ("brownout", "rejected"), ("resume", "ok")]
    assert trail[2]["who"] == "alice" and trail[5]["who"] == "bob" and trail[0]["at"]
    # The trail is a file in the data directory too: it survives a restart.
    audit_file = Path(worker.env["INGEST_DATA_DIR"]) / "admin-audit.jsonl"
    assert len(audit_file.read_text().splitlines()) == 6


def test_with_no_token_configured_every_admin_route_refuses(make_worker, kafka: Kafka, prefix: str) -> None:
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_ADMIN_TOKEN="")
    worker.start()
    for route in ("/admin/drain", "/admin/pause", "/admin/resume", "/admin/brownout?rate=0.1"):
        assert worker.post(route, token="")[0] == 401
        assert worker.post(route, token="anything")[0] == 401
    assert state(worker) == "normal"


def test_a_torn_audit_file_and_bad_query_values_stop_nothing(make_worker, kafka: Kafka, prefix: str) -> None:
    """Issue 16: the worker starts on an audit file whose last line was torn, and a query value it
    cannot take is a 400 with a reason."""
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(**QUICK_LAG)
    audit_file = Path(worker.env["INGEST_DATA_DIR"]) / "admin-audit.jsonl"
    audit_file.parent.mkdir(parents=True, exist_ok=True)
    kept = {"at": "2026-01-01T00:00:00Z", "who": "carol", "remote": "10.0.0.1", "action": "pause",
            "params": {}, "result": "ok"}
    audit_file.write_bytes(json.dumps(kept).encode() + b"\n" + b'{"at": "2026-01-01T00:00:01Z", "who": "da')
    worker.start()
    assert "not read (torn or garbled)" in worker.log_tail(200)
    assert _get(worker, "/admin/audit", token=TOKEN) == (200, {"entries": [kept]})

    for query in ("limit=abc", "limit=-1", "limit=1.5"):
        status, body = _get(worker, f"/admin/audit?{query}", token=TOKEN)
        assert status == 400 and "limit must be a whole number" in body["error"], (query, body)
    assert _get(worker, "/admin/audit?limit=abc") == (401, {"error": "unauthorized"})  # the token first
    status, body = worker.post("/admin/brownout?rate=abc", token=TOKEN, X_Operator="alice")
    assert status == 400 and "rate must be a number" in body["error"]
    assert worker.post("/admin/drain", token=TOKEN, X_Operator="alice")[0] == 200
    assert worker.post("/admin/resume", token=TOKEN, X_Operator="alice")[0] == 200
    trail = [(e["who"], e["action"], e["result"].split(":")[0])
             for e in _get(worker, "/admin/audit?limit=10", token=TOKEN)[1]["entries"]]
    assert trail == [("carol", "pause", "ok"), ("127.0.0.1", "read-audit", "refused"),
                     ("alice", "brownout", "rejected"), ("alice", "drain", "ok"), ("alice", "resume", "ok")]
    # The file: the torn fragment stays on its own line, every entry after it is whole.
    lines = audit_file.read_text().splitlines()
    assert lines[1].endswith('"who": "da')
    assert [json.loads(line)["action"] for line in lines[2:]] == ["read-audit", "brownout", "drain", "resume"]
    assert worker.alive


def test_a_replayed_webhook_signature_is_403_and_a_record_kafka_can_never_take_is_413_not_503(
        make_worker, kafka: Kafka, prefix: str) -> None:
    """Issue 16: a replayed signature is 403, and a record Kafka can never take is 413 — not a 503
    inviting the sender to retry for ever."""
    tenant = f"{prefix}-hook"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(**QUICK_LAG, INGEST_WEBHOOK_MAX_BODY_BYTES="4000000",
                                        INGEST_WEBHOOK_AUTH=json.dumps({tenant: {"hmac_secret": "sec"}}))
    worker.start()
    one = json.dumps({**v2(tenant, "w0", 1), "source": "webhook"}).encode()
    stamp = str(int(time.time()))
    signed = {"X-Tenant": tenant, "X-Signature": sign("sec", stamp, one), "X-Signature-Timestamp": stamp}
    assert _post_webhook(worker, one, signed)[0] == 202
    status, body = _post_webhook(worker, one, signed)
    assert status == 403 and "used before" in body["error"]
    huge = json.dumps({**v2(tenant, "w1", 1), "source": "webhook", "attributes": {"body": "x" * 1_500_000}})
    stamp = str(int(time.time()))
    signed = {"X-Tenant": tenant, "X-Signature": sign("sec", stamp, huge.encode()),
              "X-Signature-Timestamp": stamp}
    for _ in range(2):  # refused for good, and not as a replay: the signature was not spent
        status, body = _post_webhook(worker, huge.encode(), signed)
        assert status == 413 and "can never be stored" in body["error"], body
    assert [json.loads(m.value())["id"] for m in kafka.read_all(f"{prefix}.source.webhook")] == ["w0"]
    assert worker.metric("ingest_webhook_requests_total", status="413") == 2
    assert worker.alive


def test_drain_stops_fetching_lag_cli_agrees_with_an_independent_client_and_resume_restarts(
        make_worker, kafka: Kafka, sinks: SinkReader, prefix: str) -> None:
    tenant = f"{prefix}-drain"
    source = f"{prefix}.source.kafka"
    group = f"it-{prefix}"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(**QUICK_LAG)
    worker.start()
    kafka.produce(source, records(tenant, 50))
    eventually(lambda: _assert_rows(sinks, tenant, 50), timeout_s=60, context=worker.log_tail)
    eventually(lambda: _assert_caught_up(kafka, group, source), timeout_s=30)

    assert worker.post("/admin/drain", token=TOKEN)[0] == 200
    before = kafka.committed(group, [source])
    kafka.produce(source, records(tenant, 200, start=50))
    # The worker sees the new records waiting (its own lag measurement) ...
    eventually(lambda: _assert_adapter_lag(worker, "kafka", 200), timeout_s=30, context=worker.log_tail)
    # ... and takes none of them: end offsets moved, committed did not, nothing new in the sink.
    assert kafka.committed(group, [source]) == before
    assert len(sinks.postgres([tenant])) == 50
    assert worker.get_json("/health/detailed")["backpressure"]["held_topics"] == sorted(
        t for t in source_topics(prefix))

    # `ingest-stream lag` reports what librdkafka computes from committed and end offsets (end
    # offsets by reading: Tansu reports a high watermark short of the last batch's records).
    cli = ingest_stream(worker, "lag", "--json", "--topic", source)
    ends = kafka.end_offsets([source])
    committed = kafka.committed(group, [source])
    reported = {(r["topic"], r["partition"]): (r["committed"], r["end"], r["lag"]) for r in cli}
    assert {tp: row for tp, row in reported.items() if tp in ends} == {
        tp: (committed.get(tp), end, end - committed.get(tp, 0)) for tp, end in ends.items()}
    assert all(row[2] == 0 for tp, row in reported.items() if tp not in ends)  # empty partitions
    assert all(r["group"] == group for r in cli)
    assert any(r["lag"] > 0 and r["lag_seconds"] > 0 for r in cli)
    human = ingest_stream(worker, "lag", "--topic", source, json_output=False)
    assert "COMMITTED" in human and source in human

    assert worker.post("/admin/resume", token=TOKEN)[0] == 200
    eventually(lambda: _assert_rows(sinks, tenant, 250), timeout_s=60, context=worker.log_tail)
    eventually(lambda: _assert_caught_up(kafka, group, source), timeout_s=30)


def test_a_disabled_source_is_isolated_while_the_others_flow(make_worker, kafka: Kafka, sinks: SinkReader,
                                                             prefix: str) -> None:
    tenant = f"{prefix}-iso"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(**QUICK_LAG, INGEST_DISABLED_SOURCES="s3")  # from the start
    kafka.produce(f"{prefix}.source.s3", [(k, json.dumps({**json.loads(v), "source": "s3"}).encode())
                                          for k, v in records(tenant, 5, start=500)])
    worker.start()
    kafka.produce(f"{prefix}.source.kafka", records(tenant, 1, start=999))  # flowing: assigned
    eventually(lambda: _assert_rows(sinks, tenant, 1), timeout_s=60, context=worker.log_tail)
    assert worker.post("/admin/sources/webhook/disable", token=TOKEN)[0] == 200
    assert worker.post("/admin/sources/nosuch/disable", token=TOKEN)[0] == 404
    webhook = [(k, json.dumps({**json.loads(v), "source": "webhook"}).encode())
               for k, v in records(tenant, 20, start=100)]
    kafka.produce(f"{prefix}.source.webhook", webhook)
    kafka.produce(f"{prefix}.source.kafka", records(tenant, 20))
    eventually(lambda: _assert_rows(sinks, tenant, 21), timeout_s=60, context=worker.log_tail)
    eventually(lambda: _assert_adapter_lag(worker, "webhook", 20), timeout_s=30)
    adapters = worker.get_json("/health/detailed")["adapters"]
    assert adapters["webhook"]["enabled"] is False and adapters["kafka"]["enabled"] is True
    assert adapters["s3"]["enabled"] is False and adapters["s3"]["lag_records"] == 5
    assert len(sinks.postgres([tenant])) == 21  # nothing from the disabled source
    assert worker.post("/admin/sources/webhook/enable", token=TOKEN)[0] == 200
    eventually(lambda: _assert_rows(sinks, tenant, 41), timeout_s=60, context=worker.log_tail)
    assert not {f"r{i}" for i in range(500, 505)} & {i for _, i in sinks.postgres([tenant])}  # s3: isolated


def test_a_slow_sink_drives_throttled_then_brownout_drops_only_low_priority_and_it_recovers(
        stack: DevStack, make_worker, kafka: Kafka, sinks: SinkReader, prefix: str) -> None:
    """A sink that answers, slowly (a trigger of ours sleeps 0.5 s per row of the test's tenant):
    its records wait, lag rises and backpressure moves. (A sink that does not answer at all spills
    without slowing the others: `test_a_down_sink_spills_without_driving_backpressure`.)"""
    tenant = f"{prefix}-bp"
    source = f"{prefix}.source.kafka"
    kafka.create_topics(source_topics(prefix))
    slow = f"test_slow_{prefix}"
    sinks.execute(f"""CREATE FUNCTION {slow}() RETURNS trigger LANGUAGE plpgsql AS
                      $$ BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$""")
    sinks.execute(f"CREATE TRIGGER {slow} BEFORE INSERT OR UPDATE ON ingest_records FOR EACH ROW "
                  f"WHEN (NEW.tenant = '{tenant}') EXECUTE FUNCTION {slow}()")
    worker: WorkerProcess = make_worker(
        # Throttled for several lag checks on the way up: rising lag jumps straight to the highest
        # level reached, so a check delayed past both thresholds would skip it (as it should).
        **QUICK_LAG, INGEST_THROTTLE_LAG_S="2", INGEST_BROWNOUT_LAG_S="10",
        INGEST_BACKPRESSURE_COOL_DOWN_S="1",
        INGEST_BROWNOUT_RATE="0", INGEST_THROTTLE_RATE="5000", INGEST_SINK_FAILURE_POLICY="hold",
        INGEST_SINK_TIMEOUT_S="120")  # slow, not down: no call times out
    worker.start()
    # Written in process (a lane spills until it has measured its topic after the assignment).
    eventually(lambda: _assert_lane_direct(worker, "postgres"), timeout_s=60, context=worker.log_tail)

    def reached(wanted: str) -> None:
        assert state(worker) == wanted

    try:
        kafka.produce(source, records(tenant, 30))
        eventually(lambda: reached("brownout"), timeout_s=60, interval_s=0.1, context=worker.log_tail)
        assert transitions(worker)[-2:] == [("normal", "throttled"), ("throttled", "brownout")]
        assert "threshold" in worker.get_json("/health/detailed")["backpressure"]["reason"]
        assert worker.get_json("/health/detailed")["sinks"]["postgres"]["circuit"] == "closed"
        low = records(tenant, 40, start=1000, priority="low")
        kept = records(tenant, 20, start=2000, priority="high") + records(tenant, 20, start=3000)
        kafka.produce(source, low + kept)
        eventually(lambda: _assert_rows(sinks, tenant, 70), timeout_s=90, context=worker.log_tail)
        assert worker.metric("ingest_brownout_dropped_total", source="kafka") == 40
    finally:
        sinks.execute(f"DROP TRIGGER {slow} ON ingest_records")
        sinks.execute(f"DROP FUNCTION {slow}()")
    eventually(lambda: reached("normal"), timeout_s=120, interval_s=0.2, context=worker.log_tail)
    # Down one level at a time.
    assert transitions(worker)[-2:] == [("brownout", "throttled"), ("throttled", "normal")]
    held = sinks.postgres([tenant])
    assert not any(record_id.startswith("r1") and len(record_id) == 5 for _, record_id in held)
    assert {i for _, i in held} == {f"r{i}" for i in [*range(30), *range(2000, 2020), *range(3000, 3020)]}
    eventually(lambda: assert_equal(len(sinks.search_documents([tenant])), 70), timeout_s=60)


def test_a_down_sink_spills_without_driving_backpressure(
        stack: DevStack, make_worker, kafka: Kafka, sinks: SinkReader, prefix: str) -> None:
    """Typesense hung (SIGSTOP: nothing answers): its lane spills, its topic's lag grows past the
    throttle threshold, and the state stays normal, then too while it catches up: the records wait
    there durably, and slowing the intake would only slow Postgres and the graph (contract §1)."""
    tenant = f"{prefix}-down"
    source = f"{prefix}.source.kafka"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(
        # The throttle threshold sits above what the source's own lag reaches while the lane finds the
        # sink down: the write's timeout (1 s), then the commit interval (1 s) and a lag measurement
        # (0.5 s, itself up to ~0.7 s late): at 2 s that crossed it now and then.
        **QUICK_LAG, INGEST_THROTTLE_LAG_S="5", INGEST_BROWNOUT_LAG_S="20", INGEST_SINK_FAILURE_POLICY="hold",
        INGEST_SINK_TIMEOUT_S="1", INGEST_SINK_RETRY_CAP_S="0.5", INGEST_BREAKER_OPEN_S="1")
    worker.start()
    for sink in ("postgres", "neo4j", "typesense"):  # assigned and measured: no start-up lag counts
        eventually(lambda sink=sink: _assert_lane_direct(worker, sink), timeout_s=60,
                   context=worker.log_tail)
    with stack.server_paused("typesense"):
        kafka.produce(source, records(tenant, 30))
        eventually(lambda: _assert_rows(sinks, tenant, 30), timeout_s=60, context=worker.log_tail)
        eventually(lambda: _assert_sink_topic_lag(worker, f"{prefix}.sink.typesense", 6.0), timeout_s=60,
                   interval_s=0.2, context=worker.log_tail)
        kafka.produce(source, records(tenant, 30, start=30))
        eventually(lambda: _assert_rows(sinks, tenant, 60), timeout_s=60, context=worker.log_tail)
        assert state(worker) == "normal" and transitions(worker) == []
        assert worker.metric("ingest_sink_lane_state", sink="typesense") != 0
        assert worker.metric("ingest_sink_lane_state", sink="postgres") == 0
    eventually(lambda: assert_equal(len(sinks.search_documents([tenant])), 60), timeout_s=90,
               context=worker.log_tail)
    assert transitions(worker) == []


def _assert_lane_direct(worker: WorkerProcess, sink: str) -> None:
    assert worker.metric("ingest_sink_lane_state", sink=sink) == 0


def _assert_sink_topic_lag(worker: WorkerProcess, topic: str, seconds: float) -> None:
    assert worker.metric("ingest_consumer_lag_seconds", topic=topic) >= seconds


def test_metrics_scrape_passes_promtool(make_worker, kafka: Kafka, prefix: str) -> None:
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(**QUICK_LAG)
    worker.start()
    kafka.produce(f"{prefix}.source.kafka", [*records(f"{prefix}-m", 5), (b"x", b"not json")])
    eventually(lambda: _assert_metric_present(worker, "ingest_consumer_lag_seconds"), timeout_s=30)
    eventually(lambda: _assert_metric_present(worker, "ingest_dlq_total{"), timeout_s=30)
    # Counted after the batch's dedupe keys were written to the store (the bad record may come alone).
    eventually(lambda: assert_equal(worker.metric("ingest_records_total", outcome="forwarded"), 5.0),
               timeout_s=30)
    scrape = worker.metrics()
    for name in ("ingest_records_total", "ingest_dlq_total", "ingest_lag_seconds",
                 "ingest_consumer_lag_records", "ingest_consumer_lag_seconds", "ingest_backpressure_state",
                 "ingest_retry_total",
                 "ingest_circuit_state", "ingest_duplicates_total", "ingest_brownout_dropped_total"):
        assert f"# TYPE {name} " in scrape, name
    # What of the worker's memory is RocksDB's: the dedupe keys of the records sit in memtables.
    samples = {s.name: s.value for family in text_string_to_metric_families(scrape) for s in family.samples}
    assert samples["ingest_rocksdb_memtable_bytes"] > 0, samples
    assert 0 <= samples["ingest_rocksdb_block_cache_bytes"] <= 32 * 1024 * 1024  # the default budget
    assert samples["process_resident_memory_bytes"] > samples["ingest_rocksdb_memtable_bytes"]
    # The dashboard reads only metrics a real worker exposes.
    exposed = exposed_families(scrape)
    for dashboard in dashboards().values():
        for expr in expressions(dashboard):
            assert metric_families(expr) <= exposed, expr
    promtool = PROJECT_ROOT / ".venv" / "bin" / "promtool"
    checked = subprocess.run([str(promtool), "check", "metrics"], input=scrape.encode(), capture_output=True,
                             timeout=30, check=False)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


def ingest_stream(worker: WorkerProcess, *args: str, json_output: bool = True) -> Any:
    return run_tool(worker, "ingest_stream.cli", *args, json_output=json_output)


def _get(worker: WorkerProcess, path: str, token: str | None = None) -> tuple[int, Any]:
    """GET, errors included: (status, decoded JSON body)."""
    request = urllib.request.Request(f"http://127.0.0.1:{worker.web_port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _post_webhook(worker: WorkerProcess, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{worker.web_port}/ingest/webhook", data=body,
                                     method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def _assert_rows(sinks: SinkReader, tenant: str, count: int) -> None:
    assert len(sinks.postgres([tenant])) == count


def _assert_caught_up(kafka: Kafka, group: str, topic: str) -> None:
    lag = kafka.lag(group, [topic])
    assert lag and sum(lag.values()) == 0, lag


def _assert_adapter_lag(worker: WorkerProcess, source: str, at_least: int) -> None:
    adapter = worker.get_json("/health/detailed")["adapters"][source]
    assert adapter["lag_records"] >= at_least, adapter


def _assert_metric_present(worker: WorkerProcess, text: str) -> None:
    assert text in worker.metrics()

