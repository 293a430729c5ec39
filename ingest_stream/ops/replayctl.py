"""`replayctl`: plan, approve, run and follow replays of a tenant's time range (contract §6, runbook).

    replayctl plan --tenant acme-corp --from 2026-11-01T00:00:00Z --to 2026-11-02T00:00:00Z \\
                   --sources s3,kafka --throttle 100
    replayctl approve <plan-id> --rfa RFA-1234      (plans estimated above the threshold)
    replayctl run --plan <plan-id>                  (resumes where a killed run stopped)
    replayctl status <plan-id> | list [--tenant T] | cancel <plan-id>
    replayctl hold set --tenant T --reason "..." | hold clear --tenant T | hold list
"""

from __future__ import annotations

import argparse
import getpass
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka.errors import KafkaError

from ingest_stream import record_reader
from ingest_stream.config import SOURCES, Settings
from ingest_stream.core.replay import PlanError, ReplayPlan
from ingest_stream.core.timefmt import epoch_ms, format_rfc3339
from ingest_stream.ops.kafka_io import ToolError
from ingest_stream.ops.output import add_version, format_table, run_command, write_json
from ingest_stream.ops.replay import LegalHolds, Plans, Runner, make_plan, now_text


def build_parser() -> argparse.ArgumentParser:
    parser = add_version(argparse.ArgumentParser(
        prog="replayctl", description="Replay a tenant's time range.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__))
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="resolve a time range to offsets and estimate it")
    plan.add_argument("--tenant", required=True)
    plan.add_argument("--from", dest="start", required=True, type=_timestamp, help="RFC 3339, inclusive")
    plan.add_argument("--to", dest="stop", required=True, type=_timestamp, help="RFC 3339, exclusive")
    plan.add_argument("--sources", default=",".join(SOURCES), type=_sources, help="comma-separated")
    plan.add_argument("--throttle", type=float, default=100.0, help="records per second (default 100)")
    approve = commands.add_parser("approve", help="approve a large plan with a request-for-approval id")
    approve.add_argument("plan_id")
    approve.add_argument("--rfa", required=True, help="RFA-…")
    approve.add_argument("--by", default=getpass.getuser(), help="who approves (default: you)")
    run = commands.add_parser("run", help="run (or resume) a plan in the foreground")
    run.add_argument("--plan", dest="plan_id", required=True)
    status = commands.add_parser("status", help="a plan's status, phase and counts")
    status.add_argument("plan_id")
    listing = commands.add_parser("list", help="plans, newest last")
    listing.add_argument("--tenant")
    cancel = commands.add_parser("cancel", help="cancel a plan (a running one stops at its next checkpoint)")
    cancel.add_argument("plan_id")
    cancel.add_argument("--by", default=getpass.getuser())
    hold = commands.add_parser("hold", help="legal holds: a held tenant's replays are refused")
    holds = hold.add_subparsers(dest="action", required=True)
    hold_set = holds.add_parser("set", help="put a tenant on legal hold: its replays are refused")
    hold_set.add_argument("--tenant", required=True)
    hold_set.add_argument("--reason", required=True, help="why (the case, the ticket)")
    hold_set.add_argument("--by", default=getpass.getuser())
    hold_clear = holds.add_parser("clear", help="lift a tenant's legal hold")
    hold_clear.add_argument("--tenant", required=True)
    hold_clear.add_argument("--by", default=getpass.getuser())
    hold_list = holds.add_parser("list", help="the tenants on legal hold")
    for sub in (plan, approve, run, status, listing, cancel, hold_set, hold_clear, hold_list):
        sub.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _timestamp(text: str) -> int:
    try:
        return epoch_ms(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time (2026-11-01T00:00:00Z)") from None


def _sources(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = set(names) - set(SOURCES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sources are among {', '.join(SOURCES)}")
    return names


def describe(plan: ReplayPlan) -> dict[str, Any]:
    document = asdict(plan)
    document["from"] = format_rfc3339_ms(plan.from_ms)
    document["to"] = format_rfc3339_ms(plan.to_ms)
    document["estimate_total"] = plan.total_estimate
    document["range_records"] = sum(end - start for start, end in plan.ranges.values())
    return document


def format_rfc3339_ms(epoch_ms_value: int) -> str:
    return format_rfc3339(datetime.fromtimestamp(epoch_ms_value / 1000, UTC))


def print_plan(plan: ReplayPlan, out: TextIO) -> None:
    d = describe(plan)
    print(f"plan {plan.id}: {plan.status.value} ({plan.phase})", file=out)
    print(f"  tenant {plan.tenant}, {d['from']} → {d['to']}, sources {','.join(plan.sources)}, "
          f"throttle {plan.throttle:g}/s", file=out)
    print(f"  estimate {plan.total_estimate} record(s) of the tenant "
          f"({', '.join(f'{s} {n}' for s, n in plan.estimate.items()) or 'none'}) "
          f"in {d['range_records']} record(s) of range", file=out)
    if plan.needs_approval:
        needed = f"required: replayctl approve {plan.id} --rfa RFA-…"
        print(f"  approval: {plan.rfa or needed}", file=out)
    print(f"  progress: {plan.replayed} replayed, {plan.scanned} scanned", file=out)
    if plan.error:
        print(f"  error: {plan.error}", file=out)


async def run(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings.from_env()
    plans, holds = Plans(settings), LegalHolds(settings)
    if args.command == "hold":
        if args.action == "list":
            current = await holds.all()
            if args.json:
                write_json(current, out)
            else:
                rows = [(t, h["at"], h["set_by"], h["reason"]) for t, h in current.items()]
                print(format_table(("TENANT", "SINCE", "BY", "REASON"), rows), file=out)
            return 0
        if args.action == "set":
            await holds.set(args.tenant, reason=args.reason, by=args.by)
        else:
            await holds.clear(args.tenant)
        if args.json:
            write_json({"tenant": args.tenant, "held": args.action == "set"}, out)
        else:
            print(f"legal hold {'set on' if args.action == 'set' else 'cleared for'} {args.tenant}", file=out)
        return 0
    if args.command == "list":
        found = [p for p in await plans.all() if args.tenant in (None, p.tenant)]
        if args.json:
            write_json([describe(p) for p in found], out)
        else:
            print(format_table(("PLAN", "TENANT", "STATUS", "PHASE", "ESTIMATE", "REPLAYED", "UPDATED"),
                               [(p.id, p.tenant, p.status.value, p.phase, p.total_estimate, p.replayed,
                                 p.updated_at) for p in found]), file=out)
        return 0
    if args.command == "plan":
        show = (lambda n: print(f"\rscanned {n}", end="", file=sys.stderr)) if sys.stderr.isatty() else (
            lambda n: None)
        plan = await make_plan(settings, tenant=args.tenant, from_ms=args.start, to_ms=args.stop,
                               sources=args.sources, throttle=args.throttle, progress=show)
    elif args.command == "approve":
        plan = await plans.get(args.plan_id)
        plan = plan.approve(args.rfa, by=args.by, at=now_text(), held=await holds.held(plan.tenant))
        await plans.save(plan)
    elif args.command == "cancel":
        plan = (await plans.get(args.plan_id)).cancelled(by=args.by, at=now_text())
        await plans.save(plan)
    elif args.command == "status":
        plan = await plans.get(args.plan_id)
    else:
        live = sys.stderr.isatty() and not args.json
        report = (lambda p: print(f"\r{p.id}: {p.replayed} replayed, {p.scanned} scanned", end="",
                                  file=sys.stderr)) if live else (lambda p: None)
        plan = await Runner(settings, plans, holds, report=report).run(args.plan_id)
    if args.json:
        write_json(describe(plan), out)
    else:
        print_plan(plan, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    record_reader.install()  # a record whose header names are not UTF-8 must not stop a replay
    args = build_parser().parse_args(argv)
    return run_command("replayctl", lambda: run(args, sys.stdout),
                       errors=(PlanError, ToolError, KafkaError, OSError),
                       interrupted="`replayctl run --plan <id>` resumes from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
