"""SFTP source: poll configured directories (asyncssh), take each JSONL file (gzip when it ends in
.gz) once it is complete — its size and mtime unchanged since the previous poll, or a marker file
`<name><marker>` present — feed it through the feeder (which enforces the location's tenant,
sources/feeder.py), then move it to `done_dir` if configured.

Names are read as bytes, as the server has them: a name that is not UTF-8 is read like any other
and shown (in logs, headers and its checkpoint) with its odd bytes escaped (`\\xe9`). A file that
cannot be read is logged and skipped until the next poll, a location that cannot be reached
likewise: the others go on. A file changed since it was read (size or mtime) is read from the start.
"""

from __future__ import annotations

import logging
import posixpath
import warnings
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from ingest_stream.core.files import SftpLocation
from ingest_stream.sources.feeder import FileFeeder, ProduceFailed, location_health

# cryptography 51 deprecates DSA and asyncssh 2.24.1 (the newest) names its types at import: a
# warning in every worker's log that no operator can act on. We never offer DSA keys.
warnings.filterwarnings("ignore", message="DSA is deprecated", module="asyncssh")
import asyncssh  # noqa: E402

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 * 1024


class PollIncomplete(Exception):
    """Some locations could not be polled; the others were."""


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
        failed: list[str] = []
        for location in self.locations:
            health = location_health(self._health, location.name)
            try:
                async with asyncssh.connect(
                        location.host, port=location.port, username=location.username,
                        password=location.password,
                        client_keys=[location.client_key] if location.client_key else None,
                        known_hosts=location.known_hosts) as connection, \
                        connection.start_sftp_client() as sftp:
                    waiting = await self._poll_location(location, sftp)
                    backlog += waiting
                    health.update(backlog_files=waiting, last_error=None)
            except ProduceFailed:
                raise
            except Exception as error:  # this location only; the next one is polled
                log.warning("%s (tenant %s) not polled: %s", location.label, location.tenant, error,
                            exc_info=True)
                failed.append(f"{location.label}: {type(error).__name__}: {error}")
                health["last_error"] = f"{type(error).__name__}: {error}"[:300]
        self._health["backlog_files"] = backlog
        if failed:
            raise PollIncomplete("; ".join(failed))

    async def _poll_location(self, location: SftpLocation, sftp: asyncssh.SFTPClient) -> int:
        directory = location.path.encode()
        names: dict[bytes, Any] = {_raw(entry.filename): entry for entry in await sftp.readdir(directory)
                                   if entry.attrs.type == asyncssh.FILEXFER_TYPE_REGULAR}
        marker = location.marker.encode()
        waiting = 0
        for filename in sorted(names):
            if location.complete == "marker" and filename.endswith(marker):
                continue
            attrs = names[filename].attrs
            size, mtime = int(attrs.size or 0), int(attrs.mtime or 0)
            name = f"{location.label}/{shown(filename)}"
            version = f"{size}:{mtime}"
            before = self._feeder.checkpoints.get(name)
            if before is not None and before.done and before.version == version:
                continue
            if not self._complete(location, filename, names, name, (size, mtime)):
                waiting += 1
                continue
            try:
                await self._feed(location, sftp, posixpath.join(directory, filename), name, version, size)
            except ProduceFailed:
                raise
            except (asyncssh.DisconnectError, asyncssh.SFTPConnectionLost):
                raise  # the connection is gone: so is every other file of this location
            except Exception as error:  # this file only; the next one is read
                self._feeder.failed(name, error)
        return waiting

    def _complete(self, location: SftpLocation, filename: bytes, names: dict[bytes, Any], name: str,
                  state: tuple[int, int]) -> bool:
        if location.complete == "marker":
            return filename + location.marker.encode() in names
        previous, self._seen[name] = self._seen.get(name), state
        return previous == state

    async def _feed(self, location: SftpLocation, sftp: asyncssh.SFTPClient, path: bytes, name: str,
                    version: str, size: int) -> None:
        async def chunks() -> AsyncGenerator[bytes, None]:
            async with sftp.open(path, "rb") as handle:
                while chunk := await handle.read(CHUNK_BYTES):
                    yield chunk if isinstance(chunk, bytes) else chunk.encode()

        try:
            result = await self._feeder.feed(name, tenant=location.tenant, version=version, size=size,
                                             chunks=chunks, gzipped=path.endswith(b".gz"))
        except asyncssh.SFTPNoSuchFile:
            log.warning("%s vanished while being read", name)
            await self._feeder.vanished(name)
            return
        if result.sent:
            log.info("%s: %d line(s) sent", name, result.sent)
        if location.done_dir:
            target_dir = posixpath.join(location.path.encode(), location.done_dir.encode())
            if not await sftp.exists(target_dir):
                await sftp.mkdir(target_dir)
            await sftp.rename(path, posixpath.join(target_dir, posixpath.basename(path)))


def shown(filename: bytes) -> str:
    """A file name as text: itself when it is UTF-8, else with its other bytes escaped (`\\xe9`)."""
    return filename.decode("utf-8", "backslashreplace")


def _raw(filename: bytes | str) -> bytes:
    """A name as listed: bytes, since the directory was given as bytes (asyncssh decodes none)."""
    return filename if isinstance(filename, bytes) else filename.encode("utf-8", "surrogateescape")
