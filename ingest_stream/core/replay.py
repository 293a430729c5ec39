"""Replay plans: re-process one tenant's records of a time range from the source topics.

A plan fixes, per source partition, the offset range the time range resolves to; it needs an
approval (an RFA id) above a size threshold, is refused while the tenant is under a legal hold,
and records its progress (next offset per partition) so a run resumes where it stopped.
Pure: the operator tool does the I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

import orjson

RFA_PREFIX = "RFA-"


class PlanStatus(StrEnum):
    PENDING = "pending"  # waiting for approval
    APPROVED = "approved"  # may run
    RUNNING = "running"
    FAILED = "failed"  # stopped; `run` again resumes
    COMPLETED = "completed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({PlanStatus.COMPLETED, PlanStatus.CANCELLED})


class PlanError(ValueError):
    """A plan cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class ReplayPlan:
    id: str
    tenant: str
    from_ms: int
    to_ms: int
    sources: tuple[str, ...]
    throttle: float  # records per second sent back to the source topics
    ranges: dict[str, tuple[int, int]]  # "topic:partition" -> [start, end)
    estimate: dict[str, int]  # records of the tenant per source, counted when planned
    needs_approval: bool
    status: PlanStatus
    created_at: str
    updated_at: str
    phase: str = "planned"
    rfa: str | None = None
    approved_by: str | None = None
    progress: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset
    scanned: int = 0
    replayed: int = 0
    error: str | None = None

    @property
    def total_estimate(self) -> int:
        return sum(self.estimate.values())

    @property
    def remaining(self) -> dict[str, tuple[int, int]]:
        """The part of each range not yet replayed."""
        left = {}
        for tp, (start, end) in self.ranges.items():
            position = max(start, self.progress.get(tp, start))
            if position < end:
                left[tp] = (position, end)
        return left

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> ReplayPlan:
        data: dict[str, Any] = orjson.loads(raw)
        data["sources"] = tuple(data["sources"])
        data["ranges"] = {k: (int(v[0]), int(v[1])) for k, v in data["ranges"].items()}
        data["status"] = PlanStatus(data["status"])
        return cls(**data)

    # --- transitions ---------------------------------------------------------------------------
    def approve(self, rfa: str, *, by: str, at: str, held: bool) -> ReplayPlan:
        if held:
            raise PlanError(f"tenant {self.tenant} is under a legal hold: replays are blocked")
        if self.status is not PlanStatus.PENDING:
            raise PlanError(f"plan {self.id} is {self.status.value}, not pending")
        if not rfa.startswith(RFA_PREFIX) or len(rfa) <= len(RFA_PREFIX):
            raise PlanError(f"an approval needs an RFA id like {RFA_PREFIX}1234, not {rfa!r}")
        return replace(self, status=PlanStatus.APPROVED, rfa=rfa, approved_by=by, updated_at=at,
                       phase="approved")

    def start(self, *, at: str, held: bool) -> ReplayPlan:
        if held:
            raise PlanError(f"tenant {self.tenant} is under a legal hold: replays are blocked")
        if self.status is PlanStatus.PENDING:
            raise PlanError(f"plan {self.id} needs approval first: replayctl approve {self.id} --rfa RFA-…")
        if self.status in TERMINAL:
            raise PlanError(f"plan {self.id} is {self.status.value}")
        return replace(self, status=PlanStatus.RUNNING, phase="replaying", updated_at=at, error=None)

    def advanced(self, progress: dict[str, int], *, scanned: int, replayed: int, at: str) -> ReplayPlan:
        return replace(self, progress={**self.progress, **progress}, scanned=self.scanned + scanned,
                       replayed=self.replayed + replayed, updated_at=at)

    def finished(self, *, at: str) -> ReplayPlan:
        return replace(self, status=PlanStatus.COMPLETED, phase="done", updated_at=at)

    def failed(self, error: str, *, at: str) -> ReplayPlan:
        return replace(self, status=PlanStatus.FAILED, phase="stopped", error=error[:500], updated_at=at)

    def cancelled(self, *, by: str, at: str) -> ReplayPlan:
        if self.status in TERMINAL:
            raise PlanError(f"plan {self.id} is already {self.status.value}")
        return replace(self, status=PlanStatus.CANCELLED, phase=f"cancelled by {by}", updated_at=at)


def new_plan(*, plan_id: str, tenant: str, from_ms: int, to_ms: int, sources: tuple[str, ...],
             throttle: float, ranges: dict[str, tuple[int, int]], estimate: dict[str, int],
             approval_threshold: int, at: str, held: bool) -> ReplayPlan:
    if held:
        raise PlanError(f"tenant {tenant} is under a legal hold: replays are blocked")
    if to_ms <= from_ms:
        raise PlanError("--to must be after --from")
    if throttle <= 0:
        raise PlanError("--throttle must be positive (records per second)")
    needs_approval = sum(estimate.values()) > approval_threshold
    return ReplayPlan(
        id=plan_id, tenant=tenant, from_ms=from_ms, to_ms=to_ms, sources=sources, throttle=throttle,
        ranges=ranges, estimate=estimate, needs_approval=needs_approval,
        status=PlanStatus.PENDING if needs_approval else PlanStatus.APPROVED,
        created_at=at, updated_at=at, phase="awaiting approval" if needs_approval else "planned")


def record_tenant(value: bytes | None) -> str | None:
    """The tenant of a source record's value, or None when it cannot be read."""
    try:
        tenant = orjson.loads(value or b"").get("tenant")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return tenant if isinstance(tenant, str) else None
