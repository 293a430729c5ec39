"""The one interface every sink implements: read current revisions, write a planned batch."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ingest_stream.core.reasons import Reason
from ingest_stream.core.record import Record, entity_key
from ingest_stream.core.revision import Version
from ingest_stream.errors import SinkError


@dataclass(frozen=True, slots=True)
class Write:
    """A record to apply; `may_rewrite_equal` for redriven and replayed records (contract §5)."""

    record: Record
    may_rewrite_equal: bool = False
    origin_tp: str | None = None  # where the record entered the pipeline: "topic:partition"
    origin_offset: int | None = None
    replayed: bool = False  # re-sent history: an older revision here is expected, not a failure
    key: str = field(init=False, compare=False)  # the entity's: read many times per write

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", entity_key(self.record["tenant"], self.record["id"]))

    @property
    def revision(self) -> int:
        return self.record["revision"]

    @property
    def version(self) -> Version:
        return Version(self.record["revision"], self.origin_tp, self.origin_offset)


@dataclass
class BatchOutcome:
    applied: list[Write] = field(default_factory=list)
    skipped: list[Write] = field(default_factory=list)
    older: list[Write] = field(default_factory=list)
    failed: list[tuple[Write, SinkError, int]] = field(default_factory=list)  # write, error, attempts
    # Not written because the sink is down, for a caller that spills rather than waits (`spill_when_down`).
    unwritten: list[Write] = field(default_factory=list)

    def merge(self, other: BatchOutcome) -> None:
        self.applied += other.applied
        self.skipped += other.skipped
        self.older += other.older
        self.failed += other.failed
        self.unwritten += other.unwritten

    def in_order_of(self, writes: Sequence[Write]) -> None:
        position = {id(w): i for i, w in enumerate(writes)}
        for writes_of in (self.applied, self.skipped, self.older, self.unwritten):
            writes_of.sort(key=lambda w: position[id(w)])
        self.failed.sort(key=lambda f: position[id(f[0])])


OlderHandler = Callable[[list[Write]], Awaitable[None]]


@dataclass
class BatchCall:
    """What one `GuardedSink.apply` call learns about its batch across its attempts and splits:
    kept per call (the sink keeps only what outlives a batch: its circuit, its last error)."""

    before_write: OlderHandler | None = None  # gets the writes found older, before any write
    handed_over: set[int] = field(default_factory=set)  # id() of the writes before_write received
    planned: set[int] = field(default_factory=set)  # id() of the writes the last plan was to write
    lone_since: float | None = None  # when a batch of one entity was first seen failing alone
    spill_when_down: bool = False  # an outage returns the batch's rest unwritten instead of retrying

    def failing_alone_for(self, now: float) -> float:
        """Seconds since the batch (of one entity) was first seen failing alone while the sink's
        probe write went through; 0.0 the first time."""
        if self.lone_since is None:
            self.lone_since = now
        return now - self.lone_since


def where(write: Write) -> str:
    """`tenant:id (topic[partition]@offset)`, the source position where known."""
    if write.origin_tp is None:
        return write.key
    topic, _, partition = write.origin_tp.rpartition(":")
    return f"{write.key} ({topic}[{partition}]@{write.origin_offset})"


class Sink(Protocol):
    name: str
    # How many batches of disjoint entities the sink takes at once (the in-process lane writes that
    # many side by side, each entity in one of them: stream/lanes.py). 1 where concurrent
    # transactions could lock each other (Neo4j: records link to shared nodes).
    parallel_batches: int

    async def open(self) -> None:
        """Connect and make sure the sink's schema exists (idempotent, safe for concurrent workers)."""

    async def close(self) -> None: ...

    async def current_revisions(self, keys: Sequence[str]) -> dict[str, Version]:
        """Version held per entity key (`tenant:id`), tombstones included; absent keys are omitted."""

    async def write(self, writes: Sequence[Write]) -> None:
        """Apply at most one write per entity, guarded so that nothing older replaces newer.

        Raises `SinkError` (classified by exception type) on failure.
        """

    async def probe_write(self) -> None:
        """A small idempotent write outside the records (a heartbeat row, node or document): it
        succeeds when the sink takes writes now. Tells a record that fails on its own from an
        outage when the record is all there is to write (GuardedSink's split)."""


Classifier = Callable[[BaseException], SinkError | None]


@contextlib.contextmanager
def translated_errors(classify: Classifier, sink: str) -> Iterator[None]:
    """The sink boundary: driver exceptions become `SinkError`s. A type no rule knows is a bug (in
    a driver or here), which a record may trigger: it becomes a refusal of the batch, flagged
    `unexpected`, so GuardedSink isolates the record that causes it instead of the agent crashing
    on it after every restart (the sink agent stops the worker if a whole batch fails this way)."""
    try:
        yield
    except SinkError:
        raise
    except Exception as exc:
        error = classify(exc)
        if error is None:
            name = type(exc).__name__
            error = SinkError(sink, Reason.CONSTRAINT_VIOLATION, f"unexpected {name}: {exc}", unexpected=name)
        raise error from exc
