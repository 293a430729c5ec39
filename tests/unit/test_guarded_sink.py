"""GuardedSink's policy logic against an in-memory sink, a fake clock and a fake sleep."""

import asyncio
from collections.abc import Sequence

import pytest

from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.breaker import BreakerPolicy, CircuitBreaker, CircuitState
from ingest_stream.core.reasons import Reason
from ingest_stream.core.record import with_defaults
from ingest_stream.core.revision import Version
from ingest_stream.errors import SinkError
from ingest_stream.metrics import Metrics
from ingest_stream.sinks.base import Write
from ingest_stream.sinks.guarded import GuardedSink
from tests.dataset import v2


class MemorySink:
    """Holds versions in a dict; fails on demand."""

    name = "memory"

    def __init__(self) -> None:
        self.held: dict[str, Version] = {}
        self.calls = 0
        self.down = 0  # fail this many calls with CONNECTION_ERROR
        self.refuse: set[str] = set()  # entity keys refused with CONSTRAINT_VIOLATION
        self.hang = False

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def current_revisions(self, keys: Sequence[str]) -> dict[str, Version]:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            self.down -= 1
            raise SinkError(self.name, Reason.CONNECTION_ERROR, "refused")
        return {k: self.held[k] for k in keys if k in self.held}

    async def write(self, writes: Sequence[Write]) -> None:
        if any(w.key in self.refuse for w in writes):
            raise SinkError(self.name, Reason.CONSTRAINT_VIOLATION, "check constraint")
        for w in writes:
            self.held[w.key] = w.version


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def guarded(sink: MemorySink, time: FakeTime, policy: str = "hold", timeout_s: float = 5.0) -> GuardedSink:
    return GuardedSink(
        sink, metrics=Metrics(), backoff=BackoffPolicy(base_s=1.0, cap_s=8.0, max_attempts=4),
        failure_policy=policy, timeout_s=timeout_s,
        breaker=CircuitBreaker(BreakerPolicy(failure_threshold=3, open_s=30.0)),
        sleep=time.sleep, random=lambda: 1.0, clock=time.clock)


def writes(*revisions: tuple[str, int]) -> list[Write]:
    return [Write(with_defaults(v2("t", i, r))) for i, r in revisions]


async def test_retryable_failures_are_retried_with_backoff_until_success():
    sink, time = MemorySink(), FakeTime()
    sink.down = 2
    outcome = await guarded(sink, time).apply(writes(("a", 1), ("b", 1)))
    assert [w.key for w in outcome.applied] == ["t:a", "t:b"]
    assert time.slept == [1.0, 2.0]
    assert sink.held == {"t:a": Version(1), "t:b": Version(1)}


async def test_hold_waits_out_an_open_circuit_and_probes_it_closed():
    sink, time = MemorySink(), FakeTime()
    sink.down = 6
    guard = guarded(sink, time)
    outcome = await guard.apply(writes(("a", 1)))
    assert outcome.failed == [] and len(outcome.applied) == 1
    # 3 failures opened the circuit; calls while open never reached the sink
    assert sink.calls == 7
    assert time.now >= 30.0
    assert guard.breaker.state(time.now) is CircuitState.CLOSED


async def test_dlq_policy_fails_the_batch_after_the_attempts_with_the_last_reason():
    sink, time = MemorySink(), FakeTime()
    sink.down = 100
    outcome = await guarded(sink, time, policy="dlq").apply(writes(("a", 1), ("b", 1)))
    assert outcome.applied == []
    assert [(w.key, e.reason, n) for w, e, n in outcome.failed] == [
        ("t:a", Reason.CIRCUIT_OPEN, 4), ("t:b", Reason.CIRCUIT_OPEN, 4)]
    assert sink.calls == 3  # the fourth attempt found the circuit open
    assert all(e.retryable for _, e, _ in outcome.failed)


async def test_constraint_violation_is_isolated_and_not_retried():
    sink, time = MemorySink(), FakeTime()
    sink.refuse = {"t:b"}
    outcome = await guarded(sink, time).apply(writes(("a", 1), ("b", 1), ("c", 1)))
    assert sorted(w.key for w in outcome.applied) == ["t:a", "t:c"]
    assert [(w.key, e.reason, n) for w, e, n in outcome.failed] == [("t:b", Reason.CONSTRAINT_VIOLATION, 1)]
    assert time.slept == []  # never retried
    assert "t:b" not in sink.held


async def test_a_hung_sink_times_out_and_is_retried_then_dead_lettered():
    sink, time = MemorySink(), FakeTime()
    sink.hang = True
    outcome = await guarded(sink, time, policy="dlq", timeout_s=0.01).apply(writes(("a", 1)))
    assert [(e.reason, n) for _, e, n in outcome.failed] == [(Reason.CIRCUIT_OPEN, 4)]
    assert sink.calls == 3  # three timeouts (SINK_TIMEOUT), then the circuit was open


async def test_revision_rule_applies_through_the_guard():
    sink, time = MemorySink(), FakeTime()
    sink.held["t:a"] = Version(5)
    outcome = await guarded(sink, time).apply(writes(("a", 3), ("a", 5), ("a", 6)))
    assert [w.revision for w in outcome.older] == [3]
    assert [w.revision for w in outcome.skipped] == [5]
    assert [w.revision for w in outcome.applied] == [6]


@pytest.mark.parametrize("policy", ["hold", "dlq"])
async def test_circuit_state_is_exported(policy):
    sink, time = MemorySink(), FakeTime()
    sink.down = 3
    guard = guarded(sink, time, policy=policy)
    metrics = guard._metrics
    await guard.apply(writes(("a", 1)))
    opened = metrics.registry.get_sample_value(
        "ingest_circuit_transitions_total", {"sink": "memory", "state": "open"})
    assert opened == 1.0
    assert metrics.registry.get_sample_value("ingest_retry_total",
                                             {"sink": "memory", "reason": "CONNECTION_ERROR"}) == 3.0


async def test_older_writes_are_handed_over_before_anything_is_written_once_per_attempt():
    """Dead letters for older revisions must be durable before the newer ones land (a crash in
    between would hide them as history after a restart)."""
    sink, time = MemorySink(), FakeTime()
    sink.held["t:a"] = Version(5)
    sink.down = 1  # the first attempt fails before planning; the second plans and writes
    seen: list[tuple[list[int], int | None]] = []

    async def before_write(older):
        seen.append(([w.revision for w in older], sink.held["t:a"].revision))

    outcome = await guarded(sink, time).apply(writes(("a", 3), ("a", 6)), before_write=before_write)
    assert seen == [([3], 5)]  # handed over while the sink still held 5, not yet 6
    assert [w.revision for w in outcome.applied] == [6]
    assert [w.revision for w in outcome.older] == [3]
