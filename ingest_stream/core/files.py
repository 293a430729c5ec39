"""File-like sources (S3 objects, SFTP files) read as lines, resumably. Pure: what to do with a
file given its checkpoint, turning byte chunks into lines (gzip included, every member), and what
to do with each line.

No file's content can stop a poll or another file:
- a line longer than the record limit (`INGEST_MAX_RECORD_BYTES`) is never held whole nor sent: it
  comes out as `LongLine` (its size only), and an empty record stands for it, flagged with its size
  (`ingest.adapter.line_bytes`), which the processing stage dead-letters (core/admission.py);
- every line carries its location's tenant (`ingest.adapter.tenant`): a record naming another
  tenant is dead-lettered by the processing stage, never written as that tenant's entity;
- content that cannot be read on (a corrupt or truncated gzip stream, or more than
  `INGEST_SOURCE_MAX_FILE_BYTES` once inflated: a gzip bomb) raises a `ContentError`: the file
  is given up at that version, the lines before it stay sent.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, TypeVar

import orjson

from ingest_stream.core.dlq import KEY_LIMIT_BYTES
from ingest_stream.core.record import entity_key

INFLATE_PIECE_BYTES = 256 * 1024  # gunzipped at most this much at a time, whatever a chunk holds


@dataclass(frozen=True, slots=True)
class FileCheckpoint:
    version: str  # S3 ETag, or SFTP size:mtime — changes when the content does
    size: int
    lines: int  # lines already handled (sent, refused or blank)
    done: bool = False
    vanished: bool = False
    failed: str | None = None  # given up at this version: the ContentError's reason

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> FileCheckpoint:
        """Fields this version does not know (written by a newer one) are ignored."""
        data: dict[str, Any] = orjson.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Plan(StrEnum):
    SKIP = "skip"  # done and unchanged
    READ = "read"  # from the checkpoint's line (0 for a new file)
    RESTART = "restart"  # replaced: from line 0 again


def plan_for(checkpoint: FileCheckpoint | None, *, version: str, size: int) -> tuple[Plan, int]:
    """What to do with a file now: skip it, or read it from which line.

    The checkpoint's lines apply only to the content they were counted in: the same version and
    size (an S3 ETag; SFTP's size:mtime). Any other content is a replacement, even a larger one (an
    append cannot be told from a rewrite by these): it is read from the start, and dedupe drops
    the records sent before.
    """
    if checkpoint is None:
        return Plan.READ, 0
    if checkpoint.version == version and checkpoint.size == size:
        return (Plan.SKIP, checkpoint.lines) if checkpoint.done else (Plan.READ, checkpoint.lines)
    return Plan.RESTART, 0


class ContentError(ValueError):
    """The file's content cannot be read on; reading it again fails the same way. `reason` is
    its metric label."""

    reason = "file_unreadable"


class CorruptFile(ContentError):
    reason = "file_corrupt"


class FileTooLarge(ContentError):
    reason = "file_too_large"


class Inflater:
    """Gunzip, every member: a gzip file may be several members end to end (`cat a.gz b.gz`, or
    appended writes), read as one stream, with zero padding between or after them allowed (as
    Python's gzip module does). Output comes in pieces of at most `piece` bytes, so a small chunk
    of a gzip bomb never inflates all at once."""

    def __init__(self, piece: int = INFLATE_PIECE_BYTES) -> None:
        self._piece = piece
        self._member = zlib.decompressobj(wbits=31)
        self._in_member = False  # bytes of the current member were fed

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            if not self._in_member:
                data = data.lstrip(b"\0")
                if not data:
                    return
                self._in_member = True
            try:
                out = self._member.decompress(data, self._piece)
            except zlib.error as error:
                raise CorruptFile(f"gzip: {error}") from None
            data = self._member.unconsumed_tail
            if out:
                yield out
            if self._member.eof:  # the next member, if anything follows
                data = self._member.unused_data  # holds the unconsumed rest at the end
                self._member, self._in_member = zlib.decompressobj(wbits=31), False
            elif not data and len(out) < self._piece:
                return  # all taken, nothing held back

    def finish(self) -> None:
        if self._in_member:
            raise CorruptFile("gzip: truncated (the last member has no end)")


@dataclass(frozen=True, slots=True)
class LongLine:
    """A line over the limit: measured, not kept."""

    size: int


@dataclass(slots=True)
class LineSplitter:
    """Bytes in, lines out (without the newline, `\r` stripped). Blank lines come out too (empty),
    so a line's number is the same on every read; the caller skips them. A line over `limit` is
    not held: it comes out as `LongLine`."""

    limit: int
    _parts: list[bytes] = field(default_factory=list)
    _size: int = 0

    def feed(self, data: bytes) -> list[bytes | LongLine]:
        *complete, rest = data.split(b"\n")
        lines = []
        for piece in complete:
            self._add(piece)
            lines.append(self._take())
        self._add(rest)
        return lines

    def finish(self) -> list[bytes | LongLine]:
        return [self._take()] if self._size else []

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size <= self.limit + 1:  # + 1: a "\r" before the newline
            self._parts.append(piece)
        else:
            self._parts.clear()

    def _take(self) -> bytes | LongLine:
        line = b"".join(self._parts).rstrip(b"\r")
        size, self._size = self._size, 0
        self._parts.clear()
        return line if len(line) <= self.limit and size <= self.limit + 1 else LongLine(size)


async def read_lines(chunks: AsyncIterator[bytes], *, gzipped: bool, max_line_bytes: int,
                     max_file_bytes: int) -> AsyncGenerator[bytes | LongLine, None]:
    """The lines of a byte stream, gunzipped on the fly if asked (every member). Raises
    `FileTooLarge` past `max_file_bytes` of content (inflated), `CorruptFile` on a bad gzip stream."""
    splitter = LineSplitter(max_line_bytes)
    inflater = Inflater() if gzipped else None
    total = 0
    async for chunk in chunks:
        for data in inflater.feed(chunk) if inflater else (chunk,):
            total += len(data)
            if total > max_file_bytes:
                raise FileTooLarge(f"over {max_file_bytes} bytes" + (" once inflated" if gzipped else ""))
            for line in splitter.feed(data):
                yield line
    if inflater:
        inflater.finish()
    for line in splitter.finish():
        yield line


# Headers the adapters set on every line they send (core/admission.py reads the last two).
ADAPTER_FILE_HEADER = "ingest.adapter.file"
ADAPTER_LINE_HEADER = "ingest.adapter.line"
ADAPTER_TENANT_HEADER = "ingest.adapter.tenant"  # the location's tenant
ADAPTER_LINE_BYTES_HEADER = "ingest.adapter.line_bytes"  # only on the stand-in for a line too long


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A line to send, with its Kafka key (`tenant:id`, or None: the partitioner's). `flagged`:
    why the processing stage will dead-letter it (the adapter's metric label), if it will."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    flagged: str | None = None  # "tenant_mismatch" or "line_too_large"
    detail: str = ""


def admit_line(line: bytes | LongLine, *, tenant: str) -> Outgoing:
    """What is sent for a (non-blank) line of a location of `tenant`, and under which key.

    Every line ends in the sinks or in the DLQ: it is sent as it is, and the processing stage
    judges it (orjson reads it there too, so a record's tenant is the same for both). A record
    naming another tenant goes too, flagged: the stage dead-letters it by the location's tenant
    the feeder adds to every line. A line too long to send is replaced by an empty value flagged
    with its size, which the stage dead-letters (the line itself stays in its file).
    """
    if isinstance(line, LongLine):
        return Outgoing(None, b"", ((ADAPTER_LINE_BYTES_HEADER, str(line.size).encode()),),
                        "line_too_large", f"{line.size} bytes, over the record limit")
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError:
        return Outgoing(None, line)
    if not isinstance(document, dict):
        return Outgoing(None, line)
    named = document.get("tenant", tenant)
    if named != tenant:
        return Outgoing(None, line, (), "tenant_mismatch",
                        f"names tenant {str(named)[:80]!r}, the location is {tenant!r}")
    record_id = document.get("id")
    if not isinstance(record_id, str) or "tenant" not in document:
        return Outgoing(None, line)
    key = entity_key(tenant, record_id).encode()
    return Outgoing(key if len(key) <= KEY_LIMIT_BYTES else None, line)


@dataclass(frozen=True, slots=True)
class S3Location:
    tenant: str
    bucket: str
    prefix: str = ""
    name: str = ""  # how operators call it (/health/detailed .adapters["s3-main"]); see default_name

    @property
    def label(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def default_name(kind: str, index: int) -> str:
    """A location's name when the settings give none: `<kind>-main` for the first, then
    `<kind>-2`, `<kind>-3`, … (the operators' runbook calls the usual one `s3-main`)."""
    return f"{kind}-main" if index == 0 else f"{kind}-{index + 1}"


def parse_locations(raw: str) -> list[S3Location]:
    """`INGEST_S3_SOURCES`: a JSON list of {"name"?, "tenant", "bucket", "prefix"}."""
    if not raw.strip():
        return []
    data = orjson.loads(raw)
    if not isinstance(data, list):
        raise ValueError("a JSON list of {name, tenant, bucket, prefix}")
    return _named([S3Location(d["tenant"], d["bucket"], d.get("prefix", ""), d.get("name") or "")
                   for d in data], "s3")


LocationT = TypeVar("LocationT", "S3Location", "SftpLocation")


def _named(locations: list[LocationT], kind: str) -> list[LocationT]:
    named = [location if location.name else replace(location, name=default_name(kind, index))
             for index, location in enumerate(locations)]
    names = [location.name for location in named]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise ValueError(f"two locations are named {duplicate!r}")
    return named


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
    name: str = ""  # how operators call it (/health/detailed .adapters["sftp-main"]); default_name

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
    locations = _named([SftpLocation(**entry) for entry in data], "sftp")
    for location in locations:
        if location.complete not in ("stable", "marker"):
            raise ValueError(f"{location.label}: complete is 'stable' or 'marker'")
    return locations
