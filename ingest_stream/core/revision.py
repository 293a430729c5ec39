"""The revision guard: which writes a sink applies, skips, or rejects as older (contract §5).

A sink remembers, with the revision it holds, where that revision entered the pipeline (source
topic-partition and offset). That tells a genuinely out-of-order older revision (it arrived *after*
the held one) from at-least-once history being delivered again after a crash (it arrived *before*
the held one, was applied then, and was superseded): the first goes to the DLQ, the second is
skipped. Positions in different source partitions cannot be ordered, so there the older revision
is rejected. A replay re-sends history on purpose: an older revision it brings is skipped too.
The whole rule is here; the sink agent dead-letters what comes out as `older`, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Version:
    """A revision and the source position it came from (None where unknown)."""

    revision: int
    origin_tp: str | None = None  # "topic:partition"
    origin_offset: int | None = None

    def arrived_before(self, other: Version) -> bool:
        return (
            self.origin_tp is not None
            and self.origin_tp == other.origin_tp
            and self.origin_offset is not None
            and other.origin_offset is not None
            and self.origin_offset < other.origin_offset
        )


class RevisionDecision(StrEnum):
    APPLY = "apply"
    NOOP = "noop"  # an equal revision: a redelivery, nothing to do
    SUPERSEDED = "superseded"  # older, but from before the held one: redelivered history, skip
    REPLAYED = "replayed"  # older, re-sent by a replay (history, expected there): skip
    OLDER = "older"  # the sink holds a newer revision: never applied, goes to the DLQ


def decide(held: Version | None, incoming: Version, *, may_rewrite_equal: bool,
           replayed: bool = False) -> RevisionDecision:
    """Redriven and replayed records may rewrite an equal revision, never an older one."""
    if held is None or incoming.revision > held.revision:
        return RevisionDecision.APPLY
    if incoming.revision == held.revision:
        return RevisionDecision.APPLY if may_rewrite_equal else RevisionDecision.NOOP
    if incoming.arrived_before(held):
        return RevisionDecision.SUPERSEDED
    return RevisionDecision.REPLAYED if replayed else RevisionDecision.OLDER


@dataclass
class BatchPlan(Generic[T]):
    apply: list[T] = field(default_factory=list)  # at most one per entity: its newest
    skip: list[T] = field(default_factory=list)  # equal, superseded, replayed, or replaced in the batch
    older: list[T] = field(default_factory=list)  # for the DLQ (OLDER_REVISION)


def plan_batch(
    items: Sequence[T],
    held: Mapping[str, Version],
    *,
    key: Callable[[T], str],
    version: Callable[[T], Version],
    may_rewrite_equal: Callable[[T], bool],
    replayed: Callable[[T], bool] = lambda _: False,
) -> BatchPlan[T]:
    """Decide a batch as if its items were applied one by one, in order; keep each entity's last.

    An item replaced by a newer one later in the same batch would have been applied and then
    overwritten; skipping it gives the same final state with one write per entity.
    """
    plan: BatchPlan[T] = BatchPlan()
    current: dict[str, Version] = dict(held)  # and each entity's applied in the batch, once asked
    pending: dict[str, T] = {}
    for item in items:
        entity = key(item)
        held_version = current.get(entity)
        if held_version is None:
            first = pending.get(entity)
            if first is None:  # an entity new to the sink and the batch (most): applied, its
                pending[entity] = item  # version worked out only if the entity comes again
                continue
            held_version = current[entity] = version(first)
        incoming = version(item)
        decision = decide(held_version, incoming, may_rewrite_equal=may_rewrite_equal(item),
                          replayed=replayed(item))
        if decision is RevisionDecision.APPLY:
            if entity in pending:
                plan.skip.append(pending[entity])
            pending[entity] = item
            current[entity] = incoming
        elif decision is RevisionDecision.OLDER:
            plan.older.append(item)
        else:
            plan.skip.append(item)
    plan.apply = list(pending.values())
    return plan
