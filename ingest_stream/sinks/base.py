"""The one interface every sink implements: read current revisions, write a planned batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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

    @property
    def key(self) -> str:
        return entity_key(self.record["tenant"], self.record["id"])

    @property
    def revision(self) -> int:
        return self.record["revision"]

    @property
    def version(self) -> Version:
        return Version(self.record["revision"], self.origin_tp, self.origin_offset)


class Sink(Protocol):
    name: str

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
