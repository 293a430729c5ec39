"""Reconciliation of the sinks: a sorted merge of each sink's (id, revision, deleted) stream.

No I/O here: the readers (`ops/reconcile.py`) page each sink by id, in the same order (code point
order of the id, which is Python's `str` order, Postgres' `COLLATE "C"` and the graph's), and feed
the pages to `merge_sorted`; `Diff` counts and samples what disagrees. Memory is one page per sink
and the bounded samples, whatever the size of the tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DEFAULT_SAMPLE = 20
RECHECK_LIMIT = 10_000  # mismatched ids read again per tenant; past it, the first look stands


class Entry(NamedTuple):
    """What one sink holds for one entity."""

    id: str
    revision: int
    deleted: bool


class OutOfOrder(ValueError):
    """A stream was not sorted by id, strictly increasing: the merge would report false mismatches."""


def merge_sorted(
    streams: Mapping[str, Iterable[Entry]],
) -> Iterator[tuple[str, dict[str, Entry | None]]]:
    """Each id of any stream once, in order, with what every stream holds for it (None: nothing).

    Every stream must be sorted by id, strictly increasing; OutOfOrder otherwise.
    """
    iterators = {name: iter(stream) for name, stream in streams.items()}
    heads: dict[str, Entry] = {}
    last: dict[str, str] = {}

    def advance(name: str) -> None:
        entry = next(iterators[name], None)
        if entry is None:
            heads.pop(name, None)
            return
        previous = last.get(name)
        if previous is not None and entry.id <= previous:
            raise OutOfOrder(f"{name}: id {entry.id!r} after {previous!r}")
        last[name] = entry.id
        heads[name] = entry

    for name in iterators:
        advance(name)
    while heads:
        current = min(entry.id for entry in heads.values())
        views: dict[str, Entry | None] = {}
        for name in iterators:
            head = heads.get(name)
            if head is not None and head.id == current:
                views[name] = head
                advance(name)
            else:
                views[name] = None
        yield current, views


@dataclass
class Mismatch:
    """One kind of disagreement: how many ids, and the first `limit` of them."""

    count: int = 0
    sample: list[str] = field(default_factory=list)

    def add(self, entity_id: str, limit: int) -> None:
        self.count += 1
        if len(self.sample) < limit:
            self.sample.append(entity_id)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sample": list(self.sample)}


@dataclass
class Diff:
    """Counts and samples of ids missing from a sink or held at another revision (or deletion state)."""

    sinks: Sequence[str]
    limit: int = DEFAULT_SAMPLE
    compared: int = 0  # distinct ids seen in any sink
    missing: dict[str, Mismatch] = field(default_factory=dict)  # sink -> ids other sinks hold
    revision: Mismatch = field(default_factory=Mismatch)  # held everywhere, revisions differ
    deleted: Mismatch = field(default_factory=Mismatch)  # same revision, deleted in one only
    # Every mismatched id, up to `recheck_limit`: read again after the pipeline settled (a record
    # on its way through the sinks is in one before the others), only those still off count.
    recheck_limit: int = RECHECK_LIMIT
    suspects: list[str] = field(default_factory=list)
    suspects_overflow: bool = False
    in_flight: int = 0

    def __post_init__(self) -> None:
        for sink in self.sinks:
            self.missing.setdefault(sink, Mismatch())

    def observe(self, entity_id: str, views: Mapping[str, Entry | None]) -> None:
        self.compared += 1
        before = self.mismatches
        held = {sink: views.get(sink) for sink in self.sinks}
        present = {sink: entry for sink, entry in held.items() if entry is not None}
        for sink, entry in held.items():
            if entry is None:
                self.missing[sink].add(entity_id, self.limit)
        if len({entry.revision for entry in present.values()}) > 1:
            self.revision.add(entity_id, self.limit)
        elif len({entry.deleted for entry in present.values()}) > 1:
            self.deleted.add(entity_id, self.limit)
        if self.mismatches != before:
            if len(self.suspects) < self.recheck_limit:
                self.suspects.append(entity_id)
            else:
                self.suspects_overflow = True

    def settled(self, again: Diff) -> Diff:
        """This diff after its suspects were read again (`again`, over the suspects only): what
        still disagrees. Kept as it is when there were too many suspects to read again."""
        if self.suspects_overflow:
            return self
        again.compared = self.compared
        again.in_flight = self.mismatches - again.mismatches
        return again

    def feed(self, streams: Mapping[str, Iterable[Entry]]) -> None:
        """Merge one window of sorted streams (ids of later windows must all be greater)."""
        for entity_id, views in merge_sorted(streams):
            self.observe(entity_id, views)

    @property
    def mismatches(self) -> int:
        return (sum(m.count for m in self.missing.values()) + self.revision.count
                + self.deleted.count)

    def as_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "mismatches": self.mismatches,
            "in_flight": self.in_flight,  # off at first, in agreement when read again
            "missing": {sink: m.as_dict() for sink, m in self.missing.items()},
            "revision_differs": self.revision.as_dict(),
            "deleted_differs": self.deleted.as_dict(),
        }


def diff(streams: Mapping[str, Iterable[Entry]], *, limit: int = DEFAULT_SAMPLE) -> Diff:
    """The whole comparison of sorted streams in one call."""
    result = Diff(sinks=list(streams), limit=limit)
    result.feed(streams)
    return result


def window_end(pages: Sequence[Sequence[Entry]], page_size: int) -> str | None:
    """The last id up to which every sink's page is complete (None: every stream is exhausted
    past these pages, so everything fetched is complete).

    A page shorter than `page_size` is the end of its stream; a full one is complete up to its last id.
    """
    ends = [page[-1].id for page in pages if len(page) >= page_size and page]
    return min(ends) if ends else None


def typesense_entry(live: Entry | None, tombstone: Entry | None) -> Entry | None:
    """Typesense keeps a live document and, after a delete, a tombstone beside it (a later revision
    brings the document back and leaves the tombstone): the higher revision is what it holds."""
    if live is None or (tombstone is not None and tombstone.revision > live.revision):
        return tombstone
    return live
