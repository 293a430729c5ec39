"""Reading fetched record batches so that no record's headers can stop the consumer.

A Kafka header name is a string, and aiokafka's record reader decodes it as strict UTF-8. A record
whose header name is not UTF-8 (a hand-built batch, a non-Java client) makes the reader raise in
the middle of a fetch: the consumer stops, the worker restarts, fetches the same batch and stops
again — one record would stop every partition of the worker for good. Java's consumer decodes such
names with replacement characters and goes on; so do we.

`TolerantMemoryRecords` replaces aiokafka's `MemoryRecords` in its fetcher
(`install`): batches are read by aiokafka's compiled reader as before; only a batch whose reading
raises `UnicodeDecodeError` is read again by its pure-Python reader, with header names decoded with
U+FFFD for what is not UTF-8. The record then goes on like any other (its value is judged by the
pipeline; the headers travel with the replaced names).

This module is aiokafka internals throughout (checked against aiokafka 0.14.0): its pure-Python
`_MemoryRecordsPy` and `_DefaultRecordBatchPy`, their `_next_slice` and `_buffer`, and the name
`MemoryRecords` its fetcher module looks up. With `stream/faust_internals.py`, it is the only place
in `ingest_stream/` allowed to touch another object's private members (ruff SLF001).
"""

from __future__ import annotations

from typing import Any

from aiokafka.consumer import fetcher as aiokafka_fetcher
from aiokafka.record.default_records import DefaultRecordBatch, _DefaultRecordBatchPy
from aiokafka.record.memory_records import _MemoryRecordsPy


class _LenientSlice(bytearray):
    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytearray.decode(self, encoding, "replace")


class _LenientBuffer(bytearray):
    """A batch's bytes whose slices decode leniently: the only text the reader decodes is header
    names (`_DefaultRecordBatchPy._read_msg`)."""

    def __getitem__(self, index: Any) -> Any:
        item = bytearray.__getitem__(self, index)
        return _LenientSlice(item) if isinstance(index, slice) else item


class _LenientBatchPy(_DefaultRecordBatchPy):  # type: ignore[misc]
    def _maybe_uncompress(self) -> None:
        super()._maybe_uncompress()
        buffer: bytearray = self._buffer  # type: ignore[has-type]
        if not isinstance(buffer, _LenientBuffer):
            self._buffer = _LenientBuffer(buffer)


class TolerantBatch:
    """One record batch: aiokafka's own reader, or the lenient one where that raises."""

    def __init__(self, batch: Any, raw: bytes | memoryview) -> None:
        self._batch = batch
        self._raw = raw
        self._records: Any = None

    def __getattr__(self, name: str) -> Any:  # base_offset, validate_crc, is_control_batch, …
        return getattr(self._batch, name)

    def _read(self) -> Any:
        if self._records is None:
            try:
                records = list(self._batch)
            except UnicodeDecodeError:
                records = list(_LenientBatchPy(bytes(self._raw)))
            self._records = iter(records)
        return self._records

    def __iter__(self) -> Any:
        return self._read()

    def __next__(self) -> Any:
        return next(self._read())


class TolerantMemoryRecords:
    """aiokafka's MemoryRecords (the records of one fetched partition), its default-format
    batches wrapped in `TolerantBatch`."""

    def __init__(self, data: bytes) -> None:
        self._records = _MemoryRecordsPy(data)

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        raw = self._records._next_slice
        batch = self._records.next_batch()
        if isinstance(batch, DefaultRecordBatch) and raw is not None:
            return TolerantBatch(batch, raw)
        return batch


def install() -> None:
    """Make aiokafka's fetcher read fetched records through TolerantMemoryRecords (process-wide:
    the fetcher module looks the name up when it unpacks a fetch)."""
    aiokafka_fetcher.MemoryRecords = TolerantMemoryRecords
