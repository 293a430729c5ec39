"""GuardedSink's policy logic against an in-memory sink, a fake clock and a fake sleep."""

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

import pytest

from ingest_stream.core.backoff import BackoffPolicy
from ingest_stream.core.breaker import BreakerPolicy, CircuitBreaker, CircuitState
from ingest_stream.core.reasons import Reason
from ingest_stream.core.record import with_defaults
from ingest_stream.core.revision import Version
from ingest_stream.errors import SinkError
from ingest_stream.metrics import Metrics
from ingest_stream.sinks.base import Write
from ingest_stream.sinks.guarded import BatchOutcome, GuardedSink
from ingest_stream.sinks.split import LONE_ENTITY_HOLD_S
from tests.dataset import v2


class MemorySink:
    """Holds versions in a dict; fails on demand."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.held: dict[str, Version] = {}
        self.calls = 0
        self.down = 0  # fail this many calls with CONNECTION_ERROR
        self.refuse: set[str] = set()  # entity keys refused with CONSTRAINT_VIOLATION
        self.hang = False
        self.bad: dict[str, Reason] = {}  # entity keys whose write always fails with that reason
        self.hang_on: set[str] = set()  # entity keys whose write never answers
        self.bad_until: dict[str, float] = {}  # entity keys whose write fails until that time
        self.rate_limited = 0  # fail this many writes with RATE_LIMITED
        self.writes_down = 0  # fail this many writes with CONNECTION_ERROR (reads still answer)
        self.after_write: Callable[[], None] = lambda: None
        self.written: list[list[str]] = []  # the keys of each successful write, in order
        self.probes = 0
        self._clock = clock

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

    async def probe_write(self) -> None:
        """Fails as a write of no record would: the sink is down, hung or takes no writes."""
        self.calls += 1
        self.probes += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            self.down -= 1
            raise SinkError(self.name, Reason.CONNECTION_ERROR, "refused")
        if self.writes_down:
            self.writes_down -= 1
            raise SinkError(self.name, Reason.CONNECTION_ERROR, "read-only")

    async def write(self, writes: Sequence[Write]) -> None:
        keys = [w.key for w in writes]
        if any(k in self.hang_on for k in keys):
            await asyncio.Event().wait()
        if self.rate_limited:
            self.rate_limited -= 1
            raise SinkError(self.name, Reason.RATE_LIMITED, "429", retry_after_s=3.0)
        if self.writes_down:
            self.writes_down -= 1
            raise SinkError(self.name, Reason.CONNECTION_ERROR, "read-only")
        if any(k in self.refuse for k in keys):
            raise SinkError(self.name, Reason.CONSTRAINT_VIOLATION, "check constraint")
        for k in keys:
            if k in self.bad:
                raise SinkError(self.name, self.bad[k], f"{k} is too much")
            if self._clock() < self.bad_until.get(k, float("-inf")):
                raise SinkError(self.name, Reason.SINK_TIMEOUT, f"{k}: a blip")
        for w in writes:
            self.held[w.key] = w.version
        self.written.append(keys)
        self.after_write()


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


TEST_BREAKER = BreakerPolicy(failure_threshold=3, open_s=30.0)
PRODUCTION_BREAKER = BreakerPolicy()  # threshold 5, window 20, rate 0.5, min_calls 10


def guarded(sink: MemorySink, time: FakeTime, policy: str = "hold", timeout_s: float = 5.0,
            breaker: BreakerPolicy = TEST_BREAKER) -> GuardedSink:
    return GuardedSink(
        sink, metrics=Metrics(), backoff=BackoffPolicy(base_s=1.0, cap_s=8.0, max_attempts=4),
        failure_policy=policy, timeout_s=timeout_s, breaker=CircuitBreaker(breaker),
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
    # two whole attempts, then the third splits: each record on its own fails too (nothing was
    # written: the sink is down, nothing is dead-lettered as a record's own failure) and the
    # circuit opens; the fourth attempt finds it open. Two entities: no probe write.
    assert sink.calls == 4 and sink.probes == 0
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
    # two whole attempts time out; the third splits: the record alone and the probe write time out
    # too (the sink is down, not the record), the circuit opens; the fourth finds it open
    assert sink.calls == 4 and sink.probes == 1


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
    sink.down = 4  # two whole attempts, then the split's record alone and its probe write
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


# --- a record that fails on its own with a retryable error (issue 16) ---------------------------

def batch(n: int, *, tenant: str = "t", revision: int = 1) -> list[Write]:
    return [Write(with_defaults(v2(tenant, f"r{i:03}", revision)), origin_tp="ingest.sink.memory:0",
                  origin_offset=i) for i in range(n)]


def accounted_once(outcome: BatchOutcome, sent: list[Write]) -> bool:
    every = [*outcome.applied, *outcome.skipped, *outcome.older, *(w for w, _, _ in outcome.failed)]
    return sorted(map(id, every)) == sorted(map(id, sent))


def failures(outcome: BatchOutcome) -> list[tuple[str, Reason]]:
    return [(w.key, e.reason) for w, e, _ in outcome.failed]


@pytest.mark.parametrize("policy", ["hold", "dlq"])
async def test_a_record_that_always_times_out_fails_alone_and_the_rest_is_written(policy, caplog):
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:r137": Reason.SINK_TIMEOUT}
    sent = batch(500)
    guard = guarded(sink, time, policy=policy)
    with caplog.at_level(logging.WARNING):
        outcome = await guard.apply(sent)
    assert failures(outcome) == [("t:r137", Reason.SINK_TIMEOUT)]
    _, error, attempts = outcome.failed[0]
    assert error.retryable and attempts == 4  # two whole attempts, the split's, its own
    assert len(outcome.applied) == 499 and len(sink.held) == 499 and accounted_once(outcome, sent)
    # two whole attempts; the split: one record on its own (the sink is up), the rest, two halves
    # per level down to the bad record, its own attempt
    assert sink.calls <= 2 + 1 + 1 + 2 * 9 + 1
    assert guard.breaker.state(time.now) is CircuitState.CLOSED
    assert not guard.retrying and not guard.busy
    assert guard._metrics.registry.get_sample_value(
        "ingest_sink_splits_total", {"sink": "memory", "result": "done"}) == 1.0
    text = caplog.text  # what an operator reads at 3 a.m.
    assert "a batch of 500 record(s) keeps failing" in text
    assert "t:r137 (ingest.sink.memory[0]@137) fails on its own" in text
    assert "499 written or skipped, 1 failed on their own: t:r137 (ingest.sink.memory[0]@137) SINK_TIMEOUT" \
        in text


async def test_a_record_whose_write_hangs_is_timed_out_and_isolated():
    sink, time = MemorySink(), FakeTime()
    sink.hang_on = {"t:r005"}
    sent = batch(12)
    outcome = await guarded(sink, time, timeout_s=0.002).apply(sent)
    assert failures(outcome) == [("t:r005", Reason.SINK_TIMEOUT)]
    assert "no answer in 0.002s" in str(outcome.failed[0][1])
    assert len(sink.held) == 11 and accounted_once(outcome, sent)


async def test_two_bad_records_in_different_halves():
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:r010": Reason.SINK_TIMEOUT, "t:r400": Reason.CONNECTION_ERROR}
    sent = batch(500)
    outcome = await guarded(sink, time, breaker=PRODUCTION_BREAKER).apply(sent)
    assert sorted(failures(outcome)) == [("t:r010", Reason.SINK_TIMEOUT), ("t:r400", Reason.CONNECTION_ERROR)]
    assert len(sink.held) == 498 and accounted_once(outcome, sent)


@pytest.mark.parametrize("seed", range(40))
async def test_any_bad_records_anywhere_are_found(seed):
    rng = random.Random(seed)
    sink, time = MemorySink(), FakeTime()
    size = rng.randint(2, 200)
    bad = {f"t:r{i:03}" for i in rng.sample(range(size), k=min(size - 1, rng.randint(1, 8)))}
    if seed % 4 == 0:  # a run of them, as one producer's burst
        start = rng.randrange(size)
        bad |= {f"t:r{i:03}" for i in range(start, min(size - 1, start + 12))}
    sink.bad = dict.fromkeys(bad, Reason.SINK_TIMEOUT)
    sent = batch(size)
    guard = GuardedSink(
        sink, metrics=Metrics(), backoff=BackoffPolicy(base_s=1.0, cap_s=8.0, max_attempts=4),
        failure_policy="hold", timeout_s=5.0, breaker=CircuitBreaker(PRODUCTION_BREAKER),
        sleep=time.sleep, random=rng.random, clock=time.clock)
    outcome = await guard.apply(sent)
    assert {k for k, _ in failures(outcome)} == bad
    assert set(sink.held) == {w.key for w in sent} - bad and accounted_once(outcome, sent)
    assert guard.breaker.state(time.now) is CircuitState.CLOSED


async def test_a_run_of_bad_records_is_found_in_one_split():
    sink, time = MemorySink(), FakeTime()
    sink.bad = {f"t:r{i:03}": Reason.CONNECTION_ERROR for i in range(200, 216)}
    sent = batch(500)
    outcome = await guarded(sink, time, breaker=PRODUCTION_BREAKER).apply(sent)
    assert [k for k, _ in failures(outcome)] == [f"t:r{i:03}" for i in range(200, 216)]
    assert len(sink.held) == 484 and accounted_once(outcome, sent)
    assert len(time.slept) == 3  # two backoffs and the suspects' pause: one split did it


async def test_a_sink_that_goes_down_during_a_split_dead_letters_nothing_more():
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:r300": Reason.SINK_TIMEOUT}
    sent = batch(500)

    def going_down() -> None:
        if len(sink.written) == 3:  # a few parts written, then every call fails for a while
            sink.down = 25

    sink.after_write = going_down
    outcome = await guarded(sink, time, breaker=PRODUCTION_BREAKER).apply(sent)
    assert failures(outcome) == [("t:r300", Reason.SINK_TIMEOUT)]  # found once it was back
    assert len(sink.held) == 499 and accounted_once(outcome, sent)


async def test_a_sink_that_reads_but_cannot_write_is_down_not_a_batch_of_bad_records():
    """Parts that write nothing (revisions already held: a redelivery) prove nothing."""
    sink, time = MemorySink(), FakeTime()
    sent = batch(60)
    for w in sent[:40]:
        sink.held[w.key] = w.version
    sink.writes_down = 40
    outcome = await guarded(sink, time, breaker=PRODUCTION_BREAKER).apply(sent)
    assert outcome.failed == [] and accounted_once(outcome, sent)
    assert len(outcome.applied) == 20 and len(outcome.skipped) == 40


async def test_a_down_sink_under_hold_is_waited_out_with_a_bounded_split_per_attempt():
    sink, time = MemorySink(), FakeTime()
    sink.down = 40
    sent = batch(500)
    guard = guarded(sink, time, breaker=PRODUCTION_BREAKER)
    outcome = await guard.apply(sent)
    assert outcome.failed == [] and len(outcome.applied) == 500 and accounted_once(outcome, sent)
    metrics = guard._metrics
    assert metrics.registry.get_sample_value(
        "ingest_circuit_transitions_total", {"sink": "memory", "state": "open"}) >= 1.0
    # each split of a down sink stops after 4 parts; an open circuit lets one probe split through
    # per period: about 2 + 4 calls, then 4 per open period, not hundreds
    assert sink.calls <= 40 + 2 * 9 + 2
    assert time.now >= 30.0  # it waited out the open circuit
    assert metrics.registry.get_sample_value(
        "ingest_sink_splits_total", {"sink": "memory", "result": "stopped"}) >= 1.0


async def test_a_down_sink_under_dlq_fails_the_batch_after_the_attempts_in_few_calls():
    sink, time = MemorySink(), FakeTime()
    sink.down = 10_000
    sent = batch(500)
    outcome = await guarded(sink, time, policy="dlq", breaker=PRODUCTION_BREAKER).apply(sent)
    assert outcome.applied == [] and accounted_once(outcome, sent)
    assert {(e.reason, n) for _, e, n in outcome.failed} == {(Reason.CIRCUIT_OPEN, 4)}
    assert all(e.retryable for _, e, _ in outcome.failed)
    assert sink.calls == 2 + 4  # two whole attempts, one split stopped after four parts; then open


async def test_the_retrying_flag_is_up_only_while_waiting_out_the_sink():
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:r003": Reason.SINK_TIMEOUT}
    guard = guarded(sink, time)
    seen: list[bool] = []
    sleep = time.sleep

    async def watching(seconds: float) -> None:
        seen.append((guard.retrying, guard.health()["splitting"]))
        await sleep(seconds)

    guard._sleep = watching
    await guard.apply(batch(8))
    # two backoffs, then the suspect's pause in the split: the sink is up, nothing is waited out
    assert seen == [(True, False), (True, False), (False, True)]
    assert not guard.splitting and not guard.retrying


async def test_under_dlq_a_batch_is_split_before_it_is_given_up_even_with_two_attempts():
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:r002": Reason.CONNECTION_ERROR}
    guard = GuardedSink(
        sink, metrics=Metrics(), backoff=BackoffPolicy(base_s=1.0, cap_s=8.0, max_attempts=2),
        failure_policy="dlq", timeout_s=5.0, breaker=CircuitBreaker(TEST_BREAKER),
        sleep=time.sleep, random=lambda: 1.0, clock=time.clock)
    outcome = await guard.apply(batch(9))
    assert failures(outcome) == [("t:r002", Reason.CONNECTION_ERROR)]
    assert [n for _, _, n in outcome.failed] == [3]  # one whole attempt, the split's, its own
    assert len(sink.held) == 8


async def test_a_transient_blip_on_one_record_does_not_dead_letter_it():
    time = FakeTime()
    sink = MemorySink(clock=time.clock)
    sink.bad_until = {"t:r002": 4.5}  # after the two backoffs (1 s, 2 s), before its own attempt
    sent = batch(6)
    outcome = await guarded(sink, time).apply(sent)
    assert outcome.failed == [] and len(sink.held) == 6 and accounted_once(outcome, sent)


async def test_the_breaker_does_not_open_on_legitimate_splits_yet_opens_on_an_outage():
    sink, time = MemorySink(), FakeTime()
    guard = guarded(sink, time, breaker=PRODUCTION_BREAKER)
    for n in range(6):  # batches, each with a record that fails on its own, small ones too
        sink.bad = {f"b{n}:r000": Reason.SINK_TIMEOUT}
        outcome = await guard.apply(batch(500 if n % 2 else 2, tenant=f"b{n}"))
        assert failures(outcome) == [(f"b{n}:r000", Reason.SINK_TIMEOUT)]
        assert guard.breaker.state(time.now) is CircuitState.CLOSED
    opened = {"sink": "memory", "state": "open"}
    assert guard._metrics.registry.get_sample_value("ingest_circuit_transitions_total", opened) is None
    sink.bad, sink.down = {}, 6  # two whole attempts and a split's four parts: an outage
    outcome = await guard.apply(batch(500, tenant="outage"))
    assert outcome.failed == [] and len(outcome.applied) == 500
    assert guard._metrics.registry.get_sample_value("ingest_circuit_transitions_total", opened) == 1.0


async def test_a_bad_record_held_through_an_outage_does_not_stop_the_batch_after_it():
    """The circuit opened while the batch was held; a whole-batch probe would fail on the bad
    record forever, a split of it finds the sink up."""
    sink, time = MemorySink(), FakeTime()
    sink.down, sink.bad = 12, {"t:r020": Reason.CONNECTION_ERROR}
    sent = batch(64)
    guard = guarded(sink, time, breaker=PRODUCTION_BREAKER)
    outcome = await guard.apply(sent)
    assert failures(outcome) == [("t:r020", Reason.CONNECTION_ERROR)]
    assert len(sink.held) == 63 and accounted_once(outcome, sent)
    assert time.now >= 30.0 and guard.breaker.state(time.now) is CircuitState.CLOSED


async def test_a_rate_limit_during_a_split_is_waited_out_not_blamed_on_a_record(caplog):
    sink, time = MemorySink(), FakeTime()
    sink.down = 2  # two whole attempts fail; the split's first part is rate limited
    sink.rate_limited = 1
    sink.bad = {"t:r004": Reason.SINK_TIMEOUT}
    sent = batch(10)
    with caplog.at_level(logging.WARNING):
        outcome = await guarded(sink, time).apply(sent)
    assert failures(outcome) == [("t:r004", Reason.SINK_TIMEOUT)]
    assert len(sink.held) == 9 and accounted_once(outcome, sent)
    assert "a part of 1 record(s) of a split met RATE_LIMITED; waiting 4.00s" in caplog.text
    assert time.slept[:3] == [1.0, 2.0, 4.0]  # the sink's retry-after (3 s) is a floor


async def test_an_open_circuit_during_a_split_stops_it_and_never_dead_letters_a_suspect():
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:r001": Reason.SINK_TIMEOUT}
    guard = guarded(sink, time)
    sleep = time.sleep

    async def opening_the_circuit_once(seconds: float) -> None:
        if not guard.retrying and not opened:  # the suspects' pause: another caller opens it
            opened.append(True)
            for _ in range(3):
                guard.breaker.record_failure(time.now)
        await sleep(seconds)

    opened: list[bool] = []
    guard._sleep = opening_the_circuit_once
    sent = batch(6)
    outcome = await guard.apply(sent)
    assert opened and failures(outcome) == [("t:r001", Reason.SINK_TIMEOUT)]
    assert len(sink.held) == 5 and accounted_once(outcome, sent)
    assert time.now >= 30.0  # the open circuit was waited out, then the suspect tried again


async def test_a_refused_record_and_a_timing_out_one_in_one_batch_both_fail_alone():
    """A refusal splits at once; a record that times out on its own must not then hold the
    partition forever (it used to be retried alone under `hold`)."""
    sink, time = MemorySink(), FakeTime()
    sink.refuse, sink.bad = {"t:r001"}, {"t:r006": Reason.SINK_TIMEOUT}
    sent = batch(8)
    outcome = await guarded(sink, time).apply(sent)
    assert sorted(failures(outcome)) == [("t:r001", Reason.CONSTRAINT_VIOLATION),
                                         ("t:r006", Reason.SINK_TIMEOUT)]
    assert [n for w, _, n in outcome.failed if w.key == "t:r001"] == [1]
    assert len(sink.held) == 6 and accounted_once(outcome, sent)


async def test_an_older_revision_in_a_split_batch_is_reported_once_and_before_its_entity_moves():
    sink, time = MemorySink(), FakeTime()
    sent = batch(40)
    stale = Write(with_defaults(v2("t", "r007", 3)))
    newer = Write(with_defaults(v2("t", "r007", 9)))
    sent[20:20] = [stale, newer]  # r007: 1 (held below as 5), 3 (older), 9
    sink.held["t:r007"] = Version(5)
    sink.bad = {"t:r030": Reason.SINK_TIMEOUT}  # in a part with r007 for the first attempts
    handed: list[tuple[int, int]] = []

    async def before_write(older: list[Write]) -> None:
        handed.extend((w.revision, sink.held["t:r007"].revision) for w in older)

    outcome = await guarded(sink, time).apply(sent, before_write=before_write)
    assert sorted(handed) == [(1, 5), (3, 5)]  # each once, while the sink still held 5
    assert sorted(w.revision for w in outcome.older) == [1, 3] and accounted_once(outcome, sent)
    assert sink.held["t:r007"] == Version(9) and failures(outcome) == [("t:r030", Reason.SINK_TIMEOUT)]


async def test_one_entitys_writes_are_split_in_batch_order():
    sink, time = MemorySink(), FakeTime()
    sent = [Write(with_defaults(v2("t", "a", r))) for r in (1, 2, 3, 4)]
    sink.refuse = {"t:a"}  # every write of it refused: the split cuts it in order, never reorders
    outcome = await guarded(sink, time).apply(sent)
    # the plan writes only an entity's newest revision: each part of one entity fails as one
    assert [(w.revision, e.reason) for w, e, _ in outcome.failed] == [
        (1, Reason.CONSTRAINT_VIOLATION), (2, Reason.CONSTRAINT_VIOLATION),
        (3, Reason.CONSTRAINT_VIOLATION), (4, Reason.CONSTRAINT_VIOLATION)]
    assert accounted_once(outcome, sent)


async def test_a_lone_record_that_always_times_out_is_dead_lettered_once_the_probe_write_goes_through():
    """Alone in its batch (a quiet stream), a bad record has no sibling to show the sink up: the
    sink's own probe write does, and the record fails alone instead of holding the sink forever."""
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:a": Reason.SINK_TIMEOUT}
    guard = guarded(sink, time, policy="hold")
    outcome = await guard.apply(writes(("a", 1)))
    assert failures(outcome) == [("t:a", Reason.SINK_TIMEOUT)]
    assert outcome.applied == [] and sink.probes >= 2
    assert time.now >= LONE_ENTITY_HOLD_S  # held that long first: a lock on the records looks alike
    assert guard.breaker.state(time.now) is CircuitState.CLOSED  # a record's failure, not the sink's


async def test_a_lone_record_on_a_sink_that_takes_no_writes_is_held_not_dead_lettered():
    sink, time = MemorySink(), FakeTime()
    sink.writes_down = 12  # reads answer, writes (the probe's too) fail, then the sink recovers
    guard = guarded(sink, time, policy="hold")
    outcome = await guard.apply(writes(("a", 1)))
    assert outcome.failed == [] and [w.key for w in outcome.applied] == ["t:a"]
    assert sink.probes >= 1 and sink.writes_down == 0


async def test_records_that_all_fail_while_the_probe_write_goes_through_are_held_under_hold():
    """A lock on the records alone (the probe writes elsewhere): under hold, nothing is dead-
    lettered; the batch is written once the lock is gone."""
    time = FakeTime()
    sink = MemorySink(time.clock)
    sent = batch(40)
    sink.bad_until = {w.key: 120.0 for w in sent}
    outcome = await guarded(sink, time, policy="hold", breaker=PRODUCTION_BREAKER).apply(sent)
    assert outcome.failed == [] and len(outcome.applied) == 40 and time.now >= 120.0


async def test_a_lone_record_under_dlq_is_dead_lettered_after_one_round():
    sink, time = MemorySink(), FakeTime()
    sink.bad = {"t:a": Reason.CONNECTION_ERROR}
    outcome = await guarded(sink, time, policy="dlq").apply(writes(("a", 1)))
    assert failures(outcome) == [("t:a", Reason.CONNECTION_ERROR)] and sink.probes == 1


# --- the in-process lane: an outage is spilled, not waited out (stream/lanes.py) -----------------

@pytest.mark.parametrize("policy", ["hold", "dlq"])
async def test_spill_when_down_returns_the_batch_unwritten_without_waiting(policy):
    sink, time = MemorySink(), FakeTime()
    sink.down = 1
    outcome = await guarded(sink, time, policy=policy).apply(writes(("a", 1), ("b", 1)), spill_when_down=True)
    assert [w.key for w in outcome.unwritten] == ["t:a", "t:b"]
    assert (outcome.applied, outcome.failed, time.slept) == ([], [], [])  # no retry, no dead letter
    assert sink.held == {}


async def test_spill_when_down_reports_writes_already_dead_lettered_as_older_not_unwritten():
    sink, time = MemorySink(), FakeTime()
    sink.held["t:a"] = Version(5)
    sink.writes_down = 1  # the revisions are read (3 is older: handed over), then the write fails
    handed: list[int] = []

    async def before_write(older):
        handed.extend(w.revision for w in older)

    outcome = await guarded(sink, time).apply(writes(("a", 3), ("b", 1)), before_write=before_write,
                                              spill_when_down=True)
    assert handed == [3]
    assert [w.revision for w in outcome.older] == [3]  # its letter is out: never spilled again
    assert [w.key for w in outcome.unwritten] == ["t:b"]


async def test_spill_when_down_still_isolates_a_record_the_sink_refuses():
    sink, time = MemorySink(), FakeTime()
    sink.refuse = {"t:b"}
    outcome = await guarded(sink, time).apply(writes(("a", 1), ("b", 1), ("c", 1)), spill_when_down=True)
    assert sorted(w.key for w in outcome.applied) == ["t:a", "t:c"]
    assert [(w.key, e.reason) for w, e, _ in outcome.failed] == [("t:b", Reason.CONSTRAINT_VIOLATION)]
    assert outcome.unwritten == []


async def test_spill_when_down_meets_an_open_circuit_without_calling_the_sink():
    sink, time = MemorySink(), FakeTime()
    guard = guarded(sink, time)
    for _ in range(3):
        guard.breaker.record_failure(time.clock())
    outcome = await guard.apply(writes(("a", 1)), spill_when_down=True)
    assert [w.key for w in outcome.unwritten] == ["t:a"] and sink.calls == 0
