"""The dead-letter topic and what operators do with it: summarize, sample, analyze, export, purge
(archive first), redrive. `dlqtriage` is the command line over this module.

The DLQ topic is append-only; each dead letter's status (open / redriven / parked / purged) is kept
in a compacted companion topic `<dlq>.status`, keyed by the letter's `partition:offset`. Statuses
survive restarts and are shared by every operator, and a redrive marks what it sent, so running it
again sends nothing twice.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaProducer

from ingest_stream.config import Settings
from ingest_stream.core.dlq import DlqEnvelope
from ingest_stream.core.timefmt import format_rfc3339
from ingest_stream.core.tokenbucket import TokenBucket
from ingest_stream.core.triage import (
    DEFAULT_MAX_REDRIVES,
    EXPORT_COLUMNS,
    DeadLetter,
    Selection,
    Status,
    StatusEntry,
    Verdict,
    fold_statuses,
    letter_document,
    redrive_message,
    redrive_verdict,
    summarize,
)
from ingest_stream.ops.kafka_io import ToolError, ensure_topic, scan

log = logging.getLogger(__name__)
MARK_EVERY = 500  # dead letters sent between status checkpoints


class DeadLetterStore:
    """The DLQ topic and its status topic."""

    def __init__(self, settings: Settings) -> None:
        self.bootstrap = settings.kafka_bootstrap
        self.topic = settings.dlq_topic
        self.status_topic = settings.dlq_status_topic
        self.unreadable = 0  # records in the DLQ topic without valid dlq.* headers
        self.repeats = 0  # copies of a failure already seen (redelivery after a crash)

    async def statuses(self) -> dict[str, StatusEntry]:
        return fold_statuses([(r.key, r.value) async for r in scan(self.bootstrap, self.status_topic)
                              if r.key is not None])

    async def letters(self) -> AsyncIterator[DeadLetter]:
        """Each failure once (`DeadLetter.failure`): a worker killed after publishing a dead letter,
        or after its fan-out, but before committing publishes it again on redelivery; the later
        copies are counted in `repeats`, not shown (nor selected: the first copy stands for all)."""
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


# --- export / purge -----------------------------------------------------------------------------
async def export(store: DeadLetterStore, selection: Selection, out: TextIO, *, fmt: str) -> int:
    """Stream the selected dead letters as JSONL or CSV; returns how many."""
    count = 0
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, extrasaction="ignore") if fmt == "csv" else None
    if writer is not None:
        writer.writeheader()
    async for letter, status in store.selected(selection):
        document = letter_document(letter, status)
        if writer is not None:
            writer.writerow(document)
        else:
            out.write(orjson.dumps(document).decode() + "\n")
        count += 1
    return count


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(manifest_path: Path) -> dict[str, Any]:
    """Recompute the archive's SHA-256 and record count against its manifest."""
    manifest = orjson.loads(manifest_path.read_bytes())
    archive = manifest_path.parent / manifest["archive"]
    if not archive.exists():
        raise ToolError(f"{archive}: missing")
    problem = None
    try:
        with gzip.open(archive, "rb") as lines:
            records = sum(1 for line in lines if line.strip())
    except (OSError, EOFError) as error:  # truncated or not gzip at all
        records, problem = -1, f"unreadable: {error}"
    if problem is None and sha256_of(archive) != manifest["sha256"]:
        problem = "SHA-256 differs from the manifest"
    if problem is None and records != manifest["records"]:
        problem = f"{records} records, the manifest says {manifest['records']}"
    return {"archive": str(archive), "ok": problem is None, "problem": problem, "records": records,
            "expected_records": manifest["records"]}


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


