"""Issue 5: `replayctl` — a tenant's time range re-applied exactly, throttled, behind approval and
legal holds, and finished after the process running it is SIGKILLed midway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from ingest_stream.core.timefmt import format_rfc3339
from tests.dataset import v2
from tests.integration.harness import (
    PROJECT_ROOT,
    Kafka,
    SinkReader,
    WorkerProcess,
    eventually,
    headers_of,
    run_tool,
)
from tests.integration.pipeline_helpers import source_topics

THROTTLE = 5  # records per second: the 60 records take 12 s, and the kill must land midway


def replayctl(worker: WorkerProcess, *args: str, expect_exit: int = 0, json_output: bool = True) -> Any:
    return run_tool(worker, "ingest_stream.ops.replayctl", *args, json_output=json_output,
                    expect_exit=expect_exit)


def produce_around_a_range(kafka: Kafka, prefix: str, target: str, other: str) -> tuple[str, ...]:
    """Records of two tenants before, in and after a range (an hour, ending an hour ago) in the Kafka
    source, 130 in all; in the range 60 of `target`'s (in0…in59) and 30 of `other`'s. Returns the
    `replayctl plan` options for `target` in that range."""
    now_ms = int(time.time() * 1000)
    start_ms, stop_ms = now_ms - 2 * 3600_000, now_ms - 3600_000
    batches = [  # (tenant, ids, first timestamp): before the range, in it, after it
        (target, [f"old{i}" for i in range(20)], start_ms - 600_000),
        (other, [f"x{i}" for i in range(10)], start_ms - 600_000),
        (target, [f"in{i}" for i in range(60)], start_ms + 1000),
        (other, [f"y{i}" for i in range(30)], start_ms + 2000),
        (target, [f"new{i}" for i in range(10)], stop_ms + 1000),
    ]
    for tenant, ids, first_ms in batches:
        kafka.produce(f"{prefix}.source.kafka",
                      [(f"{tenant}:{i}".encode(), json.dumps(v2(tenant, i, 1)).encode()) for i in ids],
                      timestamps_ms=[first_ms + n for n in range(len(ids))])
    return ("--tenant", target, "--from", _rfc3339(start_ms), "--to", _rfc3339(stop_ms),
            "--sources", "kafka", "--throttle", str(THROTTLE))


def test_a_replay_is_refused_under_legal_hold_and_runs_only_approved_with_a_well_formed_rfa(
        kafka: Kafka, make_worker, prefix: str) -> None:
    target, other = f"{prefix}-acme", f"{prefix}-other"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_REPLAY_APPROVAL_THRESHOLD="50")  # not started: broker only
    window = produce_around_a_range(kafka, prefix, target, other)

    # A legal hold refuses the plan; cleared, the plan counts exactly the tenant's records in range.
    replayctl(worker, "hold", "set", "--tenant", target, "--reason", "litigation", "--json")
    assert target in replayctl(worker, "hold", "list", "--json")
    assert "legal hold" in replayctl(worker, "plan", *window, expect_exit=1, json_output=False)
    replayctl(worker, "hold", "clear", "--tenant", target, "--json")
    plan = replayctl(worker, "plan", *window, "--json")
    assert plan["estimate"] == {"kafka": 60}
    assert (plan["status"], plan["needs_approval"]) == ("pending", True)  # 60 > the threshold of 50
    plan_id = plan["id"]

    # Not without approval; not with a malformed RFA; not while held.
    assert "approval" in replayctl(worker, "run", "--plan", plan_id, expect_exit=1, json_output=False)
    assert "RFA" in replayctl(worker, "approve", plan_id, "--rfa", "1234", expect_exit=1, json_output=False)
    replayctl(worker, "hold", "set", "--tenant", target, "--reason", "case 7", "--json")
    assert "legal hold" in replayctl(worker, "approve", plan_id, "--rfa", "RFA-1234", expect_exit=1,
                                     json_output=False)
    replayctl(worker, "hold", "clear", "--tenant", target, "--json")
    assert replayctl(worker, "approve", plan_id, "--rfa", "RFA-1234", "--json")["status"] == "approved"


def test_replay_reapplies_exactly_the_tenants_range_throttled_approved_and_resumable(
        kafka: Kafka, sinks: SinkReader, make_worker, prefix: str) -> None:
    target, other = f"{prefix}-acme", f"{prefix}-other"
    source = f"{prefix}.source.kafka"
    kafka.create_topics(source_topics(prefix))
    worker: WorkerProcess = make_worker(INGEST_REPLAY_APPROVAL_THRESHOLD="50")
    worker.start()
    window = produce_around_a_range(kafka, prefix, target, other)
    eventually(lambda: _assert_count(sinks, [target, other], 130), timeout_s=90, context=worker.log_tail)
    writes_before = {t: len(sinks.audit([t])) for t in (target, other)}

    # The plan counts exactly the tenant's records in range; above the threshold, it is approved
    # (what a legal hold and a missing or malformed approval do: the test above).
    plan = replayctl(worker, "plan", *window, "--json")
    assert plan["estimate"] == {"kafka": 60}
    assert (plan["status"], plan["needs_approval"]) == ("pending", True)  # 60 > the threshold of 50
    plan_id = plan["id"]
    assert replayctl(worker, "approve", plan_id, "--rfa", "RFA-1234", "--json")["status"] == "approved"

    # Run it, SIGKILL the runner midway, run it again: it resumes and completes.
    runner = subprocess.Popen([sys.executable, "-m", "ingest_stream.ops.replayctl", "run", "--plan", plan_id],
                              env={**os.environ, **worker.env}, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    eventually(lambda: _assert_progress(worker, plan_id, 5), timeout_s=60, interval_s=0.2)
    runner.send_signal(signal.SIGKILL)
    runner.wait(10)
    midway = replayctl(worker, "status", plan_id, "--json")
    assert midway["status"] == "running" and 5 <= midway["replayed"] < 60
    done = replayctl(worker, "run", "--plan", plan_id, "--json")
    assert (done["status"], done["phase"], done["replayed"]) == ("completed", "done", 60)
    assert [p["id"] for p in replayctl(worker, "list", "--tenant", target, "--json")] == [plan_id]
    assert "already completed" in replayctl(worker, "cancel", plan_id, expect_exit=1, json_output=False)

    # Exactly the tenant's records in range were re-applied (equal revisions rewritten), no other.
    expected = {(target, f"in{i}") for i in range(60)}
    eventually(lambda: _assert_rewritten(sinks, target, writes_before[target], expected), timeout_s=60,
               context=worker.log_tail)
    assert len(sinks.audit([other])) == writes_before[other]
    assert worker.metric("ingest_dlq_total") == 0

    # The throttle held: replayed records reached the topic no faster than the plan's rate.
    replayed = [m for m in kafka.read_all(source) if headers_of(m).get("ingest.replay") == plan_id]
    assert {json.loads(m.value())["id"] for m in replayed} == {i for _, i in expected}
    stamps = sorted(m.timestamp()[1] for m in replayed)
    rate = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    assert rate <= THROTTLE * 1.25, f"observed {rate:.1f}/s against a throttle of {THROTTLE}/s"
    print(f"replay: {len(replayed)} records sent, observed {rate:.1f}/s (throttle {THROTTLE}/s)")


def _rfc3339(epoch_ms: int) -> str:
    return format_rfc3339(datetime.fromtimestamp(epoch_ms / 1000, UTC))


def _assert_count(sinks: SinkReader, tenants: list[str], count: int) -> None:
    assert len(sinks.postgres(tenants)) == count


def _assert_progress(worker: WorkerProcess, plan_id: str, at_least: int) -> None:
    assert replayctl(worker, "status", plan_id, "--json")["replayed"] >= at_least


def _assert_rewritten(sinks: SinkReader, tenant: str, before: int, expected: set[tuple[str, str]]) -> None:
    new_writes = sinks.audit([tenant])[before:]
    assert {(w["tenant"], w["id"]) for w in new_writes} == expected
    assert all(w["old_revision"] == w["new_revision"] for w in new_writes)
