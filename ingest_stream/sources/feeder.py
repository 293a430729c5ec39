"""Feeding a file's lines to a source topic, resumably: the one piece S3 and SFTP share.

A file's checkpoint (version, size, lines sent, done) is saved after every group of lines once
Kafka acknowledged them, in the compacted topic `<prefix>.adapter.checkpoints`. A restart reads
the file again from the line after the checkpoint: nothing is skipped, and at most one group
(`INGEST_SOURCE_CHECKPOINT_EVERY` lines) is sent twice, which dedupe drops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ingest_stream.core.files import FileCheckpoint, Plan, plan_for, read_lines
from ingest_stream.core.record import record_key

log = logging.getLogger(__name__)

Send = Callable[[bytes | None, bytes, list[tuple[str, bytes]]], Awaitable[Awaitable[Any]]]
FILE_HEADER = "ingest.adapter.file"
LINE_HEADER = "ingest.adapter.line"


class CheckpointStore:
    """Checkpoints by file name; loaded once, written through `save` (a compacted topic)."""

    def __init__(self, loaded: dict[str, bytes], save: Callable[[str, bytes], Awaitable[None]]) -> None:
        self._checkpoints = {name: FileCheckpoint.decode(raw) for name, raw in loaded.items()}
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


@dataclass
class FileFeeder:
    send: Send
    checkpoints: CheckpointStore
    every: int = 500
    counted: Callable[[int], None] = field(default=lambda n: None)

    async def feed(self, name: str, *, version: str, size: int,
                   chunks: Callable[[], AsyncIterator[bytes]], gzipped: bool) -> FeedResult:
        """Send the file's lines not yet sent; checkpoint as they are acknowledged."""
        plan, start = plan_for(self.checkpoints.get(name), version=version, size=size)
        if plan is Plan.SKIP:
            return FeedResult(skipped=True)
        if plan is Plan.RESTART:
            log.warning("%s shrank or was replaced: reading it again from the start", name)
        result = FeedResult(restarted=plan is Plan.RESTART)
        deliveries: list[Awaitable[Any]] = []
        number = 0
        async for line in read_lines(chunks(), gzipped=gzipped):
            number += 1
            if number <= start or not line.strip():
                continue
            headers = [(FILE_HEADER, name.encode()), (LINE_HEADER, str(number).encode())]
            deliveries.append(await self.send(record_key(line), line, headers))
            if len(deliveries) >= self.every:
                await self._checkpoint(name, deliveries, FileCheckpoint(version, size, number), result)
        await self._checkpoint(name, deliveries, FileCheckpoint(version, size, number, done=True), result)
        return result

    async def _checkpoint(self, name: str, deliveries: list[Awaitable[Any]], checkpoint: FileCheckpoint,
                          result: FeedResult) -> None:
        await asyncio.gather(*deliveries)  # acknowledged by Kafka before the checkpoint moves
        result.sent += len(deliveries)
        self.counted(len(deliveries))
        deliveries.clear()
        await self.checkpoints.put(name, checkpoint)

    async def vanished(self, name: str) -> None:
        """The file went away while listed or read: remember it, done."""
        previous = self.checkpoints.get(name)
        await self.checkpoints.put(name, FileCheckpoint(previous.version if previous else "", 0,
                                                        previous.lines if previous else 0, done=True,
                                                        vanished=True))
