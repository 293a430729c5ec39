"""`python -m bench.run [--records N]`: three stages on one embedded broker, one after another —
(a) the raw aiokafka pipeline (bench/raw.py), (b) a bare Faust pass-through (bench/faust_pass.py),
(c) ingest_stream end to end (source topic → validate → dedupe → sink topics → the three sinks
committed) — each on a prefilled topic of the same N synthetic records (~320 bytes, one revision
per entity). Reports records/s, CPU µs/record, peak RSS, and c/a, c/b; writes
bench/results/<timestamp>.json. Timing starts when a stage is consuming (Faust: "Worker ready")
and ends when its consumer group has committed every record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import proc_figures
from ingest_stream.config import Settings
from ingest_stream.ops.devstack import DevStack, free_port
from ingest_stream.ops.produce import produce, synthetic_records

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PARTITIONS = 4


def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names]).values():
        future.result(30)


def records(count: int) -> list[bytes]:
    return [orjson.dumps(r) for r in synthetic_records(count, entities=count, tenants=3)]


async def committed(bootstrap: str, group: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    finally:
        await admin.close()
    totals = dict.fromkeys(topics, 0)
    for tp, meta in offsets.items():
        totals[tp.topic] += max(meta.offset, 0)
    return totals


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode}); log: {log}")
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not seen in {log} after {timeout_s}s")


def run_process_stage(argv: list[str], env: dict[str, str], log: Path, bootstrap: str, group: str,
                      expected: dict[str, int]) -> dict[str, Any]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=ROOT)
    try:
        wait_for_line(log, "Worker ready", process)
        started, start_figures = time.monotonic(), proc_figures(process.pid)
        deadline = started + 1800
        while time.monotonic() < deadline:
            done = asyncio.run(committed(bootstrap, group, list(expected)))
            if all(done[t] >= n for t, n in expected.items()):
                break
            if process.poll() is not None:
                raise RuntimeError(f"stage exited ({process.returncode}); log: {log}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"stage did not finish in time; log: {log}")
        elapsed = time.monotonic() - started
        end_figures = proc_figures(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return {"seconds": elapsed, "cpu_seconds": end_figures["cpu_seconds"] - start_figures["cpu_seconds"],
            "peak_rss_mib": end_figures["peak_rss_mib"]}


def summarize(name: str, count: int, figures: dict[str, Any]) -> dict[str, Any]:
    return {"stage": name, "records": count, "records_per_s": round(count / figures["seconds"], 1),
            "cpu_us_per_record": round(figures["cpu_seconds"] / count * 1e6, 1),
            "seconds": round(figures["seconds"], 2), "peak_rss_mib": round(figures["peak_rss_mib"], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--sinks", default="postgres,neo4j,typesense",
                        help="sinks stage (c) writes to (INGEST_SINKS)")
    args = parser.parse_args()
    n = args.records
    values = records(n)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    with DevStack(work / "stack") as stack:
        bootstrap = stack.kafka_bootstrap
        settings = Settings.from_env({**stack.settings_env(), "INGEST_SINKS": args.sinks})
        stages: dict[str, dict[str, Any]] = {}

        create_topics(bootstrap, ["bench.raw.in", "bench.raw.out"])
        asyncio.run(produce(settings, values, topic="bench.raw.in", progress_every=10**9))
        raw = subprocess.run([sys.executable, "-m", "bench.raw", "--bootstrap", bootstrap, "--source",
                              "bench.raw.in", "--target", "bench.raw.out", "--records", str(n)],
                             capture_output=True, text=True, cwd=ROOT, check=True, timeout=1800)
        stages["a_raw"] = summarize("raw aiokafka pipeline", n, json.loads(raw.stdout.splitlines()[-1]))
        print(stages["a_raw"], file=sys.stderr)

        create_topics(bootstrap, ["bench.faust.in", "bench.faust.out"])
        asyncio.run(produce(settings, values, topic="bench.faust.in", progress_every=10**9))
        faust_env = {"BENCH_BOOTSTRAP": bootstrap, "BENCH_SOURCE": "bench.faust.in",
                     "BENCH_TARGET": "bench.faust.out", "BENCH_WEB_PORT": str(free_port()),
                     "BENCH_DATA_DIR": str(work / "faust-data")}
        stages["b_faust"] = summarize("bare Faust pass-through", n, run_process_stage(
            [sys.executable, "-m", "bench.faust_pass", "worker", "-l", "info"], faust_env, work / "faust.log",
            bootstrap, "bench-faust-pass", {"bench.faust.in": n}))
        print(stages["b_faust"], file=sys.stderr)

        prefix = "bench"
        create_topics(bootstrap, [f"{prefix}.source.{s}" for s in ("kafka", "webhook", "s3", "sftp")])
        asyncio.run(produce(settings, values, topic=f"{prefix}.source.kafka", progress_every=10**9))
        ingest_env = {**stack.settings_env(), "INGEST_APP_ID": "bench-ingest", "INGEST_TOPIC_PREFIX": prefix,
                      "INGEST_DATA_DIR": str(work / "ingest-data"), "INGEST_WEB_PORT": str(free_port()),
                      "INGEST_WEB_HOST": "127.0.0.1", "INGEST_LOG_LEVEL": "info", "INGEST_SINKS": args.sinks}
        expected = {f"{prefix}.source.kafka": n} | {f"{prefix}.sink.{s}": n for s in settings.sinks}
        stages["c_ingest_stream"] = summarize("ingest_stream end to end", n, run_process_stage(
            [sys.executable, "-m", "ingest_stream.cli", "worker"], ingest_env, work / "ingest.log",
            bootstrap, "bench-ingest", expected))
        print(stages["c_ingest_stream"], file=sys.stderr)

    a, b, c = (stages[k]["records_per_s"] for k in ("a_raw", "b_faust", "c_ingest_stream"))
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"), "records": n,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "sinks": args.sinks, "stages": stages,
        "ratio_vs_raw": round(c / a, 3), "ratio_vs_faust": round(c / b, 3),
        "latency": "not measured yet (needs a paced run; see issue 8)",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"{'stage':<28} {'records/s':>10} {'cpu µs/rec':>11} {'peak RSS MiB':>13}")
    for stage in stages.values():
        print(f"{stage['stage']:<28} {stage['records_per_s']:>10} {stage['cpu_us_per_record']:>11} "
              f"{stage['peak_rss_mib']:>13}")
    print(f"c/a = {result['ratio_vs_raw']}, c/b = {result['ratio_vs_faust']}  ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
