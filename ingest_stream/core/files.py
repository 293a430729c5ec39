"""File-like sources (S3 objects, SFTP files) read as lines, resumably. Pure: what to do with a
file given its checkpoint, and turning byte chunks into lines (gzip included)."""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import orjson


@dataclass(frozen=True, slots=True)
class FileCheckpoint:
    version: str  # S3 ETag, or SFTP size:mtime — changes when the content does
    size: int
    lines: int  # lines already sent
    done: bool = False
    vanished: bool = False

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> FileCheckpoint:
        return cls(**orjson.loads(raw))


class Plan(StrEnum):
    SKIP = "skip"  # done and unchanged
    READ = "read"  # from the checkpoint's line (0 for a new file)
    RESTART = "restart"  # shrank or was replaced: from line 0 again


def plan_for(checkpoint: FileCheckpoint | None, *, version: str, size: int) -> tuple[Plan, int]:
    """What to do with a file now: skip it, or read it from which line.

    A file whose version changed and grew is taken as appended to: reading continues after the
    lines already sent (JSONL producers append). One that shrank was replaced: read from the start
    (the sinks' revision guard makes the repeats no-ops).
    """
    if checkpoint is None:
        return Plan.READ, 0
    if checkpoint.version == version:
        return (Plan.SKIP, checkpoint.lines) if checkpoint.done else (Plan.READ, checkpoint.lines)
    if size >= checkpoint.size:
        return Plan.READ, checkpoint.lines
    return Plan.RESTART, 0


async def read_lines(chunks: AsyncIterator[bytes], *, gzipped: bool) -> AsyncIterator[bytes]:
    """Lines (without the newline) of a byte stream, gunzipped on the fly if asked. Blank lines
    come out too (empty), so a line's number is the same on every read; the caller skips them."""
    inflate = zlib.decompressobj(wbits=31) if gzipped else None
    pending = b""
    async for chunk in chunks:
        data = inflate.decompress(chunk) if inflate else chunk
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r")
    if inflate:
        pending += inflate.flush()
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r")
    if pending.strip():
        yield pending.rstrip(b"\r")


@dataclass(frozen=True, slots=True)
class S3Location:
    tenant: str
    bucket: str
    prefix: str = ""


def parse_locations(raw: str) -> list[S3Location]:
    """`INGEST_S3_SOURCES`: a JSON list of {"tenant", "bucket", "prefix"}."""
    if not raw.strip():
        return []
    data = orjson.loads(raw)
    if not isinstance(data, list):
        raise ValueError("a JSON list of {tenant, bucket, prefix}")
    return [S3Location(d["tenant"], d["bucket"], d.get("prefix", "")) for d in data]


@dataclass(frozen=True, slots=True)
class SftpLocation:
    tenant: str
    host: str
    path: str
    username: str
    port: int = 22
    password: str | None = field(default=None, repr=False)
    client_key: str | None = None  # path of a private key file
    known_hosts: str | None = None  # path; None: the host key is not checked (logged once)
    complete: str = "stable"  # "stable" (size+mtime unchanged since the last poll) or "marker"
    marker: str = ".done"
    done_dir: str | None = None  # move finished files there (relative to `path`, or absolute)

    @property
    def label(self) -> str:
        return f"sftp://{self.username}@{self.host}:{self.port}{self.path}"


def parse_sftp_locations(raw: str) -> list[SftpLocation]:
    """`INGEST_SFTP_SOURCES`: a JSON list of {tenant, host, port, username, password | client_key,
    path, complete, marker, done_dir, known_hosts}."""
    if not raw.strip():
        return []
    data = orjson.loads(raw)
    if not isinstance(data, list):
        raise ValueError("a JSON list of SFTP locations")
    locations = [SftpLocation(**entry) for entry in data]
    for location in locations:
        if location.complete not in ("stable", "marker"):
            raise ValueError(f"{location.label}: complete is 'stable' or 'marker'")
    return locations
