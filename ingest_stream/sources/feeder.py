"""Feeding a file's lines to a source topic, resumably: the one piece S3 and SFTP share.

A file's checkpoint (version, size, lines handled, done) is saved after every group of lines once
Kafka acknowledged them, in the compacted topic `<prefix>.adapter.checkpoints`. A restart reads
the file again from the line after the checkpoint: nothing is skipped, and at most one group
(`INGEST_SOURCE_CHECKPOINT_EVERY` lines) is sent twice, which dedupe drops. A file whose content
changed (another ETag, size or mtime) is read again from its first line.

Every line ends in the sinks or in the DLQ, and no line or file stops the others (core/files.py
decides what is sent):
- Every line carries its file, line number and location's tenant (`ingest.adapter.*`). A line
  naming another tenant is sent flagged, and the processing stage dead-letters it (VALIDATION_FAIL)
  instead of writing it as that tenant's entity; a redrive of the letter is rejected again, by
  the same header. Logged with the file name and line number and counted in
  `ingest_adapter_errors_total{source, reason="tenant_mismatch"}`.
- A line longer than `INGEST_MAX_RECORD_BYTES` is never held whole in memory nor sent: an empty
  value flagged with its size stands for it and is dead-lettered the same way
  (`reason="line_too_large"`); the line stays in its file.
- A file whose content cannot be read on (a corrupt gzip stream, or more than
  `INGEST_SOURCE_MAX_FILE_BYTES` inflated) is given up at that version (`file_corrupt`,
  `file_too_large`), its checkpoint marked failed; a new version is read from the start.
- Any other error reading a file (`file_error`) is logged with its name and the file is tried again
  at the next poll; the other files go on (`skip`). Only Kafka failing (`ProduceFailed`) stops a
  poll: no file can go on without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ingest_stream.core.files import (
    ADAPTER_FILE_HEADER,
    ADAPTER_LINE_HEADER,
    ADAPTER_TENANT_HEADER,
    ContentError,
    FileCheckpoint,
    Outgoing,
    Plan,
    admit_line,
    plan_for,
    read_lines,
)
from ingest_stream.core.timefmt import format_rfc3339

log = logging.getLogger(__name__)

Send = Callable[[bytes | None, bytes, list[tuple[str, bytes]]], Awaitable[Awaitable[Any]]]
Chunks = Callable[[], AsyncGenerator[bytes, None]]
FILE_ERROR = "file_error"
DEFAULT_MAX_FILE_BYTES = 4 * 2**30


class ProduceFailed(Exception):
    """Kafka refused a line or a checkpoint, or did not acknowledge it: not the file's fault."""


class CheckpointStore:
    """Checkpoints by file name; loaded once, written through `save` (a compacted topic)."""

    def __init__(self, loaded: dict[str, bytes], save: Callable[[str, bytes], Awaitable[None]]) -> None:
        self._checkpoints: dict[str, FileCheckpoint] = {}
        for name, raw in loaded.items():
            try:
                self._checkpoints[name] = FileCheckpoint.decode(raw)
            except (ValueError, TypeError) as error:  # the file is read again; dedupe drops repeats
                log.warning("checkpoint of %s unreadable, ignored: %s", name, error)
        self._save = save

    def get(self, name: str) -> FileCheckpoint | None:
        return self._checkpoints.get(name)

    async def put(self, name: str, checkpoint: FileCheckpoint) -> None:
        await self._save(name, checkpoint.encode())
        self._checkpoints[name] = checkpoint

    def __len__(self) -> int:
        return len(self._checkpoints)


@dataclass
class FeedResult:
    sent: int = 0
    skipped: bool = False
    restarted: bool = False
    flagged: Counter[str] = field(default_factory=Counter)  # lines sent to be dead-lettered, by reason
    failed: str | None = None  # the ContentError's reason when the file was given up


@dataclass
class FileFeeder:
    send: Send
    checkpoints: CheckpointStore
    every: int = 500
    counted: Callable[[int], None] = field(default=lambda n: None)
    max_record_bytes: int = 1_048_576
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    errors: Callable[[str], None] = field(default=lambda reason: None)  # a refused line, a failed file
    last_error: str | None = None

    async def feed(self, name: str, *, tenant: str, version: str, size: int, chunks: Chunks,
                   gzipped: bool) -> FeedResult:
        """Send the file's lines not yet handled; checkpoint as they are acknowledged. Raises
        `ProduceFailed` when Kafka fails; what the reading raises, as it is."""
        plan, start = plan_for(self.checkpoints.get(name), version=version, size=size)
        if plan is Plan.SKIP:
            return FeedResult(skipped=True)
        if plan is Plan.RESTART:
            log.warning("%s was replaced: reading it again from the start", name)
        result = FeedResult(restarted=plan is Plan.RESTART)
        deliveries: list[Awaitable[Any]] = []
        number = 0
        try:
            async with aclosing(chunks()) as source, aclosing(read_lines(
                    source, gzipped=gzipped, max_line_bytes=self.max_record_bytes,
                    max_file_bytes=self.max_file_bytes)) as lines:
                async for line in lines:
                    number += 1
                    if number <= start or (isinstance(line, bytes) and not line.strip()):
                        continue
                    verdict = admit_line(line, tenant=tenant)
                    if verdict.flagged is not None:
                        self._flag(name, number, verdict, result)
                    headers = [(ADAPTER_FILE_HEADER, name.encode()),
                               (ADAPTER_LINE_HEADER, str(number).encode()),
                               (ADAPTER_TENANT_HEADER, tenant.encode()), *verdict.headers]
                    deliveries.append(await self._send(verdict.key, verdict.value, headers))
                    if len(deliveries) >= self.every:
                        partial = FileCheckpoint(version, size, number)
                        await self._checkpoint(name, deliveries, partial, result)
        except ContentError as error:
            await self._give_up(name, deliveries, FileCheckpoint(
                version, size, number, done=True, failed=error.reason), error, result)
            return result
        await self._checkpoint(name, deliveries, FileCheckpoint(version, size, number, done=True), result)
        if result.flagged:
            log.warning("%s: %d line(s) sent, of which %s to be dead-lettered", name, result.sent,
                        dict(result.flagged))
        return result

    async def _send(self, key: bytes | None, line: bytes, headers: list[tuple[str, bytes]]) -> Awaitable[Any]:
        try:
            return await self.send(key, line, headers)
        except Exception as error:
            raise ProduceFailed(f"{type(error).__name__}: {error}") from error

    def _flag(self, name: str, number: int, verdict: Outgoing, result: FeedResult) -> None:
        reason = verdict.flagged or ""
        if not result.flagged[reason]:  # the first of its kind in this file, in full
            log.warning("%s line %d sent to be dead-lettered (%s): %s", name, number, reason, verdict.detail)
        result.flagged[reason] += 1
        self.errors(reason)

    async def _give_up(self, name: str, deliveries: list[Awaitable[Any]], checkpoint: FileCheckpoint,
                       error: ContentError, result: FeedResult) -> None:
        log.error("%s given up after line %d (%s): %s; a new version of it will be read", name,
                  checkpoint.lines, error.reason, error)
        self.errors(error.reason)
        self.last_error = f"{name}: {error}"[:300]
        result.failed = error.reason
        await self._checkpoint(name, deliveries, checkpoint, result)

    async def _checkpoint(self, name: str, deliveries: list[Awaitable[Any]], checkpoint: FileCheckpoint,
                          result: FeedResult) -> None:
        try:
            await asyncio.gather(*deliveries)  # acknowledged by Kafka before the checkpoint moves
            result.sent += len(deliveries)
            self.counted(len(deliveries))
            deliveries.clear()
            await self.checkpoints.put(name, checkpoint)
        except Exception as error:
            raise ProduceFailed(f"{type(error).__name__}: {error}") from error

    def failed(self, name: str, error: BaseException) -> None:
        """Reading the file failed (not its content, not Kafka): logged, counted; tried again at
        the next poll, and the poll goes on with the next file."""
        log.warning("%s skipped until the next poll: %s: %s", name, type(error).__name__, error,
                    exc_info=error)
        self.errors(FILE_ERROR)
        self.last_error = f"{name}: {type(error).__name__}: {error}"[:300]

    async def vanished(self, name: str) -> None:
        """The file went away while listed or read: remember it, done."""
        previous = self.checkpoints.get(name)
        await self._checkpoint(name, [], FileCheckpoint(previous.version if previous else "", 0,
                                                        previous.lines if previous else 0, done=True,
                                                        vanished=True), FeedResult())


def location_health(health: dict[str, Any], name: str) -> dict[str, Any]:
    """One location's entry in its source's health (`/health/detailed` `.adapters[name]`), stamped
    with this poll's time."""
    entry: dict[str, Any] = health.setdefault("locations", {}).setdefault(
        name, {"last_poll_at": None, "last_error": None, "backlog_files": None})
    entry["last_poll_at"] = format_rfc3339(datetime.now(UTC))
    return entry
