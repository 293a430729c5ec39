"""`dlqtriage`: look at the dead-letter topic and send records back (contract §6, runbook).

The DLQ topic is append-only; each dead letter's status (open / redriven / parked / purged) is kept
in a compacted companion topic `<dlq>.status`, keyed by the letter's `partition:offset`. Statuses
survive restarts and are shared by every operator, and a redrive marks what it sent, so running it
again sends nothing twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ingest_stream.config import Settings
from ingest_stream.core.dlq import DlqEnvelope
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.core.tokenbucket import TokenBucket
from ingest_stream.core.triage import (
    DEFAULT_MAX_REDRIVES,
    DeadLetter,
    Selection,
    Status,
    StatusEntry,
    Verdict,
    fold_statuses,
    redrive_message,
    redrive_verdict,
)
from ingest_stream.ops.kafka_io import ToolError, ensure_topic, scan
from ingest_stream.ops.output import format_table, write_json

log = logging.getLogger(__name__)
MARK_EVERY = 500  # dead letters sent between status checkpoints


class DeadLetterStore:
    """The DLQ topic and its status topic."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.kafka_bootstrap
        self.topic = settings.dlq_topic
        self.status_topic = f"{settings.dlq_topic}.status"
        self.unreadable = 0  # records in the DLQ topic without valid dlq.* headers
        self.repeats = 0  # copies of a failure already seen (redelivery after a crash)

    async def statuses(self) -> dict[str, StatusEntry]:
        return fold_statuses([(r.key, r.value) async for r in scan(self.bootstrap, self.status_topic)
                              if r.key is not None])

    async def letters(self) -> AsyncIterator[DeadLetter]:
        """Each failure once: a worker killed after publishing a dead letter but before committing
        publishes it again on redelivery; the later copies are counted in `repeats`, not shown."""
        self.unreadable = self.repeats = 0
        seen: set[tuple[object, ...]] = set()
        async for record in scan(self.bootstrap, self.topic):
            headers = tuple((k, bytes(v)) for k, v in record.headers)
            try:
                envelope = DlqEnvelope.from_headers(headers)
            except (KeyError, ValueError):
                self.unreadable += 1
                continue
            letter = DeadLetter(record.partition, record.offset, record.key, record.value, headers, envelope)
            if letter.failure in seen:
                self.repeats += 1
                continue
            seen.add(letter.failure)
            yield letter

    async def selected(self, selection: Selection) -> AsyncIterator[tuple[DeadLetter, Status]]:
        statuses = await self.statuses()
        async for letter in self.letters():
            entry = statuses.get(letter.id)
            status = entry.status if entry else Status.OPEN
            if selection.matches(letter, status):
                yield letter, status

    async def open_producer(self) -> AIOKafkaProducer:
        await ensure_topic(self.bootstrap, self.status_topic, configs={"cleanup.policy": "compact"})
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        return producer


# --- summary / sample ---------------------------------------------------------------------------
async def summary(store: DeadLetterStore, selection: Selection) -> dict[str, Any]:
    groups: Counter[tuple[str, str, str]] = Counter()
    statuses: Counter[str] = Counter()
    retryable = 0
    oldest: datetime | None = None
    newest: datetime | None = None
    async for letter, status in store.selected(selection):
        e = letter.envelope
        groups[(e.reason.value, e.tenant or "-", e.stage.value)] += 1
        statuses[status.value] += 1
        retryable += e.retryable
        oldest = min(oldest or e.failed_at, e.failed_at)
        newest = max(newest or e.failed_at, e.failed_at)
    total = sum(groups.values())
    return {
        "topic": store.topic,
        "total": total,
        "retryable_share": round(retryable / total, 4) if total else 0.0,
        "oldest": format_rfc3339(oldest) if oldest else None,
        "newest": format_rfc3339(newest) if newest else None,
        "by_status": dict(statuses),
        "groups": [{"reason": r, "tenant": t, "stage": s, "count": n}
                   for (r, t, s), n in sorted(groups.items(), key=lambda item: (-item[1], item[0]))],
        "unreadable": store.unreadable,
        "repeats": store.repeats,
    }


async def sample(store: DeadLetterStore, selection: Selection, *, limit: int, full: bool
                 ) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    async for letter, status in store.selected(selection):
        value = (letter.value or b"").decode("utf-8", "replace")
        if not full and len(value) > 500:
            value = value[:500] + f"... ({len(letter.value or b'')} bytes)"
        headers = {k: v.decode("utf-8", "replace") for k, v in letter.headers}
        if not full:
            headers = {k: v for k, v in headers.items() if k.startswith(("dlq.", "ingest."))}
        found.append({"id": letter.id, "status": status.value,
                      "key": (letter.key or b"").decode("utf-8", "replace"),
                      "headers": headers, "value": value})
        if len(found) >= limit:
            break
    return found


# --- redrive ------------------------------------------------------------------------------------
@dataclass
class RedriveReport:
    redrive_id: str
    dry_run: bool
    sent: Counter[str] = field(default_factory=Counter)  # by target topic
    parked: int = 0
    not_retryable: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"redrive_id": self.redrive_id, "dry_run": self.dry_run, "sent": sum(self.sent.values()),
                "sent_by_topic": dict(self.sent), "parked": self.parked,
                "skipped_not_retryable": self.not_retryable}


def new_redrive_id(now: datetime) -> str:
    return f"rd-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


async def redrive(
    store: DeadLetterStore,
    selection: Selection,
    *,
    force: bool = False,
    dry_run: bool = False,
    limit: int | None = None,
    rate: float | None = None,
    max_redrives: int = DEFAULT_MAX_REDRIVES,
    progress: Callable[[RedriveReport], None] = lambda report: None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RedriveReport:
    """Send the selected open dead letters back; mark each one redriven (or parked) once its send
    is acknowledged. A crash between the two re-sends at most the last unmarked group, which the
    sinks' revision guard turns into a no-op rewrite of the same revision."""
    report = RedriveReport(new_redrive_id(now()), dry_run)
    bucket = TokenBucket(rate, max(1.0, rate)) if rate else None
    producer = None if dry_run else await store.open_producer()
    deliveries: list[Awaitable[object]] = []
    marks: list[tuple[str, StatusEntry]] = []

    async def checkpoint() -> None:
        if producer is None:
            return
        await asyncio.gather(*deliveries)
        deliveries.clear()
        acks = [await producer.send(store.status_topic, key=letter_id.encode(), value=entry.encode())
                for letter_id, entry in marks]
        await asyncio.gather(*acks)
        marks.clear()
        progress(report)

    try:
        async for letter, _status in store.selected(selection):
            verdict = redrive_verdict(letter, force=force, max_redrives=max_redrives)
            at = format_rfc3339(now())
            if verdict is Verdict.NOT_RETRYABLE:
                report.not_retryable += 1
                continue
            if verdict is Verdict.PARK:
                report.parked += 1
                marks.append((letter.id, StatusEntry(Status.PARKED, at, report.redrive_id,
                                                     f"redriven {letter.redrives} times")))
            else:
                message = redrive_message(letter, report.redrive_id)
                report.sent[message.topic] += 1
                if producer is not None:
                    if bucket is not None:
                        await asyncio.sleep(bucket.reserve(time.monotonic()))
                    deliveries.append(await producer.send(message.topic, key=message.key,
                                                          value=message.value, headers=message.headers))
                    marks.append((letter.id, StatusEntry(Status.REDRIVEN, at, report.redrive_id)))
            if len(marks) >= MARK_EVERY:
                await checkpoint()
            if limit is not None and sum(report.sent.values()) >= limit:
                break
        await checkpoint()
    finally:
        if producer is not None:
            await producer.stop()
    return report


# --- command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlqtriage",
                                     description="Triage and redrive the dead-letter topic.")
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
    redrive_cmd = command("redrive", "send dead letters back to where they failed")
    redrive_cmd.add_argument("--limit", type=int, help="at most this many")
    redrive_cmd.add_argument("--dry-run", action="store_true", help="say what would be sent, send nothing")
    redrive_cmd.add_argument("--force", action="store_true", help="also non-retryable reasons")
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


async def run(args: argparse.Namespace, out: TextIO) -> int:
    settings = Settings.from_env()
    store = DeadLetterStore(settings)
    selection = selection_from(args, datetime.now(UTC))
    if args.command == "summary":
        result = await summary(store, selection)
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
    if args.command == "sample":
        letters = await sample(store, selection, limit=args.limit, full=args.full)
        if args.json:
            write_json(letters, out)
            return 0
        for letter in letters:
            print(f"--- {letter['id']} [{letter['status']}] key={letter['key']}", file=out)
            for name, value in letter["headers"].items():
                print(f"  {name}: {value}", file=out)
            print(f"  value: {letter['value']}", file=out)
        if not letters:
            print("no dead letters match", file=out)
        return 0
    show = _progress_printer(sys.stderr) if sys.stderr.isatty() and not args.json else (lambda r: None)
    report = await redrive(store, selection, force=args.force, dry_run=args.dry_run, limit=args.limit,
                           rate=args.rate, max_redrives=args.max_redrives, progress=show)
    result = report.as_dict()
    if args.json:
        write_json(result, out)
    else:
        verb = "would send" if report.dry_run else "sent"
        print(f"\n{report.redrive_id}: {verb} {result['sent']}, parked {report.parked}, "
              f"skipped {report.not_retryable} not retryable (use --force)", file=out)
        for topic, count in sorted(report.sent.items()):
            print(f"  {topic}: {count}", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run(args, sys.stdout))
    except (ToolError, KafkaError, OSError) as error:
        print(f"dlqtriage: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndlqtriage: interrupted; statuses of what was acknowledged are saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
