"""Fetched batches are read by aiokafka's reader, or leniently where a header name is not UTF-8."""

from aiokafka.record.memory_records import MemoryRecords

from ingest_stream.record_reader import TolerantMemoryRecords
from tests.hostile import batch, with_header_name_bytes


def read(records) -> list[tuple[int, bytes, list]]:
    out = []
    while records.has_next():
        for record in records.next_batch():
            out.append((record.offset, record.value, list(record.headers)))
    return out


def test_well_formed_batches_read_exactly_as_aiokafka_reads_them():
    data = batch((b"a", [("x", b"1")]), (b"b", [("y", None)])) + batch((b"c", []), base_offset=2)
    assert read(TolerantMemoryRecords(data)) == read(MemoryRecords(data))
    assert [offset for offset, _, _ in read(TolerantMemoryRecords(data))] == [0, 1, 2]


def test_a_header_name_that_is_not_utf8_is_read_with_replacement_characters_not_raised():
    raw = with_header_name_bytes(batch((b"a", [("ok", b"1")]), (b"b", [("ZZ", b"2")]), (b"c", [])),
                                 b"ZZ", b"\xff\xfe")
    try:
        read(MemoryRecords(raw))
    except UnicodeDecodeError:
        pass  # what aiokafka's own reader does: the fetch, and the consumer, stop here
    else:
        raise AssertionError("aiokafka read the batch: this test no longer shows the failure")
    assert read(TolerantMemoryRecords(raw)) == [
        (0, b"a", [("ok", b"1")]), (1, b"b", [("\ufffd\ufffd", b"2")]), (2, b"c", [])]


def test_every_codec_a_producer_may_compress_with_is_installed():
    from aiokafka import codec

    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()
