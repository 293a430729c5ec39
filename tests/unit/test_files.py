import gzip
import zlib

import orjson
import pytest

from ingest_stream.core.files import (
    CorruptFile,
    FileCheckpoint,
    FileTooLarge,
    Inflater,
    LineSplitter,
    LongLine,
    Outgoing,
    Plan,
    admit_line,
    plan_for,
    read_lines,
)


def test_plans_for_new_done_partial_and_replaced_files():
    assert plan_for(None, version="e1", size=10) == (Plan.READ, 0)
    done = FileCheckpoint("e1", 10, 5, done=True)
    assert plan_for(done, version="e1", size=10) == (Plan.SKIP, 5)
    partial = FileCheckpoint("e1", 10, 3)
    assert plan_for(partial, version="e1", size=10) == (Plan.READ, 3)  # resume after a crash
    # Replaced: the old lines count nothing in the new content, larger or not.
    assert plan_for(done, version="e2", size=25) == (Plan.RESTART, 0)
    assert plan_for(done, version="e2", size=4) == (Plan.RESTART, 0)
    assert plan_for(partial, version="e2", size=10) == (Plan.RESTART, 0)
    assert plan_for(partial, version="e1", size=11) == (Plan.RESTART, 0)  # same version, other size


def test_checkpoints_round_trip_and_read_what_a_newer_version_wrote():
    for checkpoint in (FileCheckpoint("e", 7, 2, done=True),
                       FileCheckpoint("e", 7, 2, done=True, failed="file_corrupt")):
        assert FileCheckpoint.decode(checkpoint.encode()) == checkpoint
    older = b'{"version": "e", "size": 7, "lines": 2, "done": true, "vanished": false}'
    assert FileCheckpoint.decode(older) == FileCheckpoint("e", 7, 2, done=True)
    newer = b'{"version": "e", "size": 7, "lines": 2, "done": true, "vanished": false, "later": 1}'
    assert FileCheckpoint.decode(newer) == FileCheckpoint("e", 7, 2, done=True)


async def chunks_of(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def lines_of(data: bytes, chunk: int, *, gzipped: bool = False, max_line: int = 1024,
                   max_file: int = 10**9) -> list[bytes | LongLine]:
    return [line async for line in read_lines(chunks_of(data, chunk), gzipped=gzipped,
                                              max_line_bytes=max_line, max_file_bytes=max_file)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
async def test_lines_come_out_whole_whatever_the_chunking(chunk):
    data = b'{"a": 1}\n{"b": 2}\r\n\n{"c": 3}'
    assert await lines_of(data, chunk) == [b'{"a": 1}', b'{"b": 2}', b"", b'{"c": 3}']


@pytest.mark.parametrize("chunk", [5, 64])
async def test_gzip_is_inflated_on_the_fly(chunk):
    data = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(100)))
    assert await lines_of(data, chunk, gzipped=True) == [b'{"n": %d}' % i for i in range(100)]


@pytest.mark.parametrize("chunk", [1, 9, 4096])
async def test_every_gzip_member_is_read_padding_and_empty_members_included(chunk):
    first = b"".join(b"a%d\n" % i for i in range(2000))
    data = (gzip.compress(first) + b"\0\0\0" + gzip.compress(b"b1\nb2\n") + gzip.compress(b"")
            + gzip.compress(b"c1"))
    lines = await lines_of(data, chunk, gzipped=True)
    assert lines == [b"a%d" % i for i in range(2000)] + [b"b1", b"b2", b"c1"]


async def test_a_line_may_span_two_gzip_members():
    data = gzip.compress(b"one\ntw") + gzip.compress(b"o\nthree\n")
    assert await lines_of(data, 4, gzipped=True) == [b"one", b"two", b"three"]


def test_inflated_output_comes_in_bounded_pieces_whatever_the_input_chunk():
    bomb = gzip.compress(b"\n" * 5_000_000)  # ~5 KB that inflates a thousandfold
    pieces = list(Inflater(piece=4096).feed(bomb))
    assert max(map(len, pieces)) <= 4096 and sum(map(len, pieces)) == 5_000_000


async def test_a_truncated_or_corrupt_gzip_is_an_error_not_a_silent_end():
    data = gzip.compress(b"x\n" * 100) + gzip.compress(b"y\n" * 100)
    with pytest.raises(CorruptFile, match="truncated"):
        await lines_of(data[:-4], 16, gzipped=True)
    with pytest.raises(CorruptFile):
        await lines_of(gzip.compress(b"x\n") + b"not gzip", 16, gzipped=True)
    with pytest.raises(CorruptFile):
        await lines_of(b"plain text, not gzip\n", 16, gzipped=True)
    assert await lines_of(b"", 16, gzipped=True) == []


async def test_content_past_the_file_cap_raises_after_the_lines_before_it():
    bomb = gzip.compress(b'{"n": 1}\n' * 1_000_000)  # 9 MB inflated
    lines: list[bytes | LongLine] = []

    async def read() -> None:
        async for line in read_lines(chunks_of(bomb, 1024), gzipped=True, max_line_bytes=100,
                                     max_file_bytes=1_000_000):
            lines.append(line)

    with pytest.raises(FileTooLarge, match="inflated"):
        await read()
    assert 0 < len(lines) <= 1_000_000 // 9 and set(lines) == {b'{"n": 1}'}
    with pytest.raises(FileTooLarge):
        await lines_of(b"x" * 101, 10, max_file=100)
    assert len(await lines_of(b"x\n" * 50, 10, max_file=100)) == 50  # at the cap: fine


@pytest.mark.parametrize("chunk", [1, 5, 1000])
async def test_a_line_over_the_cap_is_measured_not_kept_and_the_next_lines_keep_their_numbers(chunk):
    data = b"ok\n" + b"x" * 25 + b"\n" + b"y" * 10 + b"\r\n" + b"z" * 11 + b"\r\nlast"
    lines = await lines_of(data, chunk, max_line=10)
    assert lines == [b"ok", LongLine(25), b"y" * 10, LongLine(12), b"last"]
    assert await lines_of(b"w" * 30, chunk, max_line=10) == [LongLine(30)]  # no newline at the end


def test_a_splitter_holds_no_more_than_the_cap_of_an_endless_line():
    splitter = LineSplitter(limit=100)
    for _ in range(1000):
        assert splitter.feed(b"x" * 1000) == []
        assert sum(map(len, splitter._parts)) <= 101
    assert splitter.feed(b"\nnext\n") == [LongLine(1_000_000), b"next"]


def record(tenant: str = "acme", **fields: object) -> bytes:
    return orjson.dumps({"tenant": tenant, "id": "doc-1", "revision": 1, **fields})


def test_a_line_of_the_locations_tenant_goes_with_its_entity_key():
    line = record()
    assert admit_line(line, tenant="acme") == Outgoing(b"acme:doc-1", line)


def test_a_line_of_another_tenant_is_flagged_whatever_the_json_spelling():
    for line in (record("beta"), b'{"tenant": "acme", "id": "1", "tenant": "beta"}',  # last key wins
                 b'{"tenant": "\\u0062eta", "id": "1"}', record(None), b'{"tenant": 5, "id": "1"}',
                 b'{"tenant": "ACME", "id": "1"}'):
        verdict = admit_line(line, tenant="acme")
        assert (verdict.flagged, verdict.key, verdict.value) == ("tenant_mismatch", None, line), line


def test_lines_the_pipeline_dead_letters_go_as_they_are_without_a_key():
    for line in (b"not json", b"[1, 2]", b'"acme"', b'{"id": "1"}', b'{"tenant": "acme", "id": 5}'):
        assert admit_line(line, tenant="acme") == Outgoing(None, line), line
    huge_id = record(id="i" * 10_000)
    assert admit_line(huge_id, tenant="acme") == Outgoing(None, huge_id)  # no key over the key limit


def test_a_line_over_the_record_limit_goes_as_an_empty_stand_in_with_its_size():
    assert admit_line(LongLine(2_000_000), tenant="acme") == Outgoing(
        None, b"", (("ingest.adapter.line_bytes", b"2000000"),), "line_too_large",
        "2000000 bytes, over the record limit")


def test_zlib_keeps_the_rest_of_the_input_after_a_member_in_unused_data():
    # What Inflater relies on at the end of each member.
    member = zlib.decompressobj(wbits=31)
    second = gzip.compress(b"2")
    member.decompress(gzip.compress(b"1" * 100) + second, 10)
    while not member.eof:
        member.decompress(member.unconsumed_tail, 10)
    assert member.unused_data == second


def test_locations_are_named_by_default_and_a_name_is_taken_once():
    from ingest_stream.config import Settings, SourceSettings
    from ingest_stream.core.files import parse_locations
    from ingest_stream.errors import ConfigError

    three = orjson.dumps([{"tenant": "a", "bucket": "b"}, {"tenant": "a", "bucket": "c", "name": "archive"},
                          {"tenant": "a", "bucket": "d"}]).decode()
    assert [location.name for location in parse_locations(three)] == ["s3-main", "archive", "s3-3"]
    twice = orjson.dumps([{"tenant": "a", "bucket": "b", "name": "x"},
                          {"tenant": "a", "bucket": "c", "name": "x"}])
    with pytest.raises(ValueError, match="two locations are named 'x'"):
        parse_locations(twice.decode())
    with pytest.raises(ConfigError, match="the name 'kafka' is taken"):
        Settings(sources=SourceSettings(
            s3_sources=orjson.dumps([{"tenant": "a", "bucket": "b", "name": "kafka"}]).decode()))
