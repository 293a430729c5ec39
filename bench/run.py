"""`python -m bench.run [--records N] [--sinks ...] [--two-workers] [--latency-seconds S] [--soak-seconds S
[--soak-rate R]] [--outage SINK:SECONDS [--outage-rate R] [--outage-window S]] [--only outage]`.

Stages on one embedded broker, one after another, each on a prefilled topic of N synthetic records
(~320 bytes, one revision per entity): (a) the raw aiokafka pipeline (bench/raw.py), (a') the same
raw code in the contract's shape (fanned out to one sink topic per sink and a dedupe log, the sink
topics read back and validated; no sink written), (a'') the same job as (c) hand-written
(bench/raw_job.py: aiokafka, SHA-256 dedupe in rocksdict, revision-guarded writes to Postgres and
Typesense, offsets committed after both; its own tenants, checked in both sinks after it), (b) a bare
Faust pass-through (bench/faust_pass.py), (c) ingest_stream end to end (source topic → validate →
dedupe → each sink's lane, in process or spilled to its sink topic → sinks committed), optionally
(c2) the same with two worker processes.
Each stage that writes the sinks starts on emptied sinks (the Postgres table truncated, the Typesense
collections made again, the graph's records deleted): Typesense's cost per document grows with its
collection, and a stage must not pay for the ones before it.
Timing starts when a stage is consuming (Faust: "Worker ready") and ends when its consumer group
has committed every record. Then a paced run at 80 % of (c)'s rate measures source-to-sink latency,
and optionally a soak at `--soak-rate` (default 50 % of (c)'s rate) samples the worker's memory.
Writes bench/results/<timestamp>.json.

`--outage SINK:SECONDS` adds stage (o), last: one worker on its own prefix and tenants (`benchout-*`),
records stamped and paced at `--outage-rate` (default 50 % of (c)'s rate) for 10 s of warm-up, a
window (`--outage-window`, default SECONDS but at least 60 s), SECONDS, and the window again. After
the warm-up and the first window SINK's server (DevStack's: Postgres, the graph server for neo4j,
Typesense) is stopped with its own stop signal and started again SECONDS later on the same port and
data. The worker's /metrics is sampled every second (bench/outage.py): each sink's applied records
per second before, during and after the outage, the other sinks' rate during it as a share of
before (the bar: at least 80 %), how long after the restart the down sink caught up, the lane
state (`ingest_sink_lane_state`) as a timeline and `ingest_sink_spilled_records_total` where the
worker exports them (null where not), and the OLDER_REVISION dead letters; after the records are
in, every sink is read back (bench/raw_job.py's `read_back`): each entity at its newest revision,
none lost. In the result under "outage" (its samples under "outage_samples"). `--only outage` runs
stage (o) alone (with `--outage-rate`: no (c) to take a rate from).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bench import outage, raw_job
from bench.common import machine_busy_seconds, proc_figures
from bench.paced import produce_paced
from ingest_stream.config import SOURCES, Settings
from ingest_stream.ops.devstack import DevStack, ServerProcess, free_port
from ingest_stream.ops.produce import produce, synthetic_records
from ingest_stream.sinks import typesense
from ingest_stream.sinks.registry import build_sink

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PARTITIONS = 4
OUTAGE_WARMUP_S = 10.0  # of stage (o), before its `before` window: the worker's first batches
OUTAGE_STALL_S = 60.0  # after production, no sink handling a record for this long: stop waiting
OUTAGE_DRAIN_TIMEOUT_S = 900.0
# The soak's producer batches up to this long per partition (the other paced stages: 5 ms, as they
# measure latency). The embedded broker (Tansu 0.6.0, memory engine) lists every batch of a partition
# on each fetch: with 5 ms batches at 1,500 records/s, a consumer that keeps up cost it a core, and
# ten minutes in it fell behind (docs/benchmark.md). The soak measures the worker's memory.
SOAK_LINGER_MS = 100.0


def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names]).values():
        future.result(30)


def records(count: int, tenant_prefix: str = "tenant") -> list[bytes]:
    """`count` records, one revision per entity; a stage writing to the sinks uses its own tenants
    (rewriting another stage's revisions would be cheaper: skipped as equal)."""
    return [orjson.dumps(r) for r in synthetic_records(count, entities=count, tenants=3,
                                                       tenant_prefix=tenant_prefix)]


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


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(t, p) for t in topics for p in range(PARTITIONS)])
    finally:
        await consumer.stop()
    totals = dict.fromkeys(topics, 0)
    for tp, end in ends.items():
        totals[tp.topic] += end
    return totals


async def prepare_sinks(settings: Settings, names: list[str]) -> None:
    """Open and close ingest_stream's sinks: their migrations make the table and collections."""
    for name in names:
        sink = build_sink(name, settings)
        try:
            await sink.open()
        finally:
            await sink.close()


async def empty_sinks(settings: Settings, names: list[str]) -> None:
    """Remove what earlier stages wrote, then make the sinks' table and collections again: every
    stage writes to sinks that start empty. Typesense's server CPU per document grows with its
    collection (an import took 29 µs per document at 0 and 55 at 280,000 documents): on these two
    cores a stage run after others paid for their documents (the latency run after (a'') to (c2):
    p95 1.5 s at 6,400 records/s, against 0.55–0.71 s on an empty stack)."""
    if "postgres" in names:
        conn = await asyncpg.connect(settings.postgres.dsn)
        try:
            with contextlib.suppress(asyncpg.UndefinedTableError):  # a new stack: nothing to empty
                await conn.execute(f"TRUNCATE {raw_job.TABLE}")
        finally:
            await conn.close()
    if "typesense" in names:
        async with httpx.AsyncClient(base_url=settings.typesense.url, timeout=120,
                                     headers={"X-TYPESENSE-API-KEY": settings.typesense.api_key}) as http:
            for collection in (typesense.COLLECTION, typesense.TOMBSTONES):
                response = await http.delete(f"/collections/{collection}")
                if response.status_code != 404:
                    response.raise_for_status()
    if "neo4j" in names:
        from ingest_stream.sinks import neo4j  # its driver only where the graph is used

        graph = neo4j.from_settings(settings)  # not closed: see raw_job.read_back
        await graph.open()
        await graph.driver.execute_query("MATCH (n:Record) DETACH DELETE n")
    await prepare_sinks(settings, names)


@contextlib.contextmanager
def fresh_stack(prefix: str, sinks: str) -> Iterator[tuple[DevStack, Settings, Path]]:
    """A fresh embedded stack in a new temporary folder, the settings of a worker writing `sinks`
    there, their tables and collections made; yields the stack, the settings and the folder."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    with DevStack(work / "stack") as stack:
        settings = Settings.from_env({**stack.settings_env(), "INGEST_SINKS": sinks})
        asyncio.run(prepare_sinks(settings, list(settings.sinks)))
        yield stack, settings, work


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode}); log: {log}")
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not seen in {log} after {timeout_s}s")


@contextlib.contextmanager
def worker_processes(argv: list[str], envs: list[dict[str, str]], logs: list[Path]
                     ) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start one process per env, wait until each says "Worker ready", stop them all on exit."""
    processes = []
    try:
        for env, log in zip(envs, logs, strict=True):
            with log.open("wb") as out:
                processes.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=out,
                                                  stderr=subprocess.STDOUT, cwd=ROOT))
        for process, log in zip(processes, logs, strict=True):
            wait_for_line(log, "Worker ready", process)
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_committed(processes: list[subprocess.Popen[bytes]], bootstrap: str, group: str,
                   expected: dict[str, int | None], timeout_s: float = 1800,
                   metrics_urls: list[str] | None = None) -> None:
    """Until the group committed `expected` (None: the topic's end, what was spilled to a sink
    topic; checked once the counted topics are done). With the workers' `metrics_urls`, fails fast
    once backpressure has dropped records: the source topic would never reach the count."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while time.monotonic() < deadline:
        done = asyncio.run(committed(bootstrap, group, list(expected)))
        if all(n is None or done[t] >= n for t, n in expected.items()):
            drained = [t for t, n in expected.items() if n is None]
            ends = asyncio.run(end_offsets(bootstrap, drained)) if drained else {}
            if all(done[t] >= ends[t] for t in drained):
                return
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a stage process exited ({process.returncode})")
        polls += 1
        if metrics_urls and polls % 25 == 0:
            dropped = sum(brownout_dropped(url) for url in metrics_urls)
            if dropped:
                raise RuntimeError(
                    f"the workers fell behind this rate: backpressure reached brownout and dropped "
                    f"{dropped:.0f} low-priority records (ingest_brownout_dropped_total), so the sink "
                    f"topics will never hold {expected}. Measure at a lower rate.")
        time.sleep(0.2)
    raise RuntimeError(f"group {group} did not commit {expected} in {timeout_s}s")


def run_process_stage(argv: list[str], envs: list[dict[str, str]], logs: list[Path], bootstrap: str,
                      group: str, expected: dict[str, int | None]) -> dict[str, Any]:
    """Time the processes (already holding a prefilled topic) until the group committed `expected`."""
    with worker_processes(argv, envs, logs) as processes:
        started, machine_started = time.monotonic(), machine_busy_seconds()
        before = [proc_figures(p.pid) for p in processes]
        wait_committed(processes, bootstrap, group, expected)
        elapsed = time.monotonic() - started
        machine = machine_busy_seconds() - machine_started
        after = [proc_figures(p.pid) for p in processes]
    cpu = sum(a["cpu_seconds"] - b["cpu_seconds"] for a, b in zip(after, before, strict=True))
    return {"seconds": elapsed, "cpu_seconds": cpu, "machine_busy_seconds": machine,
            "peak_rss_mib": max(a["peak_rss_mib"] for a in after)}


class IngestStages:
    """Stage (c): ingest_stream workers on their own topic prefix, tenants and state."""

    def __init__(self, stack: DevStack, settings: Settings, work: Path, sinks: str) -> None:
        self.stack, self.settings, self.work, self.sinks = stack, settings, work, sinks

    def _envs(self, prefix: str, workers: int, *, backlog: bool = False) -> list[dict[str, str]]:
        """Each worker's settings. A `backlog` stage starts on a prefilled topic: lag from its first
        second, so automatic backpressure would throttle the source to INGEST_THROTTLE_RATE after
        30 s (it did, in every earlier run) and the stage would time the throttle, not the pipeline.
        There the thresholds are put out of reach; paced stages keep the defaults."""
        unthrottled = {"INGEST_THROTTLE_LAG_S": "86400", "INGEST_BROWNOUT_LAG_S": "86400",
                       "INGEST_THROTTLE_LAG_RECORDS": str(10**12),
                       "INGEST_BROWNOUT_LAG_RECORDS": str(10**12)} if backlog else {}
        return [{**self.stack.settings_env(), "INGEST_APP_ID": f"{prefix}-ingest",
                 "INGEST_TOPIC_PREFIX": prefix, "INGEST_DATA_DIR": str(self.work / f"{prefix}-data-{i}"),
                 "INGEST_WEB_PORT": str(free_port()), "INGEST_WEB_HOST": "127.0.0.1",
                 "INGEST_LOG_LEVEL": "info", "INGEST_SINKS": self.sinks, **unthrottled}
                for i in range(workers)]

    def _expected(self, prefix: str, n: int) -> dict[str, int | None]:
        """Every source record acked (written to every sink in process, or spilled), and whatever
        was spilled to a sink topic written too."""
        return {f"{prefix}.source.kafka": n} | {f"{prefix}.sink.{s}": None for s in self.settings.sinks}

    def _prepare(self, prefix: str) -> None:
        """The stage's source topics, and its sinks emptied (`empty_sinks`)."""
        create_topics(self.stack.kafka_bootstrap, [f"{prefix}.source.{s}" for s in SOURCES])
        asyncio.run(empty_sinks(self.settings, list(self.settings.sinks)))

    def throughput(self, prefix: str, n: int, workers: int) -> dict[str, Any]:
        self._prepare(prefix)
        asyncio.run(produce(self.settings, records(n, tenant_prefix=prefix), topic=f"{prefix}.source.kafka",
                            progress_every=10**9))
        return run_process_stage(WORKER_ARGV, self._envs(prefix, workers, backlog=True),
                                 [self.work / f"{prefix}-{i}.log" for i in range(workers)],
                                 self.stack.kafka_bootstrap, f"{prefix}-ingest", self._expected(prefix, n))

    def _paced(self, processes: list[subprocess.Popen[bytes]], envs: list[dict[str, str]], prefix: str,
               rate: float, n: int, linger_ms: float = 5.0) -> None:
        """Produce `n` records stamped with the moment they are sent, at `rate` (batched over up to
        `linger_ms` per partition); wait until done."""
        values = (orjson.dumps(r) for r in synthetic_records(
            n, entities=n, tenants=3, tenant_prefix=prefix, stamp_now=True))
        produce_paced(self.stack.kafka_bootstrap, values, topic=f"{prefix}.source.kafka", rate=rate,
                      linger_ms=linger_ms)
        wait_committed(processes, self.stack.kafka_bootstrap, f"{prefix}-ingest", self._expected(prefix, n),
                       metrics_urls=[metrics_url(env) for env in envs])

    def latency(self, prefix: str, rate: float, seconds: float) -> dict[str, Any]:
        """Records stamped with the moment they are produced, at `rate`: Postgres's own clock
        (`updated_at`, the writing transaction's start) minus the event time, per record; and each
        sink's share within 1 s from the worker's `ingest_lag_seconds` histogram."""
        self._prepare(prefix)
        n = int(rate * seconds)
        envs = self._envs(prefix, 1)
        with worker_processes(WORKER_ARGV, envs, [self.work / f"{prefix}.log"]) as processes:
            started, before = time.monotonic(), proc_figures(processes[0].pid)
            machine_started = machine_busy_seconds()
            self._paced(processes, envs, prefix, rate, n)
            elapsed = time.monotonic() - started
            busy = (proc_figures(processes[0].pid)["cpu_seconds"] - before["cpu_seconds"]) / elapsed
            machine = (machine_busy_seconds() - machine_started) / elapsed
            within = within_1s(metrics_url(envs[0]))
        p50, p95, p99 = asyncio.run(postgres_latency(self.stack.postgres_dsn, f"{prefix}-%"))
        return {"rate": round(rate, 1), "records": n, "postgres_p50_s": p50, "postgres_p95_s": p95,
                "postgres_p99_s": p99, "within_1s_by_sink": within, "worker_cpu_share": round(busy, 2),
                # here the producer runs too (this harness), beside the worker and the servers
                "machine_busy_cores": round(machine, 2)}

    def soak(self, prefix: str, rate: float, seconds: float) -> dict[str, Any]:
        """A paced run of `seconds`, sampling the worker's resident memory every 10 s, and the part
        of it that is RocksDB's (block cache and memtables, from the worker's /metrics): the rest
        must stay flat (dedupe keys live in RocksDB, not in Python)."""
        self._prepare(prefix)
        n = int(rate * seconds)
        envs = self._envs(prefix, 1)
        url = metrics_url(envs[0])
        rss: list[float] = []
        rocksdb: list[float] = []
        lag: list[float] = []  # records the group has not committed: a worker behind holds more
        with worker_processes(WORKER_ARGV, envs, [self.work / f"{prefix}.log"]) as processes:
            pid = processes[0].pid
            done = threading.Event()

            def sample() -> None:
                rss.append(rss_mib(pid))
                text = scrape(url)
                rocksdb.append(rocksdb_mib(text))
                lag.append(summed(text, "ingest_consumer_lag_records{"))

            def sample_every_10s() -> None:
                while not done.wait(10):
                    sample()

            sampler = threading.Thread(target=sample_every_10s, daemon=True)
            sample()
            sampler.start()
            try:
                self._paced(processes, envs, prefix, rate, n, linger_ms=SOAK_LINGER_MS)
            except RuntimeError as exc:  # fell behind: what was sampled until then says how
                done.set()
                sampler.join()
                return {"rate": round(rate, 1), "error": str(exc), "rss_samples_mib": rss,
                        "rocksdb_samples_mib": rocksdb, "lag_samples_records": lag}
            done.set()
            sampler.join()
            sample()
        # RocksDB's memtables and block cache fill up to the worker's budget first; growth that goes
        # on in the second half (caches warm) is what a leak would look like.
        middle = len(rss) // 2
        return {"rate": round(rate, 1), "seconds": seconds, "records": n, "rss_start_mib": rss[0],
                "rss_middle_mib": rss[middle], "rss_end_mib": rss[-1], "rss_max_mib": max(rss),
                "rss_second_half_growth_mib": round(rss[-1] - rss[middle], 1),
                "rocksdb_start_mib": rocksdb[0], "rocksdb_middle_mib": rocksdb[middle],
                "rocksdb_end_mib": rocksdb[-1],
                "rss_less_rocksdb_second_half_growth_mib": round(
                    (rss[-1] - rocksdb[-1]) - (rss[middle] - rocksdb[middle]), 1),
                "lag_records_max_first_half": max(lag[:middle + 1]),
                "lag_records_max_second_half": max(lag[middle:]),
                "rss_samples_mib": rss, "rocksdb_samples_mib": rocksdb, "lag_samples_records": lag}

    def outage(self, prefix: str, sink: str, seconds: float, rate: float, window_s: float,
               warmup_s: float = OUTAGE_WARMUP_S) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(o): records paced at `rate` for warm-up + `window_s` + `seconds` + `window_s` through one
        worker; after the warm-up and one window, `sink`'s server is stopped (its own stop signal,
        as DevStack stops it) and started again `seconds` later, same port and data. The worker's
        /metrics is sampled every second (bench/outage.py summarises); after the records are in,
        every sink is read back. Returns the report and the per-second samples."""
        self._prepare(prefix)
        n = int(rate * (warmup_s + 2 * window_s + seconds))
        envs = self._envs(prefix, 1)
        url = metrics_url(envs[0])
        sinks = list(self.settings.sinks)
        server = self.stack.servers[outage.SERVER_OF_SINK[sink]]
        sent: list[bytes] = []

        def values() -> Iterator[bytes]:
            for record in synthetic_records(n, entities=n, tenants=3, tenant_prefix=prefix, stamp_now=True):
                value = orjson.dumps(record)
                sent.append(value)
                yield value

        samples: list[outage.Sample] = []
        done = threading.Event()

        def sample_every_second() -> None:
            while True:
                at = time.monotonic()
                produced = len(sent)
                with contextlib.suppress(OSError):  # a busy worker's late answer: one sample fewer
                    samples.append(outage.sample_of(scrape(url), at, produced, sinks))
                if done.wait(max(0.0, at + 1 - time.monotonic())):
                    return

        failure: list[BaseException] = []

        def send() -> None:
            try:
                produce_paced(self.stack.kafka_bootstrap, values(), topic=f"{prefix}.source.kafka",
                              rate=rate)
            except BaseException as exc:  # re-raised by the stage
                failure.append(exc)

        with worker_processes(WORKER_ARGV, envs, [self.work / f"{prefix}.log"]) as processes:
            worker = processes[0]
            sampler = threading.Thread(target=sample_every_second, daemon=True)
            producer = threading.Thread(target=send, daemon=True)
            cpu_before, started = proc_figures(worker.pid)["cpu_seconds"], time.monotonic()
            sampler.start()
            producer.start()
            try:
                try:
                    sleep_until(started + warmup_s + window_s, worker)
                    stopped = time.monotonic()
                    server.stop()
                    stop_took = time.monotonic() - stopped
                    print(f"(o) {server.name} stopped ({stop_took:.1f} s) for {seconds:g} s", file=sys.stderr)
                    sleep_until(stopped + seconds, worker)
                finally:
                    restarted, produced_at_restart = time.monotonic(), len(sent)
                    restart(server)
                ready = time.monotonic()
                print(f"(o) {server.name} back after {ready - restarted:.1f} s", file=sys.stderr)
                producer.join()
                if failure:
                    raise RuntimeError(f"the producer failed: {failure[0]!r}")
                production_ended = time.monotonic()
                wait_handled(samples, sinks, n, worker)
                drained = time.monotonic()
                expected = raw_job.newest_revisions(sent)
                completeness = asyncio.run(read_back_until_complete(self.settings, sinks, expected))
                time.sleep(1.5)  # one more sample: the counters after the read-back
                cpu = proc_figures(worker.pid)["cpu_seconds"] - cpu_before
            finally:
                done.set()
                sampler.join()
        report = outage.summarize(samples, sink=sink, sinks=sinks, seconds=seconds, stopped=stopped,
                                  restarted=restarted, ready=ready, produced_at_restart=produced_at_restart,
                                  production_ended=production_ended, window_s=window_s)
        lost = sum(c["missing"] + c["stale"] for c in completeness.values())
        report = {
            **report, "server": server.name, "rate": round(rate, 1), "records": n, "window_s": window_s,
            "warmup_s": warmup_s, "stop_took_s": round(stop_took, 1),
            "restart_took_s": round(ready - restarted, 1),
            "drained_s": round(drained - production_ended, 1),
            "all_handled": bool(samples) and all(samples[-1].handled[s] >= n for s in sinks),
            "completeness": completeness, "lost": lost,
            "worker_cpu_share": round(cpu / (drained - started), 2)}
        report["checks"] = outage.checks(report)
        return report, [sample_json(x, stopped) for x in samples]


def sleep_until(deadline: float, worker: subprocess.Popen[bytes]) -> None:
    """Sleep until the monotonic `deadline`, failing as soon as the worker exits."""
    while (left := deadline - time.monotonic()) > 0:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode})")
        time.sleep(min(left, 0.2))


def restart(server: ServerProcess) -> None:
    """Start a stopped DevStack server again (same argv: same port and data directory). Typesense
    loads and indexes every document it holds before it answers healthy; after the soak that is
    over a million (it took longer than DevStack's 30 s in the 20:34 run, which then killed it at
    each try), so it gets RESTART_TIMEOUT_S. The time counts in the down sink's catch-up."""
    server.start(timeout_s=RESTART_TIMEOUT_S)


def wait_handled(samples: list[outage.Sample], sinks: list[str], n: int,
                 worker: subprocess.Popen[bytes]) -> None:
    """Until the newest sample shows every sink handled `n` records (any decision), or no sink
    handled one for OUTAGE_STALL_S (records dropped or lost never arrive), or the timeout."""
    deadline = time.monotonic() + OUTAGE_DRAIN_TIMEOUT_S
    last, moved = None, time.monotonic()
    while time.monotonic() < deadline:
        latest = samples[-1] if samples else None
        if latest and all(latest.handled[s] >= n for s in sinks):
            return
        handled = tuple(latest.handled.values()) if latest else None
        if handled != last:
            last, moved = handled, time.monotonic()
        elif time.monotonic() - moved > OUTAGE_STALL_S:
            return
        sleep_until(time.monotonic() + 1, worker)


async def read_back_until_complete(settings: Settings, sinks: list[str],
                                   expected: dict[tuple[str, str], int], timeout_s: float = 60
                                   ) -> dict[str, dict[str, int]]:
    """Each sink read back (bench/raw_job.py) against `expected` until none has a discrepancy or
    `timeout_s` passed (the last batches may still be in flight): per sink, the counts."""
    tenants = sorted({tenant for tenant, _ in expected})
    deadline = time.monotonic() + timeout_s
    while True:
        held = await raw_job.read_back(settings, sinks, tenants)
        found = {s: raw_job.discrepancies(expected, held[s]) for s in sinks}
        if all(not (f["missing"] or f["stale"] or f["extra"]) for f in found.values()) \
                or time.monotonic() > deadline:
            return found
        await asyncio.sleep(2)


def sample_json(sample: outage.Sample, stopped: float) -> dict[str, Any]:
    """One per-second sample of stage (o) for the result file, its time counted from the stop."""
    return {"t": round(sample.t - stopped, 1), "produced": sample.produced, "applied": sample.applied,
            "handled": sample.handled, "lane_state": sample.lane_state, "spilled": sample.spilled,
            "backpressure": sample.backpressure, "dlq_older_revision": sample.older_letters}


def metrics_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['INGEST_WEB_PORT']}/metrics"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def summed(text: str, *series: str) -> float:
    """The sum of the samples whose line starts with one of `series` (a name and `{` or ` `)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def brownout_dropped(url: str) -> float:
    """Records backpressure dropped so far (ingest_brownout_dropped_total, all sources)."""
    return summed(scrape(url), "ingest_brownout_dropped_total{")


def rocksdb_mib(metrics: str) -> float:
    """The worker's RocksDB block cache and memtables in use (ingest_rocksdb_*_bytes), in MiB, from
    its /metrics text."""
    used = summed(metrics, "ingest_rocksdb_block_cache_bytes ", "ingest_rocksdb_memtable_bytes ")
    return round(used / 2**20, 1)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


WORKER_ARGV = [sys.executable, "-m", "ingest_stream.cli", "worker"]
RESTART_TIMEOUT_S = 900.0


async def postgres_latency(dsn: str, tenants_like: str) -> tuple[float, float, float]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP "
            "(ORDER BY extract(epoch FROM updated_at - event_time)) AS p FROM ingest_records "
            "WHERE tenant LIKE $1", tenants_like)
    finally:
        await conn.close()
    if row is None:
        raise RuntimeError("no latency row from Postgres")
    p50, p95, p99 = (round(float(v), 3) for v in row["p"])
    return p50, p95, p99


def within_1s(url: str) -> dict[str, float]:
    """Per sink, the share of records whose source-to-sink latency was at most 1 s."""
    text = scrape(url)
    at_most: dict[str, float] = {}
    total: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ingest_lag_seconds_bucket{"):
            continue
        series, value = line.rsplit(" ", 1)
        labels = dict(part.split("=", 1) for part in series[series.index("{") + 1:-1].split(","))
        sink = labels["sink"].strip('"')
        if labels["le"].strip('"') == "1.0":
            at_most[sink] = at_most.get(sink, 0.0) + float(value)
        if labels["le"].strip('"') == "+Inf":
            total[sink] = total.get(sink, 0.0) + float(value)
    return {sink: round(at_most.get(sink, 0.0) / count, 4) for sink, count in total.items() if count}


def paced_stage(rate: float, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A paced stage's figures, or why it failed: the stages measured before it are kept."""
    try:
        return run()
    except RuntimeError as exc:
        return {"rate": round(rate, 1), "error": str(exc)}


def summarize(name: str, count: int, figures: dict[str, Any]) -> dict[str, Any]:
    return {"stage": name, "records": count, "records_per_s": round(count / figures["seconds"], 1),
            "cpu_us_per_record": round(figures["cpu_seconds"] / count * 1e6, 1),
            "seconds": round(figures["seconds"], 2), "peak_rss_mib": round(figures["peak_rss_mib"], 1),
            # cores busy machine-wide (stage, broker, sink servers, this harness) of os.cpu_count()
            "machine_busy_cores": round(figures["machine_busy_seconds"] / figures["seconds"], 2)}


def raw_job_stage(stack: DevStack, settings: Settings, work: Path, n: int, sinks: list[str]
                  ) -> dict[str, Any]:
    """(a''): bench/raw_job.py over its own topic and tenants (`benchjob-*`), writing the run's sinks
    it knows; then every entity read back from each (not timed): the stage fails unless all are
    there at their newest revision."""
    job_sinks = [s for s in sinks if s in raw_job.SINKS]
    if skipped := [s for s in sinks if s not in raw_job.SINKS]:
        print(f"note: (a'') writes {', '.join(job_sinks) or 'no sink'}, not {', '.join(skipped)}",
              file=sys.stderr)
    asyncio.run(empty_sinks(settings, sinks))
    values = records(n, tenant_prefix="benchjob")
    create_topics(stack.kafka_bootstrap, ["bench.job.in"])
    asyncio.run(produce(settings, values, topic="bench.job.in", progress_every=10**9))
    job = subprocess.run([sys.executable, "-m", "bench.raw_job", "--bootstrap", stack.kafka_bootstrap,
                          "--source", "bench.job.in", "--records", str(n), "--sinks", ",".join(job_sinks),
                          "--data-dir", str(work / "raw-job-dedupe")],
                         env={**os.environ, **stack.settings_env()}, capture_output=True, text=True,
                         cwd=ROOT, timeout=1800)
    if job.returncode:
        raise RuntimeError(f"stage (a'') exited {job.returncode}:\n{job.stderr[-4000:]}")
    stage = summarize("raw hand-written job", n, json.loads(job.stdout.splitlines()[-1]))
    stage["sinks"] = ",".join(job_sinks)
    stage["verified_entities"] = asyncio.run(raw_job.verify(settings, job_sinks,
                                                            raw_job.newest_revisions(values)))
    print(stage, file=sys.stderr)
    return stage


def throughput_stages(args: argparse.Namespace, stack: DevStack, settings: Settings, work: Path,
                      ingest: IngestStages) -> tuple[dict[str, dict[str, Any]], Any, Any]:
    """Stages (a) to (c2), then the latency and soak runs: the stages, latency, soak."""
    n = args.records
    values = records(n)
    bootstrap = stack.kafka_bootstrap
    stages: dict[str, dict[str, Any]] = {}

    def raw_stage(name: str, prefix: str, sink_topics: list[str]) -> dict[str, Any]:
        source, target = f"{prefix}.in", f"{prefix}.out"
        create_topics(bootstrap, [source, target, *sink_topics])
        asyncio.run(produce(settings, values, topic=source, progress_every=10**9))
        raw = subprocess.run([sys.executable, "-m", "bench.raw", "--bootstrap", bootstrap, "--source",
                              source, "--target", target, "--records", str(n),
                              "--sink-topics", ",".join(sink_topics)],
                             capture_output=True, text=True, cwd=ROOT, check=True, timeout=1800)
        stage = summarize(name, n, json.loads(raw.stdout.splitlines()[-1]))
        print(stage, file=sys.stderr)
        return stage

    stages["a_raw"] = raw_stage("raw aiokafka pipeline", "bench.raw", [])
    # (a') the same code with the contract's fan-out: one sink topic per sink of (c), read back
    stages["a2_raw_fanout"] = raw_stage("raw aiokafka, fan-out", "bench.fan",
                                        [f"bench.fan.sink.{s}" for s in args.sinks.split(",")])

    # (a'') right after the other raw stages, before (c); each starts on emptied sinks (empty_sinks)
    stages["a3_raw_job"] = raw_job_stage(stack, settings, work, n, args.sinks.split(","))

    create_topics(bootstrap, ["bench.faust.in", "bench.faust.out"])
    asyncio.run(produce(settings, values, topic="bench.faust.in", progress_every=10**9))
    faust_env = {"BENCH_BOOTSTRAP": bootstrap, "BENCH_SOURCE": "bench.faust.in",
                 "BENCH_TARGET": "bench.faust.out", "BENCH_WEB_PORT": str(free_port()),
                 "BENCH_DATA_DIR": str(work / "faust-data")}
    stages["b_faust"] = summarize("bare Faust pass-through", n, run_process_stage(
        [sys.executable, "-m", "bench.faust_pass", "worker", "-l", "info"], [faust_env],
        [work / "faust.log"], bootstrap, "bench-faust-pass", {"bench.faust.in": n}))
    print(stages["b_faust"], file=sys.stderr)

    stages["c_ingest_stream"] = summarize("ingest_stream end to end", n, ingest.throughput("bench", n, 1))
    print(stages["c_ingest_stream"], file=sys.stderr)
    if args.two_workers:
        stages["c2_two_workers"] = summarize("ingest_stream, 2 workers", n,
                                             ingest.throughput("bench2", n, 2))
        print(stages["c2_two_workers"], file=sys.stderr)
    latency = None
    if args.latency_seconds:
        rate = 0.8 * stages["c_ingest_stream"]["records_per_s"]
        latency = paced_stage(rate, lambda: ingest.latency("benchlat", rate, args.latency_seconds))
        print(latency, file=sys.stderr)
    soak = None
    if args.soak_seconds:
        rate = args.soak_rate or 0.5 * stages["c_ingest_stream"]["records_per_s"]
        soak = paced_stage(rate, lambda: ingest.soak("benchsoak", rate, args.soak_seconds))
        print(soak, file=sys.stderr)
    return stages, latency, soak


def outage_stage(args: argparse.Namespace, ingest: IngestStages, rate: float
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(o), or why it failed; and its per-second samples."""
    seconds = args.outage.seconds
    window = args.outage_window or max(seconds, 60.0)
    samples: list[dict[str, Any]] = []

    def run() -> dict[str, Any]:
        report, timeline = ingest.outage("benchout", args.outage.sink, seconds, rate, window)
        samples.extend(timeline)
        return report

    try:
        report = run()
    except Exception as exc:  # the stages measured before it are kept, as paced_stage does
        report = {"rate": round(rate, 1), "error": f"{type(exc).__name__}: {exc}"}
    return {"sink": args.outage.sink, "seconds": seconds, **report}, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--sinks", default="postgres,neo4j,typesense",
                        help="sinks stage (c) writes to (INGEST_SINKS)")
    parser.add_argument("--two-workers", action="store_true",
                        help="also run stage (c) with two worker processes (scaling)")
    parser.add_argument("--latency-seconds", type=float, default=20,
                        help="paced run at 80%% of (c)'s rate for this long; 0 skips it")
    parser.add_argument("--soak-seconds", type=float, default=0,
                        help="memory soak: a paced run at --soak-rate for this long (600 = 10 min)")
    parser.add_argument("--soak-rate", type=float, metavar="RECORDS_PER_S",
                        help="records/s of the soak (default: 50%% of (c)'s rate; a rate the servers "
                             "sustain for the whole soak, since it measures memory, not speed)")
    parser.add_argument("--outage", type=outage.parse_outage, metavar="SINK:SECONDS",
                        help="stage (o): a paced run during which SINK's server is down for SECONDS "
                             "(e.g. typesense:60); SINK must be one of --sinks")
    parser.add_argument("--outage-rate", type=float, metavar="RECORDS_PER_S",
                        help="records/s of stage (o) (default: 50%% of (c)'s rate)")
    parser.add_argument("--outage-window", type=float, metavar="S",
                        help="stage (o)'s seconds measured before and after the outage "
                             "(default: SECONDS, at least 60)")
    parser.add_argument("--only", choices=["outage"],
                        help="run only this stage (outage: needs --outage and --outage-rate)")
    args = parser.parse_args()
    sinks = args.sinks.split(",")
    if args.outage and args.outage.sink not in sinks:
        parser.error(f"--outage {args.outage.sink}:…: {args.outage.sink} is not one of --sinks {args.sinks}")
    if args.only == "outage" and not (args.outage and args.outage_rate):
        parser.error("--only outage needs --outage SINK:SECONDS and --outage-rate (no stage (c) to take "
                     "50 % of)")
    for name in ("outage_rate", "outage_window", "soak_rate"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if (args.outage_rate or args.outage_window) and not args.outage:
        parser.error("--outage-rate and --outage-window need --outage SINK:SECONDS")
    if args.soak_rate and not args.soak_seconds:
        parser.error("--soak-rate needs --soak-seconds")
    n = args.records
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    stages: dict[str, dict[str, Any]] = {}
    latency = soak = outage_report = None
    outage_samples: list[dict[str, Any]] = []
    with DevStack(work / "stack") as stack:
        settings = Settings.from_env({**stack.settings_env(), "INGEST_SINKS": args.sinks})
        ingest = IngestStages(stack, settings, work, args.sinks)
        if args.only != "outage":
            stages, latency, soak = throughput_stages(args, stack, settings, work, ingest)
        if args.outage:
            rate = args.outage_rate or 0.5 * stages["c_ingest_stream"]["records_per_s"]
            outage_report, outage_samples = outage_stage(args, ingest, rate)
            print(outage_report, file=sys.stderr)

    result: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"), "records": n,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "sinks": args.sinks, "stages": stages,
    }
    if stages:
        a, a2, a3, b, c = (stages[k]["records_per_s"]
                           for k in ("a_raw", "a2_raw_fanout", "a3_raw_job", "b_faust", "c_ingest_stream"))
        result |= {"ratio_vs_raw": round(c / a, 3), "ratio_vs_faust": round(c / b, 3),
                   "ratio_vs_raw_fanout": round(c / a2, 3), "ratio_vs_raw_job": round(c / a3, 3),
                   "latency": latency, "soak": soak}
        if "c2_two_workers" in stages:
            result["two_workers_speedup"] = round(stages["c2_two_workers"]["records_per_s"] / c, 2)
    if args.outage:
        result["outage"] = outage_report
        result["outage_samples"] = outage_samples
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    if stages:
        print_stages(result, stages, latency, soak, path)
    if outage_report:
        print_outage(outage_report, path)
    return 0


def print_stages(result: dict[str, Any], stages: dict[str, dict[str, Any]], latency: Any, soak: Any,
                 path: Path) -> None:
    print(f"{'stage':<28} {'records/s':>10} {'cpu µs/rec':>11} {'peak RSS MiB':>13} "
          f"{'machine busy':>13}")
    for stage in stages.values():
        print(f"{stage['stage']:<28} {stage['records_per_s']:>10} {stage['cpu_us_per_record']:>11} "
              f"{stage['peak_rss_mib']:>13} {stage['machine_busy_cores']:>7} of {os.cpu_count()}")
    print(f"c/a = {result['ratio_vs_raw']}, c/b = {result['ratio_vs_faust']}, "
          f"c/a' = {result['ratio_vs_raw_fanout']}, c/a'' = {result['ratio_vs_raw_job']}  ({path})")
    if "two_workers_speedup" in result:
        print(f"2 workers / 1 worker = {result['two_workers_speedup']}")
    for name, paced in (("latency", latency), ("soak", soak)):
        if paced and "error" in paced:
            print(f"{name} at {paced['rate']:.0f} records/s FAILED: {paced['error']}")
            if "lag_samples_records" in paced:  # a soak that fell behind: how memory and lag went
                print(f"  every 10 s until then: worker RSS MiB {paced['rss_samples_mib']}; consumer "
                      f"lag records {[round(x) for x in paced['lag_samples_records']]}")
    if soak and "error" not in soak:
        print(f"soak {soak['seconds']:.0f} s at {soak['rate']:.0f} records/s: worker RSS "
              f"{soak['rss_start_mib']} MiB at start, {soak['rss_middle_mib']} MiB halfway, "
              f"{soak['rss_end_mib']} MiB at the end (second half "
              f"{soak['rss_second_half_growth_mib']:+} MiB), max {soak['rss_max_mib']} MiB; of it RocksDB "
              f"{soak['rocksdb_start_mib']} -> {soak['rocksdb_middle_mib']} -> {soak['rocksdb_end_mib']} MiB,"
              f" the rest {soak['rss_less_rocksdb_second_half_growth_mib']:+} MiB in the second half; "
              f"consumer lag at most {soak['lag_records_max_first_half']:.0f} / "
              f"{soak['lag_records_max_second_half']:.0f} records in the first / second half")
    if latency and "error" not in latency:
        print(f"latency at {latency['rate']:.0f} records/s (80 % of c): postgres p50/p95/p99 = "
              f"{latency['postgres_p50_s']}/{latency['postgres_p95_s']}/{latency['postgres_p99_s']} s; "
              f"share within 1 s by sink: {latency['within_1s_by_sink']}")


def print_outage(report: dict[str, Any], path: Path) -> None:
    head = f"outage of {report['sink']} for {report['seconds']:g} s"
    if "error" in report:
        print(f"{head} at {report['rate']:.0f} records/s FAILED: {report['error']}  ({path})")
        return
    print(f"{head} at {report['rate']:.0f} records/s ({path}):")
    for sink, rates in report["applied_per_s"].items():
        print(f"  {sink:<10} applied/s before {rates['before']}, during {rates['during']}, "
              f"after {rates['after']}")
    print(f"  others during/before: {report['others_during_vs_before']}; caught up "
          f"{report['caught_up_s']} s after the restart (with the other sinks after "
          f"{report['caught_up_with_others_s']} s, outage backlog written after "
          f"{report['outage_backlog_written_s']} s); lost {report['lost']}; OLDER_REVISION letters "
          f"{report['dlq_older_revision']}; lane state {report['lane_state']}; spilled "
          f"{report['spilled_records']}")
    print(f"  checks: {report['checks']}")

if __name__ == "__main__":
    sys.exit(main())
