"""Issue 6: source adapters. The webhook, through HTTP, into the sinks."""

from __future__ import annotations

import gzip
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from ingest_stream.core.webhook import sign
from tests.dataset import v2
from tests.integration.harness import Kafka, SinkReader, WorkerProcess, assert_equal, eventually, headers_of
from tests.integration.pipeline_helpers import source_topics

ADMIN = "admin-token"


def post(worker: WorkerProcess, body: bytes, *, tenant: str | None = None,
         content_type: str = "application/json", **headers: str) -> tuple[int, Any, dict[str, str]]:
    url = f"http://127.0.0.1:{worker.web_port}/ingest/webhook"
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", content_type)
    if tenant is not None:
        request.add_header("X-Tenant", tenant)
    for name, value in headers.items():
        request.add_header(name.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), dict(error.headers)


def batch(tenant: str, start: int, count: int) -> list[dict[str, Any]]:
    return [{**v2(tenant, f"w{i}", 1), "source": "webhook"} for i in range(start, start + count)]


def test_webhook_accepts_framed_authenticated_records_and_refuses_the_rest_without_crashing(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    bearer, signed = f"{prefix}-bearer", f"{prefix}-signed"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(
        INGEST_ADMIN_TOKEN=ADMIN, INGEST_WEBHOOK_MAX_BODY_BYTES="20000",
        INGEST_WEBHOOK_AUTH=json.dumps({bearer: {"token": "tok"}, signed: {"hmac_secret": "sec"}}))
    worker.start()
    auth = {"Authorization": "Bearer tok"}

    # Accepted: a JSON array, a single object, JSON lines with an HMAC signature.
    status, body, _ = post(worker, json.dumps(batch(bearer, 0, 20)).encode(), tenant=bearer, **auth)
    assert (status, body["accepted"]) == (202, 20)
    assert post(worker, json.dumps(batch(bearer, 20, 1)[0]).encode(), tenant=bearer, **auth)[0] == 202
    lines = "\n".join(json.dumps(r) for r in batch(signed, 0, 10)).encode()
    stamp = str(int(time.time()))
    status, body, _ = post(worker, lines, tenant=signed, content_type="application/x-ndjson",
                           X_Signature=sign("sec", stamp, lines), X_Signature_Timestamp=stamp)
    assert (status, body["accepted"]) == (202, 10)

    # Refused, each with its status and a message; none of it reaches Kafka.
    one = json.dumps(batch(bearer, 100, 1)).encode()
    assert post(worker, one, tenant=bearer)[0] == 401
    assert post(worker, one, tenant=bearer, Authorization="Bearer wrong")[0] == 401
    assert post(worker, one, Authorization="Bearer tok")[0] == 401  # no tenant named
    old = str(int(time.time()) - 3600)
    stale = {"X_Signature": sign("sec", old, lines), "X_Signature_Timestamp": old}
    assert post(worker, lines, tenant=signed, **stale)[0] == 403
    other = json.dumps(batch(signed, 100, 1)).encode()
    status, body, _ = post(worker, other, tenant=bearer, **auth)
    assert status == 403 and "another tenant" in body["error"]
    status, body, _ = post(worker, b'{"tenant": ', tenant=bearer, **auth)
    assert status == 400 and "not JSON" in body["error"]
    status, body, _ = post(worker, b"[1, 2]", tenant=bearer, **auth)
    assert status == 400 and "item 0" in body["error"]
    status, body, _ = post(worker, json.dumps(batch(bearer, 200, 200)).encode(), tenant=bearer, **auth)
    assert status == 413 and "20000" in body["error"]

    # Backpressure: drain refuses new input with Retry-After; a disabled source answers 503.
    assert worker.post("/admin/drain", token=ADMIN)[0] == 200
    status, _, headers = post(worker, one, tenant=bearer, **auth)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert worker.post("/admin/resume", token=ADMIN)[0] == 200
    assert worker.post("/admin/sources/webhook/disable", token=ADMIN)[0] == 200
    assert post(worker, one, tenant=bearer, **auth)[0] == 503
    assert worker.post("/admin/sources/webhook/enable", token=ADMIN)[0] == 200

    # What was accepted is in the sinks, once; the worker is alive and reports it.
    expected = {(bearer, f"w{i}"): 1 for i in range(21)} | {(signed, f"w{i}"): 1 for i in range(10)}
    eventually(lambda: assert_equal(_revisions(sinks, [bearer, signed]), expected), timeout_s=90,
               context=worker.log_tail)
    assert len(kafka.read_all(f"{prefix}.source.webhook")) == 31
    adapter = worker.get_json("/health/detailed")["adapters"]["webhook"]
    assert adapter["accepted_records"] == 31 and adapter["last_error"].startswith("503")
    assert worker.metric("ingest_webhook_requests_total", status="202") == 3
    assert worker.metric("ingest_webhook_requests_total", status="401") == 3
    assert worker.metric("ingest_adapter_records_total", source="webhook") == 31
    assert worker.alive


def _revisions(sinks: SinkReader, tenants: list[str]) -> dict[tuple[str, str], int]:
    return {k: v["revision"] for k, v in sinks.postgres(tenants).items()}



S3_KEYS = {"INGEST_S3_ACCESS_KEY_ID": "testing", "INGEST_S3_SECRET_ACCESS_KEY": "testing"}


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def jsonl(tenant: str, prefix: str, count: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({**v2(tenant, f"{prefix}{i}", 1), "source": "s3"}).encode() + b"\n"
                    for i in range(start, start + count))


def lines_by_file(kafka: Kafka, topic: str) -> dict[str, list[int]]:
    """Line numbers sent per file (header ingest.adapter.line), duplicates kept."""
    found: dict[str, list[int]] = {}
    for message in kafka.read_all(topic):
        headers = headers_of(message)
        found.setdefault(headers["ingest.adapter.file"], []).append(int(headers["ingest.adapter.line"]))
    return found


def test_s3_objects_are_fed_resumed_exactly_after_a_kill_and_replaced_objects_read_again(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str, s3_endpoint: str) -> None:
    tenant, other, bucket = f"{prefix}-s3", f"{prefix}-other", f"in-{prefix}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    big = 20_000
    client.put_object(Bucket=bucket, Key="acme/a.jsonl", Body=jsonl(tenant, "a", big))
    client.put_object(Bucket=bucket, Key="acme/b.jsonl.gz", Body=gzip.compress(jsonl(tenant, "b", 500)))
    client.put_object(Bucket=bucket, Key="acme/c.jsonl", Body=jsonl(tenant, "c", 10))
    members = gzip.compress(jsonl(tenant, "d", 3)) + gzip.compress(jsonl(tenant, "d", 4, start=3))
    client.put_object(Bucket=bucket, Key="acme/d.jsonl.gz", Body=members)  # two gzip members
    # In this tenant's prefix: a record of another tenant, and a line over the record limit (1 MiB).
    mixed = jsonl(tenant, "e", 1) + jsonl(other, "e", 1, start=1) + b'"' + b"x" * 1_500_000 + b'"\n'
    client.put_object(Bucket=bucket, Key="acme/e.jsonl", Body=mixed + jsonl(tenant, "e", 1, start=2))
    client.put_object(Bucket=bucket, Key="other/x.jsonl", Body=jsonl(tenant, "x", 5))  # not configured
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(
        **S3_KEYS, INGEST_S3_ENDPOINT_URL=s3_endpoint, INGEST_SOURCE_POLL_INTERVAL_S="0.5",
        INGEST_SOURCE_CHECKPOINT_EVERY="200",
        INGEST_S3_SOURCES=json.dumps([{"tenant": tenant, "bucket": bucket, "prefix": "acme/"}]))
    worker.start()

    # Killed in the middle of the big object, then started again: it resumes from its checkpoint.
    eventually(lambda: _assert_at_least(worker.metric("ingest_adapter_records_total", source="s3"), 1000),
               timeout_s=60, interval_s=0.05, context=worker.log_tail)
    worker.kill()
    topic = f"{prefix}.source.s3"
    sent_before_restart = sum(len(v) for v in lines_by_file(kafka, topic).values())
    assert sent_before_restart < big + 510, "the objects were done before the kill: proves nothing"
    worker.start()
    total = big + 500 + 10 + 7 + 2
    eventually(lambda: assert_equal(len(sinks.postgres([tenant])), total), timeout_s=240, interval_s=2,
               context=worker.log_tail)

    # Every line once at least, none skipped; repeats only from the group in flight at the kill.
    sent = lines_by_file(kafka, topic)
    a, b = sent[f"s3://{bucket}/acme/a.jsonl"], sent[f"s3://{bucket}/acme/b.jsonl.gz"]
    assert set(a) == set(range(1, big + 1)) and set(b) == set(range(1, 501))
    repeats = len(a) - big + len(b) - 500
    assert 0 <= repeats <= 200, repeats
    assert not any("other/" in name for name in sent)
    assert sorted(sent[f"s3://{bucket}/acme/d.jsonl.gz"]) == list(range(1, 8))  # both members
    assert sorted(sent[f"s3://{bucket}/acme/e.jsonl"]) == [1, 2, 3, 4]  # each line, the long one a stand-in
    assert sinks.postgres([other]) == {}  # the other tenant's line is dead-lettered, not written
    letters = {(h["ingest.adapter.line"], h["dlq.reason"])
               for h in map(headers_of, kafka.read_all(f"{prefix}.dlq"))
               if h.get("ingest.adapter.file") == f"s3://{bucket}/acme/e.jsonl"}
    assert letters == {("2", "VALIDATION_FAIL"), ("3", "VALIDATION_FAIL")}
    assert worker.metric("ingest_adapter_errors_total", source="s3", reason="tenant_mismatch") == 1
    assert worker.metric("ingest_adapter_errors_total", source="s3", reason="line_too_large") == 1
    print(f"s3: {big + 500} lines across the kill, {repeats} sent twice (dedupe absorbed them: "
          f"{worker.metric('ingest_duplicates_total', source='s3'):.0f} duplicates counted)")

    # An object replaced by a larger one is read from its first line (an append cannot be told
    # from a rewrite); dedupe drops the records sent before.
    client.put_object(Bucket=bucket, Key="acme/c.jsonl", Body=jsonl(tenant, "c", 15))
    eventually(lambda: assert_equal(len(sinks.postgres([tenant])), total + 5), timeout_s=60,
               context=worker.log_tail)
    assert sorted(lines_by_file(kafka, topic)[f"s3://{bucket}/acme/c.jsonl"]) == sorted(
        [*range(1, 11), *range(1, 16)])
    adapters = worker.get_json("/health/detailed")["adapters"]
    health = adapters["s3-main"]  # the operators' runbook: jq '.adapters["s3-main"]'
    assert (health["kind"], health["location"], health["tenant"]) == ("s3", f"s3://{bucket}/acme/", tenant)
    assert health["last_poll_at"] and health["last_error"] is None and health["last_file_error"] is None
    assert health["backlog_files"] == 0 and "s3" not in adapters  # a configured kind: by its names


def _assert_at_least(value: float, minimum: float) -> None:
    assert value >= minimum


def test_sftp_files_are_taken_when_complete_resumed_after_a_kill_and_moved_when_done(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str, sftp_server: Any) -> None:
    tenant = f"{prefix}-sftp"
    stable, marked = sftp_server.root / prefix / "incoming", sftp_server.root / prefix / "drop"
    stable.mkdir(parents=True)
    marked.mkdir(parents=True)
    big = 10_000
    (stable / "a.jsonl").write_bytes(jsonl(tenant, "a", big).replace(b'"s3"', b'"sftp"'))
    b_lines = jsonl(tenant, "b", 300).replace(b'"s3"', b'"sftp"').splitlines(keepends=True)
    (stable / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(b_lines[:120])) + gzip.compress(
        b"".join(b_lines[120:])))  # two gzip members
    latin1 = os.fsdecode(b"caf\xe9.jsonl")  # a name that is not UTF-8
    (stable / latin1).write_bytes(jsonl(tenant, "e", 5).replace(b'"s3"', b'"sftp"'))
    (marked / "d.jsonl").write_bytes(jsonl(tenant, "d", 7).replace(b'"s3"', b'"sftp"'))  # no marker yet
    common = {"tenant": tenant, "host": "127.0.0.1", "port": sftp_server.port,
              "username": sftp_server.username, "password": sftp_server.password}
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(
        INGEST_SOURCE_POLL_INTERVAL_S="0.5", INGEST_SOURCE_CHECKPOINT_EVERY="200",
        INGEST_SFTP_SOURCES=json.dumps([
            {**common, "path": f"/{prefix}/incoming", "complete": "stable", "done_dir": "processed"},
            {**common, "path": f"/{prefix}/drop", "complete": "marker"}]))
    worker.start()
    eventually(lambda: _assert_at_least(worker.metric("ingest_adapter_records_total", source="sftp"), 1000),
               timeout_s=60, interval_s=0.05, context=worker.log_tail)
    worker.kill()
    before_restart = sum(len(v) for v in lines_by_file(kafka, f"{prefix}.source.sftp").values())
    assert before_restart < big + 300, "the files were done before the kill: proves nothing"
    worker.start()
    total = big + 300 + 5
    eventually(lambda: assert_equal(len(sinks.postgres([tenant])), total), timeout_s=240, interval_s=2,
               context=worker.log_tail)
    sent = lines_by_file(kafka, f"{prefix}.source.sftp")
    label = f"sftp://{sftp_server.username}@127.0.0.1:{sftp_server.port}/{prefix}"
    a, b = sent[f"{label}/incoming/a.jsonl"], sent[f"{label}/incoming/b.jsonl.gz"]
    assert set(a) == set(range(1, big + 1)) and set(b) == set(range(1, 301))
    assert sorted(sent[f"{label}/incoming/caf\\xe9.jsonl"]) == [1, 2, 3, 4, 5]  # any partition order
    repeats = len(a) - big + len(b) - 300
    assert 0 <= repeats <= 200, repeats
    print(f"sftp: {total} lines across the kill, {repeats} sent twice")
    # Done files were moved away; the unmarked file waited, and goes once its marker appears.
    eventually(lambda: assert_equal(sorted(p.name for p in (stable / "processed").iterdir()),
                                     ["a.jsonl", "b.jsonl.gz", latin1]), timeout_s=30)
    assert f"{label}/drop/d.jsonl" not in sent
    (marked / "d.jsonl.done").write_bytes(b"")
    eventually(lambda: assert_equal(len(sinks.postgres([tenant])), total + 7), timeout_s=60,
               context=worker.log_tail)
    adapters = worker.get_json("/health/detailed")["adapters"]
    assert {name: adapters[name]["kind"] for name in adapters if name.startswith("sftp")} == {
        "sftp-main": "sftp", "sftp-2": "sftp"}, adapters  # two locations, named by default
    assert adapters["sftp-main"]["last_error"] is None and adapters["sftp-2"]["last_error"] is None
