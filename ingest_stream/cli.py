"""`ingest-stream`: worker | dev | produce."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ingest-stream", description=__doc__)
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
    args = parser.parse_args(argv)

    if args.command == "worker":
        return run_worker()
    if args.command == "dev":
        from ingest_stream.ops.dev import run_dev

        return run_dev(args.root, demo_rate=args.demo_rate)
    return run_produce(args, parser)


def run_worker() -> int:
    from ingest_stream.app import app

    settings = app.pipeline.settings  # type: ignore[attr-defined]
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
    sent = asyncio.run(produce(settings, values, topic=settings.source_topic(args.source),
                               rate=args.rate))
    print(f"sent {sent} record(s) to {settings.source_topic(args.source)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
