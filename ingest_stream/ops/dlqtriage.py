"""`dlqtriage`: triage the dead-letter topic and send records back (contract §6, the runbook's
commands). The work is done in `ops/dead_letters.py`; this module parses and prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from aiokafka.errors import KafkaError

from ingest_stream import record_reader
from ingest_stream.config import Settings
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.triage import DEFAULT_MAX_REDRIVES, Selection, Status, analyze
from ingest_stream.ops.dead_letters import (
    DeadLetterStore,
    RedriveReport,
    export,
    purge,
    redrive,
    sample,
    summary,
    verify_archive,
)
from ingest_stream.ops.kafka_io import ToolError
from ingest_stream.ops.output import add_version, format_table, printable, run_command, write_json


# --- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = add_version(argparse.ArgumentParser(prog="dlqtriage",
                                                 description="Triage and redrive the dead-letter topic."))
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--tenant", help="only this tenant")
        sub.add_argument("--reason", action="append", default=[], type=_reason,
                         help="only this reason code (repeatable, or comma-separated)")
        sub.add_argument("--stage", type=Stage, choices=list(Stage), help="only this stage")
        sub.add_argument("--id", dest="record_id", help="only this record id")
        sub.add_argument("--older-than", type=float, metavar="DAYS", help="failed more than DAYS ago")
        sub.add_argument("--newer-than", type=float, metavar="DAYS", help="failed less than DAYS ago")
        sub.add_argument("--status", action="append", default=[], type=Status, choices=list(Status),
                         help="dead letters in this status (default: open)")
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    command("summary", "counts by reason, tenant and stage")
    sample_cmd = command("sample", "show some dead letters: headers and decoded value")
    sample_cmd.add_argument("--limit", type=int, default=5)
    sample_cmd.add_argument("--full", action="store_true", help="every header, the whole value")
    analyze_cmd = command("analyze", "patterns: top errors per reason, time histogram, sources, actions")
    analyze_cmd.add_argument("--producer-header", default="x-producer",
                             help="header naming the producer (default x-producer)")
    export_cmd = command("export", "stream dead letters as JSONL or CSV")
    export_cmd.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export_cmd.add_argument("--output", type=Path, help="file (default: standard output)")
    purge_cmd = command("purge", "archive (JSONL.gz + SHA-256 manifest), then mark purged")
    purge_cmd.add_argument("--archive-dir", type=Path,
                           help="where archives go (default: $INGEST_DATA_DIR/dlq-archive)")
    purge_cmd.add_argument("--dry-run", action="store_true", help="count, archive nothing, mark nothing")
    purge_cmd.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    verify_cmd = commands.add_parser("verify", help="check an archive against its manifest")
    verify_cmd.add_argument("manifest", type=Path)
    verify_cmd.add_argument("--json", action="store_true")
    redrive_cmd = command("redrive", "send dead letters back to where they failed")
    redrive_cmd.add_argument("--limit", type=int, help="at most this many")
    redrive_cmd.add_argument("--dry-run", action="store_true", help="say what would be sent, send nothing")
    redrive_cmd.add_argument("--force", action="store_true", help="also non-retryable reasons")
    redrive_cmd.add_argument("--yes", action="store_true",
                             help="with --force: do not ask (needed without a terminal)")
    redrive_cmd.add_argument("--rate", type=float, help="records per second (default: unlimited)")
    redrive_cmd.add_argument("--max-redrives", type=int, default=DEFAULT_MAX_REDRIVES,
                             help="park a record redriven this many times already")
    return parser


def _reason(text: str) -> list[Reason]:
    try:
        return [Reason(part.strip().upper()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown reason {text!r}; one of {', '.join(r.value for r in Reason)}") from None


def selection_from(args: argparse.Namespace, now: datetime) -> Selection:
    return Selection(
        tenant=args.tenant,
        reasons=frozenset(r for group in args.reason for r in group),
        stage=args.stage,
        record_id=args.record_id,
        failed_before=now - timedelta(days=args.older_than) if args.older_than is not None else None,
        failed_after=now - timedelta(days=args.newer_than) if args.newer_than is not None else None,
        statuses=frozenset(args.status) or frozenset({Status.OPEN}),
    )


def _progress_printer(stream: TextIO) -> Callable[[RedriveReport], None]:
    started = time.monotonic()

    def show(report: RedriveReport) -> None:
        sent = sum(report.sent.values())
        rate = sent / max(time.monotonic() - started, 1e-6)
        print(f"\r{report.redrive_id}: {sent} sent, {report.parked} parked ({rate:.0f}/s)",
              end="", file=stream, flush=True)

    return show


@dataclass(frozen=True, slots=True)
class _Triage:
    """What every command but `verify` works on: the dead-letter topic and the selection given."""

    settings: Settings
    store: DeadLetterStore
    selection: Selection
    now: datetime

    @classmethod
    def open(cls, args: argparse.Namespace) -> _Triage:
        settings = Settings.from_env()
        store = DeadLetterStore(settings)
        now = datetime.now(UTC)
        return cls(settings, store, selection_from(args, now), now)


async def _verify(args: argparse.Namespace, out: TextIO) -> int:
    """An archive against its manifest: no settings, no broker."""
    result = verify_archive(args.manifest)
    if args.json:
        write_json(result, out)
    else:
        verdict = "OK" if result["ok"] else f"FAILED: {result['problem']}"
        print(printable(f"{result['archive']}: {verdict} ({result['records']} records)"), file=out)
    return 0 if result["ok"] else 1


async def _analyze(args: argparse.Namespace, out: TextIO) -> int:
    triage = _Triage.open(args)
    analysis = analyze([letter async for letter, _ in triage.store.selected(triage.selection)],
                       producer_header=args.producer_header)
    return _show(args, analysis, print_analysis, out)


async def _export(args: argparse.Namespace, out: TextIO) -> int:
    triage = _Triage.open(args)
    if args.output is None:
        await export(triage.store, triage.selection, out, fmt=args.format)
    else:
        with args.output.open("w", newline="") as handle:
            count = await export(triage.store, triage.selection, handle, fmt=args.format)
        print(f"exported {count} dead letter(s) to {args.output}", file=sys.stderr)
    return 0


async def _purge(args: argparse.Namespace, out: TextIO) -> int:
    triage = _Triage.open(args)
    if args.older_than is None:
        raise ToolError("purge needs --older-than DAYS")
    archive_dir = args.archive_dir or triage.settings.data_dir / "dlq-archive"
    if not args.dry_run:
        confirm("purge: archive the selected dead letters and mark them purged (hidden from every "
                "view)?", yes=args.yes)
    result = await purge(triage.store, triage.selection, archive_dir=archive_dir, dry_run=args.dry_run,
                         now=triage.now)
    if args.json:
        write_json(result, out)
    elif result["dry_run"]:
        print(f"would archive and purge {result['would_purge']} dead letter(s)", file=out)
    else:
        where = (f"; archive {result['archive']}, manifest {result['manifest']}"
                 if result["purged"] else "")
        print(f"purged {result['purged']} dead letter(s){where}", file=out)
    return 0


async def _summary(args: argparse.Namespace, out: TextIO) -> int:
    triage = _Triage.open(args)
    result = await summary(triage.store, triage.selection)
    if args.json:
        write_json(result, out)
        return 0
    print(f"{result['total']} dead letter(s) in {result['topic']} "
          f"({', '.join(f'{n} {s}' for s, n in result['by_status'].items()) or 'none selected'}); "
          f"retryable {result['retryable_share']:.0%}; "
          f"oldest {result['oldest']}, newest {result['newest']}",
          file=out)
    if result["groups"]:
        rows = [(g["reason"], g["tenant"], g["stage"], g["count"]) for g in result["groups"]]
        print(format_table(("REASON", "TENANT", "STAGE", "COUNT"), rows), file=out)
    if result["repeats"]:
        print(f"{result['repeats']} repeated copies (published again after a worker restart) "
              "were counted once", file=out)
    if result["unreadable"]:
        print(f"{result['unreadable']} record(s) without valid dlq.* headers were skipped", file=out)
    return 0


async def _sample(args: argparse.Namespace, out: TextIO) -> int:
    triage = _Triage.open(args)
    letters = await sample(triage.store, triage.selection, limit=args.limit, full=args.full)
    return _show(args, letters, print_samples, out)


async def _redrive(args: argparse.Namespace, out: TextIO) -> int:
    triage = _Triage.open(args)
    if args.force and not args.dry_run:
        confirm("redrive --force: send non-retryable dead letters back too (the cause must be fixed "
                "first)?", yes=args.yes)
    show = _progress_printer(sys.stderr) if sys.stderr.isatty() and not args.json else (lambda r: None)
    report = await redrive(triage.store, triage.selection, force=args.force, dry_run=args.dry_run,
                           limit=args.limit, rate=args.rate, max_redrives=args.max_redrives, progress=show)
    result = report.as_dict()
    if args.json:
        write_json(result, out)
    else:
        verb = "would send" if report.dry_run else "sent"
        print(f"\n{report.redrive_id}: {verb} {result['sent']}, parked {report.parked}, "
              f"skipped {report.not_retryable} not retryable (use --force), "
              f"refused {report.refused}", file=out)
        for topic, count in sorted(report.sent.items()):
            print(f"  {printable(topic)}: {count}", file=out)
        if report.refused:
            print(f"refused (not sent, left open; --force does not change this), "
                  f"{len(report.refusals)} of {report.refused} shown:", file=out)
            for refusal in report.refusals:
                print(f"  {refusal['id']}: {printable(refusal['problem'])}", file=out)
    return 0


def _show(args: argparse.Namespace, document: Any, printer: Callable[[Any, TextIO], None],
          out: TextIO) -> int:
    """`--json`: the document as JSON; else as `printer` writes it for a person."""
    if args.json:
        write_json(document, out)
    else:
        printer(document, out)
    return 0


# One function per command of `build_parser`, by the command's name.
COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO], Awaitable[int]]] = {
    "summary": _summary,
    "sample": _sample,
    "analyze": _analyze,
    "export": _export,
    "purge": _purge,
    "verify": _verify,
    "redrive": _redrive,
}


async def run(args: argparse.Namespace, out: TextIO) -> int:
    return await COMMANDS[args.command](args, out)


def print_samples(letters: list[dict[str, Any]], out: TextIO) -> None:
    """Dead letters for a terminal: everything from the record escaped (`printable`)."""
    for letter in letters:
        print(f"--- {letter['id']} [{letter['status']}] key={printable(letter['key'])}", file=out)
        truncated = letter["truncated"]
        if truncated is not None and "garbled" in truncated:
            print(f"  TRUNCATED? {printable(truncated['garbled'])}", file=out)
        elif truncated is not None:
            print(f"  TRUNCATED: the value is the first {truncated['prefix_bytes']} of "
                  f"{truncated['original_bytes']} bytes (sha256 {truncated['sha256']}); the whole "
                  f"record is at {printable(truncated['original_at'])}", file=out)
        for name, value in letter["headers"].items():
            print(f"  {printable(name)}: {printable(value)}", file=out)
        print(f"  value: {printable(letter['value'])}", file=out)
    if not letters:
        print("no dead letters match", file=out)


def print_analysis(analysis: dict[str, Any], out: TextIO) -> None:
    print(f"{analysis['total']} dead letter(s)", file=out)
    for entry in analysis["reasons"]:
        kind = "retryable" if entry["retryable"] else "not retryable"
        print(f"\n{entry['reason']}: {entry['count']} ({kind})", file=out)
        for error in entry["top_errors"]:
            print(f"  {error['count']:>6}  {printable(error['pattern'])}", file=out)
        for name in ("stages", "sources", "origin_topics", "producers", "tenants"):
            print(f"  {name}: " + ", ".join(f"{printable(k)} {v}" for k, v in entry[name].items()),
                  file=out)
        print(f"  suggested: {entry['suggested_action']}", file=out)
    histogram = analysis["histogram"]
    if histogram["counts"]:
        print(f"\nfailures per {histogram['bucket']}:", file=out)
        peak = max(histogram["counts"].values())
        for bucket, count in histogram["counts"].items():
            print(f"  {bucket}  {count:>6}  {'#' * max(1, round(40 * count / peak))}", file=out)


def confirm(question: str, *, yes: bool, stdin: TextIO = sys.stdin, out: TextIO = sys.stderr) -> None:
    """An operation that cannot be undone goes ahead with --yes, or when the operator at a terminal
    answers y; ToolError otherwise (without a terminal, nobody can answer: say how to)."""
    if yes:
        return
    if not stdin.isatty():
        command = question.split(":")[0]
        raise ToolError(f"{command} needs --yes without a terminal (--dry-run shows what it would do)")
    print(f"{question} [y/N] ", end="", file=out, flush=True)
    if stdin.readline().strip().lower() not in ("y", "yes"):
        raise ToolError("not confirmed: nothing done")


def main(argv: list[str] | None = None) -> int:
    record_reader.install()  # a letter whose header names are not UTF-8 must not stop the tool
    args = build_parser().parse_args(argv)
    return run_command("dlqtriage", lambda: run(args, sys.stdout), errors=(ToolError, KafkaError, OSError),
                       interrupted="statuses of what was acknowledged are saved")


if __name__ == "__main__":
    sys.exit(main())
