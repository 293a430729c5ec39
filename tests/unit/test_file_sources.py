"""The S3/SFTP file sources without servers: the feeder against a fake producer and checkpoint
store, the adapters against fake clients. No record's content, no file, stops the others."""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import asyncssh
import orjson
import pytest
from botocore.exceptions import ClientError

from ingest_stream.config import Settings, SourceSettings
from ingest_stream.core.files import (
    ADAPTER_FILE_HEADER,
    ADAPTER_LINE_BYTES_HEADER,
    ADAPTER_LINE_HEADER,
    ADAPTER_TENANT_HEADER,
    FileCheckpoint,
    SftpLocation,
)
from ingest_stream.sources import s3 as s3_module
from ingest_stream.sources import sftp as sftp_module
from ingest_stream.sources.feeder import CheckpointStore, FileFeeder, ProduceFailed

TENANT = "acme"


def line(record_id: str, tenant: str = TENANT) -> bytes:
    return orjson.dumps({"schema_version": 2, "tenant": tenant, "id": record_id, "revision": 1})


def jsonl(*lines: bytes) -> bytes:
    return b"".join(item + b"\n" for item in lines)


@dataclass
class Sent:
    key: bytes | None
    value: bytes
    file: str
    line: int
    line_bytes: bytes | None = None  # the stand-in for a line too long to send


@dataclass
class Harness:
    """A feeder whose sends and checkpoints land in lists, acknowledged at once unless told."""

    sent: list[Sent] = field(default_factory=list)
    saved: dict[str, FileCheckpoint] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    refuse_sends: bool = False

    def feeder(self, *, every: int = 2, max_record_bytes: int = 200,
               max_file_bytes: int = 10**6) -> FileFeeder:
        async def save(name: str, raw: bytes) -> None:
            self.saved[name] = FileCheckpoint.decode(raw)

        loaded = {name: checkpoint.encode() for name, checkpoint in self.saved.items()}
        return FileFeeder(self.send, CheckpointStore(loaded, save), every=every,
                          max_record_bytes=max_record_bytes, max_file_bytes=max_file_bytes,
                          errors=lambda reason: self.errors.update([reason]))

    async def send(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        delivery = asyncio.get_running_loop().create_future()
        if self.refuse_sends:
            delivery.set_exception(RuntimeError("broker refused"))
            return delivery
        found = dict(headers)
        assert found[ADAPTER_TENANT_HEADER] == TENANT.encode()  # every line carries its location's tenant
        self.sent.append(Sent(key, value, found[ADAPTER_FILE_HEADER].decode(),
                              int(found[ADAPTER_LINE_HEADER]), found.get(ADAPTER_LINE_BYTES_HEADER)))
        delivery.set_result(None)
        return delivery

    def lines(self, name: str) -> list[int]:
        return [s.line for s in self.sent if s.file == name]


def source_of(data: bytes, *, fail_after: int | None = None):
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 7):
            if fail_after is not None and start >= fail_after:
                raise OSError("read failed")
            yield data[start:start + 7]
    return chunks


async def feed(feeder: FileFeeder, name: str, data: bytes, *, version: str = "v1", gzipped: bool = False):
    return await feeder.feed(name, tenant=TENANT, version=version, size=len(data), chunks=source_of(data),
                             gzipped=gzipped)


async def test_another_tenants_lines_and_over_long_lines_go_flagged_to_be_dead_lettered(caplog):
    h = Harness()
    data = jsonl(line("1"), line("2", "beta"), b"", b"x" * 500, line("3"), b"not json", line("4", "beta"))
    with caplog.at_level(logging.WARNING):
        result = await feed(h.feeder(), "f", data)
    # every line goes: another tenant's without a key (the processing stage dead-letters it by the
    # location's tenant header), the long one as an empty stand-in with its size
    assert [(s.line, s.key) for s in h.sent] == [(1, b"acme:1"), (2, None), (4, None), (5, b"acme:3"),
                                                 (6, None), (7, None)]
    long_line = next(s for s in h.sent if s.line == 4)
    assert (long_line.value, long_line.line_bytes) == (b"", b"500")
    assert all(s.value == data.split(b"\n")[s.line - 1] for s in h.sent if s.line != 4)  # as they are
    assert result.flagged == {"tenant_mismatch": 2, "line_too_large": 1}
    assert h.errors == {"tenant_mismatch": 2, "line_too_large": 1}
    assert h.saved["f"] == FileCheckpoint("v1", len(data), 7, done=True)
    assert "f line 2 sent to be dead-lettered (tenant_mismatch)" in caplog.text and "'beta'" in caplog.text
    assert "f line 4 sent to be dead-lettered (line_too_large)" in caplog.text


async def test_every_gzip_member_is_sent_before_the_file_is_done():
    h = Harness()
    data = gzip.compress(jsonl(line("1"), line("2"))) + gzip.compress(jsonl(line("3")))
    result = await feed(h.feeder(), "f.gz", data, gzipped=True)
    assert h.lines("f.gz") == [1, 2, 3] and result.sent == 3
    assert h.saved["f.gz"].done and h.saved["f.gz"].lines == 3


async def test_a_replaced_larger_file_is_read_from_its_first_line():
    h = Harness()
    await feed(h.feeder(), "f", jsonl(line("1"), line("2")), version="v1")
    result = await feed(h.feeder(), "f", jsonl(line("new-1"), line("new-2"), line("new-3")), version="v2")
    assert result.restarted
    assert [s.value for s in h.sent[2:]] == [line("new-1"), line("new-2"), line("new-3")]
    assert h.lines("f") == [1, 2, 1, 2, 3]


async def test_a_partly_read_file_resumes_after_its_checkpoint_and_a_done_one_is_skipped():
    h = Harness()
    data = jsonl(*(line(str(i)) for i in range(5)))
    h.saved["f"] = FileCheckpoint("v1", len(data), 2)
    await feed(h.feeder(), "f", data)
    assert h.lines("f") == [3, 4, 5]
    assert (await feed(h.feeder(), "f", data)).skipped and h.lines("f") == [3, 4, 5]


async def test_a_corrupt_gzip_is_given_up_at_its_version_after_the_lines_before_it(caplog):
    h = Harness()
    data = gzip.compress(jsonl(line("1"), line("2"))) + b"garbage after the member"
    with caplog.at_level(logging.ERROR):
        result = await feed(h.feeder(), "f.gz", data, gzipped=True)
    assert result.failed == "file_corrupt" and h.lines("f.gz") == [1, 2]
    assert h.saved["f.gz"] == FileCheckpoint("v1", len(data), 2, done=True, failed="file_corrupt")
    assert h.errors == {"file_corrupt": 1} and "f.gz given up" in caplog.text
    assert (await feed(h.feeder(), "f.gz", data, gzipped=True)).skipped  # not read again and again
    fixed = gzip.compress(jsonl(line("1"), line("2"), line("3")))
    await feed(h.feeder(), "f.gz", fixed, version="v2", gzipped=True)  # a new version is read
    assert h.lines("f.gz") == [1, 2, 1, 2, 3] and h.saved["f.gz"].failed is None


async def test_a_gzip_bomb_stops_at_the_file_cap():
    h = Harness()
    bomb = gzip.compress(b"\n" * 50_000_000)
    result = await feed(h.feeder(max_file_bytes=1_000_000), "bomb.gz", bomb, gzipped=True)
    assert result.failed == "file_too_large" and h.errors == {"file_too_large": 1}
    assert h.saved["bomb.gz"].done and h.saved["bomb.gz"].failed == "file_too_large"


async def test_kafka_refusing_stops_the_file_without_moving_its_checkpoint():
    h = Harness(refuse_sends=True)
    with pytest.raises(ProduceFailed, match="broker refused"):
        await feed(h.feeder(), "f", jsonl(line("1"), line("2"), line("3")))
    assert "f" not in h.saved


async def test_an_unreadable_checkpoint_is_ignored_not_fatal():
    async def save(name: str, raw: bytes) -> None: ...

    store = CheckpointStore({"good": FileCheckpoint("v", 1, 1).encode(), "bad": b"{not json"}, save)
    assert store.get("good") == FileCheckpoint("v", 1, 1) and store.get("bad") is None


# --- SFTP, against a fake server -----------------------------------------------------------------

class FakeSftp:
    def __init__(self, files: dict[bytes, bytes], unreadable: set[bytes] = frozenset()) -> None:
        self.files = files  # path -> content
        self.unreadable = unreadable
        self.reads: Counter[bytes] = Counter()

    async def readdir(self, directory: bytes) -> list[Any]:
        assert isinstance(directory, bytes)  # so that asyncssh decodes no name
        prefix = directory + b"/"
        return [SimpleNamespace(filename=path.removeprefix(prefix),
                                attrs=SimpleNamespace(type=asyncssh.FILEXFER_TYPE_REGULAR, size=len(data),
                                                      mtime=1))
                for path, data in self.files.items()
                if path.startswith(prefix) and b"/" not in path.removeprefix(prefix)]

    @asynccontextmanager
    async def open(self, path: bytes, mode: str) -> AsyncIterator[Any]:
        self.reads[path] += 1
        if path in self.unreadable:
            raise asyncssh.SFTPPermissionDenied("permission denied")
        data, position = self.files[path], 0

        async def read(size: int) -> bytes:
            nonlocal position
            chunk, position = data[position:position + size], position + size
            return chunk

        yield SimpleNamespace(read=read)

    async def exists(self, path: bytes) -> bool:
        return any(name.startswith(path + b"/") for name in self.files)

    async def mkdir(self, path: bytes) -> None: ...

    async def rename(self, old: bytes, new: bytes) -> None:
        self.files[new] = self.files.pop(old)


def sftp_location(path: str = "/in", **options: Any) -> SftpLocation:
    return SftpLocation(tenant=TENANT, host="sftp.example", path=path, username="u", complete="marker",
                        **options)


async def test_sftp_odd_names_long_lines_and_unreadable_files_stop_no_other_file(caplog):
    h = Harness()
    sftp = FakeSftp({
        b"/in/a.jsonl": jsonl(line("a1"), line("a2")),
        b"/in/b.jsonl": jsonl(b"y" * 1000, line("b2")),  # a line over the limit
        b"/in/c.jsonl": jsonl(line("c1")),  # permission denied
        b"/in/caf\xe9.jsonl": jsonl(line("e1"), line("e2", "beta")),  # latin-1 name, another tenant
        b"/in/d.jsonl.gz": gzip.compress(jsonl(line("d1"))) + gzip.compress(jsonl(line("d2"))),
    }, unreadable={b"/in/c.jsonl"})
    for path in list(sftp.files):
        sftp.files[path + b".done"] = b""
    location = sftp_location(done_dir="processed")
    source = sftp_module.SftpSource([location], h.feeder(), {}, {})
    with caplog.at_level(logging.WARNING):
        assert await source._poll_location(location, sftp) == 0
    label = location.label
    assert h.lines(f"{label}/a.jsonl") == [1, 2] and h.lines(f"{label}/b.jsonl") == [1, 2]  # 1: a stand-in
    assert h.lines(f"{label}/caf\\xe9.jsonl") == [1, 2] and h.lines(f"{label}/d.jsonl.gz") == [1, 2]
    assert h.errors == {"line_too_large": 1, "tenant_mismatch": 1, "file_error": 1}
    assert f"{label}/c.jsonl skipped until the next poll" in caplog.text
    moved = sorted(path for path in sftp.files if path.startswith(b"/in/processed/"))
    assert moved == [b"/in/processed/a.jsonl", b"/in/processed/b.jsonl", b"/in/processed/caf\xe9.jsonl",
                     b"/in/processed/d.jsonl.gz"]
    # The next poll tries the unreadable file again, and only it.
    await source._poll_location(location, sftp)
    assert sftp.reads[b"/in/c.jsonl"] == 2 and h.errors["file_error"] == 2
    assert sum(sftp.reads.values()) == 6


async def test_sftp_a_location_that_cannot_be_reached_stops_no_other(monkeypatch):
    h = Harness()
    good = FakeSftp({b"/in/a.jsonl": jsonl(line("a1")), b"/in/a.jsonl.done": b""})

    @asynccontextmanager
    async def connect(host: str, **options: Any) -> AsyncIterator[Any]:
        if host == "down.example":
            raise OSError("connection refused")

        @asynccontextmanager
        async def start_sftp_client() -> AsyncIterator[FakeSftp]:
            yield good

        yield SimpleNamespace(start_sftp_client=start_sftp_client)

    monkeypatch.setattr(sftp_module.asyncssh, "connect", connect)
    down = SftpLocation(tenant=TENANT, host="down.example", path="/in", username="u", complete="marker")
    health: dict[str, Any] = {}
    source = sftp_module.SftpSource([down, sftp_location()], h.feeder(), health, {})
    with pytest.raises(sftp_module.PollIncomplete, match=r"down\.example.*connection refused"):
        await source.poll()
    assert h.lines(f"{sftp_location().label}/a.jsonl") == [1] and health["backlog_files"] == 0


# --- S3, against a fake client -------------------------------------------------------------------

class FakeS3:
    def __init__(self, objects: dict[tuple[str, str], bytes], errors: dict[str, str] | None = None) -> None:
        self.objects = objects
        self.errors = errors or {}  # key -> S3 error code on get_object

    def get_paginator(self, operation: str) -> Any:
        assert operation == "list_objects_v2"
        return SimpleNamespace(paginate=self._paginate)

    async def _paginate(self, *, Bucket: str, Prefix: str) -> AsyncIterator[dict[str, Any]]:
        if Bucket == "missing":
            raise ClientError({"Error": {"Code": "NoSuchBucket"}}, "ListObjectsV2")
        yield {"Contents": [{"Key": key, "ETag": f'"{hash(data)}"', "Size": len(data)}
                            for (bucket, key), data in sorted(self.objects.items())
                            if bucket == Bucket and key.startswith(Prefix)]}

    async def get_object(self, *, Bucket: str, Key: str, IfMatch: str) -> dict[str, Any]:
        if Key in self.errors:
            raise ClientError({"Error": {"Code": self.errors[Key]}}, "GetObject")
        data = self.objects[Bucket, Key]

        class Body:
            position = 0

            async def __aenter__(self) -> Body:
                return self

            async def __aexit__(self, *exc: object) -> None: ...

            async def read(self, size: int) -> bytes:
                chunk = data[self.position:self.position + size]
                self.position += size
                return chunk

        return {"Body": Body()}


def s3_source(h: Harness, *locations: dict[str, str],
              health: dict[str, Any] | None = None) -> s3_module.S3Source:
    settings = Settings(sources=SourceSettings(s3_sources=orjson.dumps(list(locations)).decode()))
    return s3_module.S3Source(settings, h.feeder(), {} if health is None else health)


async def test_s3_another_tenants_records_go_flagged_without_a_key_and_bad_objects_stop_nothing():
    h = Harness()
    client = FakeS3({
        ("in", "acme/1.jsonl"): jsonl(line("1"), line("2", "beta"), line("3")),
        ("in", "acme/2.jsonl"): jsonl(line("4")),  # access denied
        ("in", "acme/3.jsonl.gz"): gzip.compress(jsonl(line("5"))) + gzip.compress(jsonl(line("6"))),
        ("in", "acme/4.jsonl"): jsonl(line("7")),  # gone between listing and reading
        ("in", "beta/1.jsonl"): jsonl(line("8", "beta")),  # not this location's
    }, errors={"acme/2.jsonl": "AccessDenied", "acme/4.jsonl": "NoSuchKey"})
    source = s3_source(h, {"tenant": TENANT, "bucket": "in", "prefix": "acme/"})
    assert await source._poll_location(client, source.locations[0]) == 4
    assert [s.value for s in h.sent] == [line(str(i)) for i in (1,)] + [line("2", "beta")] + [
        line(str(i)) for i in (3, 5, 6)]
    assert {s.key for s in h.sent} <= {f"acme:{i}".encode() for i in range(10)} | {None}
    assert next(s.key for s in h.sent if s.line == 2) is None  # never partitioned as beta's entity
    assert h.errors == {"tenant_mismatch": 1, "file_error": 1}
    assert h.saved["s3://in/acme/4.jsonl"].vanished and "s3://in/acme/2.jsonl" not in h.saved


async def test_s3_a_bucket_that_cannot_be_listed_stops_no_other(monkeypatch):
    h = Harness()
    client = FakeS3({("in", "acme/1.jsonl"): jsonl(line("1"))})

    @asynccontextmanager
    async def create_client(*args: Any, **kwargs: Any) -> AsyncIterator[FakeS3]:
        yield client

    monkeypatch.setattr(s3_module, "get_session", lambda: SimpleNamespace(create_client=create_client))
    health: dict[str, Any] = {}
    source = s3_source(h, {"tenant": TENANT, "bucket": "missing"}, {"tenant": TENANT, "bucket": "in"},
                       health=health)
    with pytest.raises(s3_module.PollIncomplete, match=r"s3://missing/.*NoSuchBucket"):
        await source.poll()
    assert [s.value for s in h.sent] == [line("1")] and health["backlog_files"] == 1
