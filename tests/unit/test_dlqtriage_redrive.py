"""Issue 16: `redrive` carries out the core's decisions — a refused letter is counted and never
sent, a truncated letter is sent as its re-read original or not at all, a record too large to send
is refused without stopping the run — and `verify` reads archives inside the manifest's directory
only. A fake store and producer stand in for Kafka (tests/integration/test_triage.py uses real ones)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from ingest_stream.config import Settings
from ingest_stream.core.dlq import (
    VALUE_BYTES_HEADER,
    VALUE_SHA256_HEADER,
    VALUE_TRUNCATED_HEADER,
    DlqEnvelope,
    Position,
    failure_headers,
)
from ingest_stream.core.reasons import Reason, Stage
from ingest_stream.core.triage import DeadLetter, Selection, Status, StatusEntry
from ingest_stream.ops.dead_letters import DeadLetterStore, redrive, verify_archive
from ingest_stream.ops.kafka_io import ToolError

SOURCE = Position("ingest.source.kafka", 0, 40)
ORIGINAL = b'{"body": "' + b"z" * 3000 + b'"}'


def letter(offset: int, *, origin: Position = SOURCE, reason: Reason = Reason.CONNECTION_ERROR,
           value: bytes = b'{"id": "a"}', extra: tuple = ()) -> DeadLetter:
    headers = [*failure_headers([], reason=reason, stage=Stage.VALIDATE, error="e", attempts=1, origin=origin,
                                failed=None, failed_at=datetime(2026, 1, 1, tzinfo=UTC),
                                identity={"tenant": "t", "id": f"d{offset}"}), *extra]
    return DeadLetter(0, offset, b"t:d", value, tuple(headers), DlqEnvelope.from_headers(headers))


def truncated(offset: int, original: bytes = ORIGINAL) -> DeadLetter:
    flags = ((VALUE_TRUNCATED_HEADER, b"true"), (VALUE_BYTES_HEADER, str(len(original)).encode()),
             (VALUE_SHA256_HEADER, hashlib.sha256(original).hexdigest().encode()))
    return letter(offset, value=original[:50], extra=flags)


class FakeProducer:
    def __init__(self, max_request_size: int, broker_refuses: set[bytes], down: bool = False) -> None:
        # (a record's headers and framing count too: the producer can refuse a value under the limit)
        self.max_request_size = max_request_size
        self.broker_refuses = broker_refuses
        self.down = down
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    async def send(self, topic: str, *, key: bytes | None = None, value: bytes | None = None,
                   headers: Any = None) -> asyncio.Future[None]:
        if len(value or b"") > self.max_request_size:  # aiokafka checks this before queueing
            raise MessageSizeTooLargeError(f"{len(value or b'')} bytes")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if value in self.broker_refuses:
            future.set_exception(MessageSizeTooLargeError("broker: MESSAGE_SIZE_TOO_LARGE"))
        elif self.down and topic != "ingest.dlq.status":
            future.set_exception(KafkaConnectionError("down"))
        else:
            self.sent.append((topic, key, value))
            future.set_result(None)
        return future

    async def stop(self) -> None:
        pass


class FakeStore(DeadLetterStore):
    def __init__(self, letters: list[DeadLetter], records: dict[Position, bytes], *,
                 broker_refuses: frozenset[bytes] = frozenset(), down: bool = False) -> None:
        super().__init__(Settings(max_record_bytes=10_000))
        self.all = letters
        self.records = records
        self.reads: list[Position] = []
        self.producer = FakeProducer(self.max_send_bytes, set(broker_refuses), down)

    async def selected(self, selection: Selection) -> AsyncIterator[tuple[DeadLetter, Status]]:
        for item in self.all:
            yield item, Status.OPEN

    async def read_value(self, position: Position, *, max_bytes: int) -> bytes | None:
        assert max_bytes >= len(ORIGINAL)
        self.reads.append(position)
        return self.records.get(position)

    async def open_producer(self) -> Any:
        return self.producer

    def sent_to(self, topic: str) -> list[bytes | None]:
        return [value for t, _, value in self.producer.sent if t == topic]

    def marked(self) -> dict[str, Status]:
        return {key.decode(): StatusEntry.decode(value).status
                for t, key, value in self.producer.sent if t == "ingest.dlq.status" and key and value}


async def test_a_letter_naming_a_foreign_topic_is_refused_even_with_force_and_the_rest_goes_on():
    store = FakeStore([letter(1, origin=Position("ingest.legal.holds", 0, 3)),
                       letter(2, origin=Position("ingest.dlq.status", 0, 3)), letter(3)], {})
    report = await redrive(store, Selection(), force=True)
    assert [t for t, _, _ in store.producer.sent if t != "ingest.dlq.status"] == ["ingest.source.kafka"]
    assert store.marked() == {"0:3": Status.REDRIVEN}  # the refused stay open
    assert (report.refused, dict(report.sent)) == (2, {"ingest.source.kafka": 1})
    assert [r["id"] for r in report.refusals] == ["0:1", "0:2"]
    assert "'ingest.legal.holds' is not a source topic" in report.refusals[0]["problem"]
    assert report.as_dict()["refused"] == 2


async def test_a_truncated_letter_is_sent_as_its_re_read_original_never_its_prefix():
    store = FakeStore([truncated(1)], {SOURCE: ORIGINAL})
    report = await redrive(store, Selection())
    assert store.reads == [SOURCE]
    assert store.sent_to("ingest.source.kafka") == [ORIGINAL]
    assert (report.refused, store.marked()) == (0, {"0:1": Status.REDRIVEN})


@pytest.mark.parametrize(("records", "problem"), [
    ({}, "original no longer in ingest.source.kafka[0]@40: retention removed it"),
    ({SOURCE: ORIGINAL[:-1] + b"!"}, "checksum mismatch"),
])
async def test_a_truncated_letter_whose_original_is_gone_or_another_is_refused(records, problem):
    store = FakeStore([truncated(1), letter(2)], records)
    report = await redrive(store, Selection())
    assert store.sent_to("ingest.source.kafka") == [b'{"id": "a"}']  # only the whole letter
    assert report.refused == 1 and problem in report.refusals[0]["problem"]
    assert store.marked() == {"0:2": Status.REDRIVEN}


async def test_a_dry_run_checks_the_original_and_sends_nothing():
    store = FakeStore([truncated(1), truncated(2, ORIGINAL + b" ")], {SOURCE: ORIGINAL})
    report = await redrive(store, Selection(), dry_run=True)
    assert store.producer.sent == []
    assert (dict(report.sent), report.refused) == ({"ingest.source.kafka": 1}, 1)


async def test_a_record_too_large_to_send_is_refused_and_the_run_goes_on():
    huge = b"h" * 200_000  # past the producer's limit: refused before sending (a dry run says so too)
    near_the_limit = b"l" * 60_000  # under it, but the producer counts headers too: it raises in send()
    refused_by_broker = b'{"id": "refused by the broker"}'
    store = FakeStore([letter(1, value=huge), letter(2, value=near_the_limit),
                       letter(3, value=refused_by_broker), letter(4)], {},
                      broker_refuses=frozenset({refused_by_broker}))
    store.producer.max_request_size = 50_000
    report = await redrive(store, Selection())
    assert store.sent_to("ingest.source.kafka") == [b'{"id": "a"}']
    assert store.marked() == {"0:4": Status.REDRIVEN}
    assert dict(report.sent) == {"ingest.source.kafka": 1}
    assert [r["id"] for r in report.refusals] == ["0:1", "0:2", "0:3"]
    assert f"200000 bytes, more than the {store.max_send_bytes}" in report.refusals[0]["problem"]
    assert "too large to send" in report.refusals[1]["problem"]
    assert "refused it as too large" in report.refusals[2]["problem"]


async def test_a_truncated_original_larger_than_the_producer_allows_is_refused_unread():
    big = b"b" * 200_000
    store = FakeStore([truncated(1, big)], {SOURCE: big})
    report = await redrive(store, Selection())
    assert store.reads == [] and store.producer.sent == []
    assert "200000 bytes, more than" in report.refusals[0]["problem"]


async def test_a_broker_failure_stops_the_run_with_nothing_marked_that_was_not_acknowledged():
    store = FakeStore([letter(1), letter(2)], {}, down=True)
    with pytest.raises(KafkaConnectionError):
        await redrive(store, Selection())
    assert store.marked() == {}


# --- verify ------------------------------------------------------------------------------------
def write_archive(directory: Path, name: str = "a.jsonl.gz") -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(gzip.compress(b'{"id": "0:1"}\n{"id": "0:2"}\n'))
    return {"archive": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "records": 2}


def test_verify_checks_an_archive_beside_its_manifest(tmp_path: Path):
    manifest = tmp_path / "m.manifest.json"
    manifest.write_bytes(orjson.dumps(write_archive(tmp_path)))
    result = verify_archive(manifest)
    assert (result["ok"], result["records"], result["archive"]) == (True, 2, str(tmp_path / "a.jsonl.gz"))


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_verify_refuses_an_archive_outside_the_manifests_directory(tmp_path: Path, where: str):
    outside = tmp_path / "elsewhere"
    document = write_archive(outside)  # a valid archive, with its real checksum
    archives = tmp_path / "archives"
    archives.mkdir()
    if where == "absolute":
        document["archive"] = str(outside / "a.jsonl.gz")
    elif where == "dotdot":
        document["archive"] = "../elsewhere/a.jsonl.gz"
    else:
        os.symlink(outside / "a.jsonl.gz", archives / "link.jsonl.gz")
        document["archive"] = "link.jsonl.gz"
    manifest = archives / "m.manifest.json"
    manifest.write_bytes(orjson.dumps(document))
    with pytest.raises(ToolError, match="refused"):
        verify_archive(manifest)


@pytest.mark.parametrize("content", [b"\x1b[2J not json", b"{}", b'{"archive": "a.jsonl.gz"}'])
def test_verify_refuses_a_garbled_manifest_clearly(tmp_path: Path, content: bytes):
    write_archive(tmp_path)
    manifest = tmp_path / "m.manifest.json"
    manifest.write_bytes(content)
    with pytest.raises(ToolError, match="not a dead-letter archive manifest"):
        verify_archive(manifest)
