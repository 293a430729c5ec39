"""SFTP source: poll configured directories (asyncssh), take each JSONL file (gzip when it ends in
.gz) once it is complete — its size and mtime unchanged since the previous poll, or a marker file
`<name><marker>` present — feed it through the feeder, then move it to `done_dir` if configured.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncssh

from ingest_stream.core.files import SftpLocation
from ingest_stream.sources.feeder import FileFeeder

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 * 1024


class SftpSource:
    name = "sftp"

    def __init__(self, locations: Sequence[SftpLocation], feeder: FileFeeder, health: dict[str, Any],
                 seen: dict[str, tuple[int, int]]) -> None:
        self.locations = locations
        self._feeder = feeder
        self._health = health
        self._seen = seen  # name -> (size, mtime) at the previous poll, for "stable" completeness

    async def poll(self) -> None:
        backlog = 0
        for location in self.locations:
            async with asyncssh.connect(
                    location.host, port=location.port, username=location.username, password=location.password,
                    client_keys=[location.client_key] if location.client_key else None,
                    known_hosts=location.known_hosts) as connection, connection.start_sftp_client() as sftp:
                backlog += await self._poll_location(location, sftp)
        self._health["backlog_files"] = backlog

    async def _poll_location(self, location: SftpLocation, sftp: asyncssh.SFTPClient) -> int:
        names: dict[str, Any] = {_text(entry.filename): entry for entry in await sftp.readdir(location.path)
                                 if entry.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR}
        waiting = 0
        for filename in sorted(names):
            if location.complete == "marker" and filename.endswith(location.marker):
                continue
            attrs = names[filename].attrs
            size, mtime = int(attrs.size or 0), int(attrs.mtime or 0)
            path = posixpath.join(location.path, filename)
            name = f"{location.label}/{filename}"
            version = f"{size}:{mtime}"
            before = self._feeder.checkpoints.get(name)
            if before is not None and before.done and before.version == version:
                continue
            if not self._complete(location, filename, names, name, (size, mtime)):
                waiting += 1
                continue
            await self._feed(location, sftp, path, name, version, size)
        return waiting

    def _complete(self, location: SftpLocation, filename: str, names: dict[str, Any], name: str,
                  state: tuple[int, int]) -> bool:
        if location.complete == "marker":
            return filename + location.marker in names
        previous, self._seen[name] = self._seen.get(name), state
        return previous == state

    async def _feed(self, location: SftpLocation, sftp: asyncssh.SFTPClient, path: str, name: str,
                    version: str, size: int) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            async with sftp.open(path, "rb") as handle:
                while chunk := await handle.read(CHUNK_BYTES):
                    yield chunk if isinstance(chunk, bytes) else chunk.encode()

        try:
            result = await self._feeder.feed(name, version=version, size=size, chunks=chunks,
                                             gzipped=path.endswith(".gz"))
        except asyncssh.SFTPNoSuchFile:
            log.warning("%s vanished while being read", name)
            await self._feeder.vanished(name)
            return
        if result.sent:
            log.info("%s: %d line(s) sent", name, result.sent)
        if location.done_dir:
            target_dir = posixpath.join(location.path, location.done_dir)
            if not await sftp.exists(target_dir):
                await sftp.mkdir(target_dir)
            await sftp.rename(path, posixpath.join(target_dir, posixpath.basename(path)))


def _text(name: str | bytes) -> str:
    return name if isinstance(name, str) else name.decode("utf-8", "surrogateescape")
