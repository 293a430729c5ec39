"""`ingest-stream`: worker | dev | produce | lag | config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import orjson
from aiokafka.errors import KafkaError

from ingest_stream import record_reader
from ingest_stream.errors import ConfigError
from ingest_stream.ops.output import add_version, run_command

DEFAULT_SETTLE_S = 10.0  # ingest-stream reconcile --settle


def build_parser() -> argparse.ArgumentParser:
    parser = add_version(argparse.ArgumentParser(prog="ingest-stream", description=__doc__))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("worker", help="run a Faust worker against the configured servers")
    dev = commands.add_parser("dev", help="the whole pipeline on embedded servers, no Docker")
    dev.add_argument("--root", type=Path, default=Path(".devstack"), help="data directory")
    dev.add_argument("--demo-rate", type=float, default=5.0, help="demo records per second")
    prod = commands.add_parser("produce", help="send records to a source topic")
    prod.add_argument("--file", type=Path, help="JSONL file, one record per line")
    prod.add_argument("--synthetic", type=int, metavar="N", help="send N synthetic valid records")
    prod.add_argument("--source", default="kafka", help="source topic suffix (kafka, webhook, ...)")
    prod.add_argument("--rate", type=float, help="records per second (default: as fast as possible)")
    lag = commands.add_parser("lag", help="consumer-group lag: committed, end, records and seconds behind")
    lag.add_argument("--group", help="consumer group (default: INGEST_APP_ID, the worker's)")
    lag.add_argument("--topic", action="append", default=[],
                     help="topic to report (repeatable; default: every topic the worker consumes)")
    lag.add_argument("--json", action="store_true", help="machine-readable output")
    config = commands.add_parser("config", help="the effective settings (secrets masked); unknown "
                                                "INGEST_* names are warned about")
    config.add_argument("--json", action="store_true", help="machine-readable output")
    points = commands.add_parser("checkpoints", help="per tenant and source: the last offset forwarded "
                                                     "and the latest event time (from the table's changelog)")
    points.add_argument("--tenant")
    points.add_argument("--source", choices=("kafka", "webhook", "s3", "sftp"))
    points.add_argument("--json", action="store_true", help="machine-readable output")
    stats = commands.add_parser("dedupe-stats", help="per source: dedupe keys held, oldest, TTL, evicted")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    rec = commands.add_parser("reconcile", help="compare the sinks per tenant (counts, ids, revisions) "
                                              "and open dead letters; exit 1 on a mismatch")
    rec.add_argument("--tenant", help="one tenant (default: every tenant any sink holds)")
    rec.add_argument("--json", action="store_true", help="machine-readable output")
    rec.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S, metavar="SECONDS",
                     help="read mismatched ids again after this long, and report only those still off "
                          f"(records on their way through the sinks; default {DEFAULT_SETTLE_S:g}, 0: no)")
    return parser


def main(argv: list[str] | None = None) -> int:
    record_reader.install()  # every command that reads Kafka: no record's header names stop it
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except ConfigError as error:  # a malformed INGEST_* value: one line, not a traceback
        print(f"ingest-stream: {error}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "config":
        return run_config(args)
    if args.command == "worker":
        return run_worker()
    if args.command == "dev":
        from ingest_stream.ops.dev import run_dev

        return run_dev(args.root, demo_rate=args.demo_rate)
    if args.command == "lag":
        return run_lag(args)
    if args.command in ("checkpoints", "dedupe-stats"):
        return run_table_state(args)
    if args.command == "reconcile":
        from ingest_stream.ops.reconcile import run_reconcile

        return run_reconcile(tenant=args.tenant, as_json=args.json, settle_s=args.settle)
    return run_produce(args, parser)


def run_lag(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from ingest_stream.config import SOURCES, Settings
    from ingest_stream.ops.lag import LagProbe
    from ingest_stream.ops.output import format_table, write_json

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its connection errors reach us anyway
    settings = Settings.from_env()
    group = args.group or settings.app_id
    topics = args.topic or [settings.source_topic(s) for s in SOURCES] + [
        settings.sink_topic(s) for s in settings.sinks]

    async def measure() -> list:  # type: ignore[type-arg]
        probe = LagProbe(settings.kafka_bootstrap, group)
        try:
            await probe.start()
            return await probe.measure(topics)
        finally:
            await probe.stop()

    try:
        rows = asyncio.run(measure())
    except (KafkaError, OSError) as error:
        print(f"ingest-stream lag: {error}", file=sys.stderr)
        return 1
    if args.json:
        write_json([{"group": group, "topic": r.topic, "partition": r.partition, "committed": r.committed,
                     "end": r.end, "lag": r.records, "lag_seconds": round(r.seconds, 3)} for r in rows],
                   sys.stdout)
        return 0
    print(format_table(("GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "LAG_S"),
                       [(group, r.topic, r.partition, "-" if r.committed is None else r.committed, r.end,
                         r.records, f"{r.seconds:.1f}") for r in rows]))
    total = sum(r.records for r in rows)
    print(f"total lag {total} record(s); oldest waiting {max((r.seconds for r in rows), default=0):.1f}s")
    return 0


def run_table_state(args: argparse.Namespace) -> int:
    import time

    from ingest_stream.config import SOURCES, Settings
    from ingest_stream.ops.output import format_table, write_json
    from ingest_stream.ops.table_state import checkpoints, dedupe_stats

    settings = Settings.from_env()

    async def show() -> int:
        if args.command == "checkpoints":
            rows = await checkpoints(settings, tenant=args.tenant,
                                     sources=[args.source] if args.source else SOURCES)
            columns = ("tenant", "source", "topic", "partition", "offset", "event_time", "updated_at")
        else:
            rows = await dedupe_stats(settings, now_ms=int(time.time() * 1000))
            columns = ("source", "keys", "evicted", "ttl_s", "oldest_first_seen", "newest_first_seen",
                       "expired_not_evicted")
        if args.json:
            write_json(rows, sys.stdout)
        else:
            print(format_table([c.upper() for c in columns], [[r[c] for c in columns] for r in rows]))
        return 0

    return run_command(f"ingest-stream {args.command}", show, errors=(KafkaError, OSError),
                       interrupted="nothing was changed")


def run_config(args: argparse.Namespace) -> int:
    from ingest_stream.config import Settings, effective, unknown_names
    from ingest_stream.ops.output import format_table, write_json

    shown = effective(Settings.from_env())
    for name in unknown_names(os.environ):
        print(f"ingest-stream config: warning: {name} is not a setting (ignored)", file=sys.stderr)
    if args.json:
        write_json(shown, sys.stdout)
    else:
        print(format_table(("VARIABLE", "VALUE"), sorted(shown.items())))
    return 0


def run_worker() -> int:
    from ingest_stream.config import Settings
    from ingest_stream.malloc import hold_thresholds

    # before the app allocates its buffers
    hold_thresholds(Settings.from_env().malloc_mmap_threshold_kib * 1024)
    from ingest_stream.app import app
    from ingest_stream.collector import tune_collector

    settings = app.pipeline.settings  # type: ignore[attr-defined]
    tune_collector(settings.gc_tuned)  # the app is built: what is alive now lives as long as it
    sys.argv = [sys.argv[0], "worker", "-l", settings.log_level]
    app.main()
    return 0


def run_produce(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ingest_stream.config import Settings
    from ingest_stream.ops.produce import jsonl_records, produce, synthetic_records

    if (args.file is None) == (args.synthetic is None):
        parser.error("give exactly one of --file or --synthetic")
    settings = Settings.from_env()
    if args.file is not None:
        if not args.file.exists():
            parser.error(f"{args.file}: no such file")
        values = jsonl_records(args.file)
    else:
        values = (orjson.dumps(r) for r in synthetic_records(args.synthetic, source=args.source))
    topic = settings.source_topic(args.source)

    async def send() -> int:
        sent = await produce(settings, values, topic=topic, rate=args.rate)
        print(f"sent {sent} record(s) to {topic}")
        return 0

    return run_command("ingest-stream produce", send, errors=(KafkaError, OSError),
                       interrupted="what was acknowledged before stays sent")


if __name__ == "__main__":
    sys.exit(main())
