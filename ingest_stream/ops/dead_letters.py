"""The dead-letter topic and what operators do with it: summarize, sample, analyze, export, purge
(archive first), redrive. `dlqtriage` is the command line over this module.

The DLQ topic is append-only; each dead letter's status (open / redriven / parked / purged) is kept
in a compacted companion topic `<dlq>.status`, keyed by the letter's `partition:offset`. Statuses
survive restarts and are shared by every operator, and a redrive marks what it sent, so running it
again sends nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import hashlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from ingest_stream.config import MESSAGE_ENVELOPE_BYTES, SOURCES, Settings
from ingest_stream.core.dlq import RECORD_OVERHEAD_BYTES, DlqEnvelope, Position
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.core.tokenbucket import TokenBucket
from ingest_stream.core.triage import (
    DEFAULT_MAX_REDRIVES,
    EXPORT_COLUMNS,
    DeadLetter,
    Manifest,
    RedriveDecision,
    RedrivePolicy,
    RedriveTargets,
    Selection,
    Status,
    StatusEntry,
    Verdict,
    describe,
    export_row,
    fold_statuses,
    letter_document,
    original_problem,
    redrive_message,
    redrive_verdict,
    summarize,
    truncation_of,
)
from ingest_stream.ops.kafka_io import FETCH_WAIT_MS, ToolError, ensure_topic, scan
from ingest_stream.ops.output import json_text

log = logging.getLogger(__name__)
MARK_EVERY = 500  # dead letters sent between status checkpoints
READ_WAIT_S = 5.0  # how long re-reading a truncated letter's original waits for its record
SAMPLE_CHARS = 500  # of a value, without --full
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)


class DeadLetterStore:
    """The DLQ topic and its status topic."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.kafka_bootstrap
        self.topic = settings.dlq_topic
        self.status_topic = settings.dlq_status_topic
        # Where a redrive may write: nowhere else, whatever a letter's headers say.
        self.targets = RedriveTargets(
            sources=frozenset(settings.source_topic(s) for s in SOURCES),
            sinks={s: settings.sink_topic(s) for s in settings.sinks})
        # As the worker's producer (stream/app.py): a redrive can send what the pipeline itself can.
        self.max_send_bytes = settings.max_message_bytes + RECORD_OVERHEAD_BYTES
        self.unreadable = 0  # records in the DLQ topic without valid dlq.* headers
        self.repeats = 0  # copies of a failure already seen (redelivery after a crash)

    async def statuses(self) -> dict[str, StatusEntry]:
        return fold_statuses([(r.key, r.value) async for r in scan(self.bootstrap, self.status_topic)
                              if r.key is not None])

    async def letters(self) -> AsyncGenerator[DeadLetter, None]:
        """Each failure once (`DeadLetter.failure`): a worker killed after publishing a dead letter,
        or after its fan-out, but before committing publishes it again on redelivery; the later
        copies are counted in `repeats`, not shown (nor selected: the first copy stands for all)."""
        self.unreadable = self.repeats = 0
        seen: set[tuple[object, ...]] = set()
        async with contextlib.aclosing(scan(self.bootstrap, self.topic)) as records:
            async for record in records:
                # A header value can be null on the wire: read as empty.
                headers = tuple((k, bytes(v) if v is not None else b"") for k, v in record.headers)
                try:
                    envelope = DlqEnvelope.from_headers(headers)
                except (KeyError, ValueError):
                    self.unreadable += 1
                    continue
                letter = DeadLetter(record.partition, record.offset, record.key, record.value, headers,
                                    envelope)
                if letter.failure in seen:
                    self.repeats += 1
                    continue
                seen.add(letter.failure)
                yield letter

    async def selected(self, selection: Selection) -> AsyncGenerator[tuple[DeadLetter, Status], None]:
        statuses = await self.statuses()
        async with contextlib.aclosing(self.letters()) as letters:
            async for letter in letters:
                entry = statuses.get(letter.id)
                status = entry.status if entry else Status.OPEN
                if selection.matches(letter, status):
                    yield letter, status

    async def read_value(self, position: Position, *, max_bytes: int) -> bytes | None:
        """The value of the record at `position`, or None when no record is there any more (the
        topic's retention or compaction removed it, or there never was one)."""
        fetch_bytes = max(max_bytes, 1 << 20)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    group_id=None, auto_offset_reset="latest",  # out of range: none
                                    max_partition_fetch_bytes=fetch_bytes,
                                    fetch_max_bytes=max(fetch_bytes, 50 << 20))
        tp = TopicPartition(position.topic, position.partition)
        try:
            await consumer.start()
            if position.topic not in await consumer.topics() or position.partition not in (
                    consumer.partitions_for_topic(position.topic) or ()):
                return None
            consumer.assign([tp])
            if position.offset < (await consumer.beginning_offsets([tp]))[tp]:
                return None
            consumer.seek(tp, position.offset)
            deadline = time.monotonic() + READ_WAIT_S
            while time.monotonic() < deadline:
                batches = await consumer.getmany(tp, timeout_ms=FETCH_WAIT_MS, max_records=100)
                for record in batches.get(tp, []):
                    if record.offset >= position.offset:
                        return record.value if record.offset == position.offset else None
            return None
        finally:
            await consumer.stop()

    async def open_producer(self) -> AIOKafkaProducer:
        await ensure_topic(self.bootstrap, self.status_topic, configs={"cleanup.policy": "compact"})
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                    max_request_size=self.max_send_bytes)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer


# --- summary / sample ---------------------------------------------------------------------------
async def summary(store: DeadLetterStore, selection: Selection) -> dict[str, Any]:
    result = summarize([pair async for pair in store.selected(selection)])
    return {"topic": store.topic, **result, "unreadable": store.unreadable, "repeats": store.repeats}


async def sample(store: DeadLetterStore, selection: Selection, *, limit: int, full: bool
                 ) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if limit <= 0:
        return found
    # aclosing: leaving the generators early closes them (and their consumer) now, in this loop,
    # not at garbage collection ("Task was destroyed but it is pending").
    async with contextlib.aclosing(store.selected(selection)) as letters:
        async for letter, status in letters:
            found.append(sample_document(letter, status, full=full))
            if len(found) >= limit:
                break
    return found


def sample_document(letter: DeadLetter, status: Status, *, full: bool) -> dict[str, Any]:
    """A dead letter for reading: key, headers and value as text (bytes that are not UTF-8 shown
    as `\\xff`), the value cut to SAMPLE_CHARS unless `full`, and whether it is truncated."""
    raw = letter.value or b""
    value = raw.decode("utf-8", "backslashreplace")
    if not full and len(value) > SAMPLE_CHARS:
        value = value[:SAMPLE_CHARS] + f"... ({len(raw)} bytes)"
    headers = {k: v.decode("utf-8", "backslashreplace") for k, v in letter.headers}
    if not full:
        headers = {k: v for k, v in headers.items() if k.startswith(("dlq.", "ingest."))}
    try:
        truncation = truncation_of(letter)
    except ValueError as error:
        truncated: dict[str, Any] | None = {"garbled": str(error)}
    else:
        truncated = None if truncation is None else {
            "prefix_bytes": len(raw), "original_bytes": truncation.original_bytes,
            "sha256": truncation.sha256, "original_at": describe(letter.envelope.origin)}
    return {"id": letter.id, "status": status.value,
            "key": (letter.key or b"").decode("utf-8", "backslashreplace"),
            "headers": headers, "value": value, "truncated": truncated}


# --- export / purge -----------------------------------------------------------------------------
async def export(store: DeadLetterStore, selection: Selection, out: TextIO, *, fmt: str) -> int:
    """Stream the selected dead letters as JSONL or CSV; returns how many."""
    count = 0
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, extrasaction="ignore") if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    async for letter, status in store.selected(selection):
        if writer is not None:
            writer.writerow(export_row(letter, status))  # cells a spreadsheet will not evaluate
        else:
            out.write(json_text(letter_document(letter, status)) + "\n")
        count += 1
    return count


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(manifest_path: Path) -> dict[str, Any]:
    """Recompute the archive's SHA-256 and record count against its manifest. The archive is
    looked for in the manifest's directory only: a manifest naming any other file is refused."""
    try:
        manifest = Manifest.parse(manifest_path.read_bytes())
    except ValueError as error:
        raise ToolError(f"{manifest_path}: not a dead-letter archive manifest: {error}") from None
    directory = manifest_path.parent.resolve()
    archive = (directory / manifest.archive).resolve()
    if not archive.is_relative_to(directory):  # a symbolic link out of the directory
        raise ToolError(f"{manifest_path}: archive {str(manifest.archive)!r} leads outside the "
                        "manifest's directory; refused")
    if not archive.is_file():
        raise ToolError(f"{archive}: missing")
    problem = None
    try:
        with gzip.open(archive, "rb") as lines:
            records = sum(1 for line in lines if line.strip())
    except (OSError, EOFError) as error:  # truncated or not gzip at all
        records, problem = -1, f"unreadable: {error}"
    if problem is None and sha256_of(archive) != manifest.sha256:
        problem = "SHA-256 differs from the manifest"
    if problem is None and records != manifest.records:
        problem = f"{records} records, the manifest says {manifest.records}"
    return {"archive": str(archive), "ok": problem is None, "problem": problem, "records": records,
            "expected_records": manifest.records}


async def purge(store: DeadLetterStore, selection: Selection, *, archive_dir: Path, dry_run: bool,
                now: datetime) -> dict[str, Any]:
    """Archive the selected dead letters (JSONL, gzip, SHA-256 manifest), verify the archive, then
    mark them purged. Nothing is marked that is not in a verified archive."""
    stamp = f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    archive = archive_dir / f"dlq-purge-{stamp}.jsonl.gz"
    ids: list[str] = []
    if dry_run:
        ids = [letter.id async for letter, _ in store.selected(selection)]
        return {"dry_run": True, "would_purge": len(ids), "archive": None}
    # Local, sequential file writes from a command-line tool's own loop: blocking is intended.
    archive_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    partial = archive.with_suffix(".partial")
    with gzip.open(partial, "wb") as out:
        async for letter, status in store.selected(selection):
            out.write(orjson.dumps(letter_document(letter, status)) + b"\n")
            ids.append(letter.id)
    if not ids:
        partial.unlink()
        return {"dry_run": False, "purged": 0, "archive": None}
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    partial.rename(archive)
    manifest_path = archive.with_name(archive.name.removesuffix(".jsonl.gz") + ".manifest.json")
    manifest = {"archive": archive.name, "sha256": sha256_of(archive), "records": len(ids),
                "created_at": format_rfc3339(now), "dlq_topic": store.topic, "first_id": ids[0],
                "last_id": ids[-1]}
    manifest_path.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    if not verify_archive(manifest_path)["ok"]:
        raise ToolError(f"{archive}: archive does not verify; nothing marked purged")
    producer = await store.open_producer()
    try:
        at = format_rfc3339(now)
        acks = [await producer.send(store.status_topic, key=letter_id.encode(),
                                    value=StatusEntry(Status.PURGED, at, note=archive.name).encode())
                for letter_id in ids]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return {"dry_run": False, "purged": len(ids), "archive": str(archive), "manifest": str(manifest_path),
            "sha256": manifest["sha256"]}


# --- redrive ------------------------------------------------------------------------------------
REFUSAL_EXAMPLES = 50  # refused letters listed in a report (all are counted)


@dataclass
class RedriveReport:
    redrive_id: str
    dry_run: bool
    sent: Counter[str] = field(default_factory=Counter)  # by target topic
    parked: int = 0
    not_retryable: int = 0
    refused: int = 0  # never sent, --force or not: a target outside this app, a lost original, ...
    refusals: list[dict[str, str]] = field(default_factory=list)  # the first REFUSAL_EXAMPLES

    def refuse(self, letter: DeadLetter, problem: str) -> None:
        self.refused += 1
        if len(self.refusals) < REFUSAL_EXAMPLES:
            self.refusals.append({"id": letter.id, "problem": problem})
        e = letter.envelope
        log.info("redrive %s: not sending dead letter %s (origin %r tenant=%r reason=%s): %s",
                 self.redrive_id, letter.id, describe(e.origin), e.tenant, e.reason.value, problem)

    def unsend(self, topic: str) -> None:
        self.sent[topic] -= 1
        if not self.sent[topic]:
            del self.sent[topic]

    def as_dict(self) -> dict[str, Any]:
        return {"redrive_id": self.redrive_id, "dry_run": self.dry_run, "sent": sum(self.sent.values()),
                "sent_by_topic": dict(self.sent), "parked": self.parked,
                "skipped_not_retryable": self.not_retryable, "refused": self.refused,
                "refusals": self.refusals}


def new_redrive_id(now: datetime) -> str:
    return f"rd-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class _Send:
    letter: DeadLetter
    topic: str
    mark: StatusEntry
    delivery: Awaitable[object]


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
    sinks' revision guard turns into a no-op rewrite of the same revision.

    Only to this app's source and sink topics (`redrive_verdict`); a truncated letter's prefix is
    never sent: its original is re-read, checked and sent, or the letter is refused. A refused
    letter stays open, and is counted and listed in the report."""
    report = RedriveReport(new_redrive_id(now()), dry_run)
    policy = RedrivePolicy(store.targets, force=force, max_redrives=max_redrives,
                           max_value_bytes=store.max_send_bytes)
    bucket = TokenBucket(rate, max(1.0, rate)) if rate else None
    producer = None if dry_run else await store.open_producer()
    sends: list[_Send] = []
    marks: list[tuple[str, StatusEntry]] = []

    async def checkpoint() -> None:
        if producer is None:
            return
        results = await asyncio.gather(*(send.delivery for send in sends), return_exceptions=True)
        failure: BaseException | None = None
        for send, result in zip(sends, results, strict=True):
            if isinstance(result, TOO_LARGE):  # this record only: refused, the rest goes on
                report.unsend(send.topic)
                report.refuse(send.letter, f"{send.topic} refused it as too large: {result}")
            elif isinstance(result, BaseException):
                failure = failure or result
            else:
                marks.append((send.letter.id, send.mark))
        sends.clear()
        acks = [await producer.send(store.status_topic, key=letter_id.encode(), value=entry.encode())
                for letter_id, entry in marks]
        await asyncio.gather(*acks)
        marks.clear()
        progress(report)
        if failure is not None:  # the broker or the network: stop, what was acknowledged is marked
            raise failure

    try:
        async for letter, _status in store.selected(selection):
            decision = redrive_verdict(letter, policy)
            at = format_rfc3339(now())
            if decision.verdict is Verdict.NOT_RETRYABLE:
                report.not_retryable += 1
                continue
            if decision.verdict is Verdict.PARK:
                report.parked += 1
                marks.append((letter.id, StatusEntry(Status.PARKED, at, report.redrive_id,
                                                     f"redriven {letter.redrives} times")))
            elif decision.verdict is Verdict.REFUSED or decision.topic is None:
                report.refuse(letter, decision.problem or "no target topic")
                continue
            else:
                original, problem = await _original(store, decision)
                if problem is not None:
                    report.refuse(letter, problem)
                    continue
                message = redrive_message(letter, report.redrive_id, decision.topic, original=original)
                if producer is not None:
                    if bucket is not None:
                        await asyncio.sleep(bucket.reserve(time.monotonic()))
                    try:
                        delivery = await producer.send(message.topic, key=message.key,
                                                       value=message.value, headers=message.headers)
                    except TOO_LARGE as error:
                        report.refuse(letter, f"too large to send: {error}")
                        continue
                    sends.append(_Send(letter, message.topic,
                                       StatusEntry(Status.REDRIVEN, at, report.redrive_id), delivery))
                report.sent[message.topic] += 1
            if len(marks) + len(sends) >= MARK_EVERY:
                await checkpoint()
            if limit is not None and sum(report.sent.values()) >= limit:
                break
        await checkpoint()
    finally:
        if producer is not None:
            await producer.stop()
    return report


async def _original(store: DeadLetterStore, decision: RedriveDecision) -> tuple[bytes | None, str | None]:
    """For a truncated letter, its whole original re-read and checked (value, None), or why not
    (None, problem); (None, None) for a letter whose value is whole."""
    truncation = decision.truncation
    if truncation is None:
        return None, None
    problems = []
    for position in decision.original_at:
        value = await store.read_value(position, max_bytes=truncation.original_bytes + MESSAGE_ENVELOPE_BYTES)
        problem = original_problem(truncation, position, value)
        if problem is None:
            return value, None
        problems.append(problem)
    return None, "truncated letter: " + "; ".join(problems)
