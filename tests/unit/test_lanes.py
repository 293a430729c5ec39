"""The lane rule (core/lanes.py): in process while the sink keeps up, spilled otherwise, and back
in process only once the sink topic holds nothing of this worker's partitions."""

from __future__ import annotations

import pytest

from ingest_stream.core.lanes import CpuShare, Lane, LaneMode, LanePolicy, shares

POLICY = LanePolicy(max_wait_s=2.0, switch_backlog=100)


def direct_lane(partitions: tuple[int, ...] = (0, 1)) -> Lane:
    lane = Lane(POLICY, now=0.0)
    lane.assign(partitions, now=0.0)
    lane.measured({p: 0 for p in partitions})
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=0.0) is LaneMode.DIRECT  # nothing to drain
    return lane


def test_a_lane_holds_new_batches_until_it_has_been_assigned_and_measured() -> None:
    lane = Lane(POLICY, now=0.0)
    assert lane.mode is LaneMode.SPILLING  # nothing known: nothing may be written in process
    lane.assign([0, 1], now=1.0)
    assert lane.backlog({}) is None
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=1.0) is LaneMode.SWITCHING
    assert "not measured yet" in lane.reason
    lane.measured({0: 5})  # partition 1 not measured yet
    assert lane.decide(sink_ok=True, head_wait_s=1.0, done={0: 5}, now=2.0) is LaneMode.SWITCHING
    lane.measured({1: 3})
    assert lane.decide(sink_ok=True, head_wait_s=1.1, done={0: 5}, now=2.1) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=1.2, done={0: 5, 1: 3}, now=2.2) is LaneMode.DIRECT


def test_a_lane_not_measured_in_time_spills_and_one_measured_with_a_backlog_drains_it() -> None:
    lane = Lane(POLICY, now=0.0)
    lane.assign([0], now=0.0)
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=0.0) is LaneMode.SWITCHING
    # The measurement is late (the broker): after max_wait_s the held batch spills, and holding is
    # tried again later, as after any failed switch.
    assert lane.decide(sink_ok=True, head_wait_s=1.9, done={}, now=1.9) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=2.1, done={}, now=2.1) is LaneMode.SPILLING
    assert "next try in 1s" in lane.reason
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=2.5) is LaneMode.SPILLING
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=3.2) is LaneMode.SWITCHING
    # Measured: more than a switch may wait for. Spill at once and drain it, no hold.
    lane.measured({0: 1000})
    assert lane.decide(sink_ok=True, head_wait_s=0.1, done={}, now=3.3) is LaneMode.SPILLING
    assert "1000 record(s) in its topic" in lane.reason
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 950}, now=3.4) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 1000}, now=3.5) is LaneMode.DIRECT


def test_a_lane_whose_sink_is_down_spills_without_holding_for_a_measurement() -> None:
    lane = Lane(POLICY, now=0.0)
    lane.assign([0], now=0.0)
    assert lane.decide(sink_ok=False, head_wait_s=0, done={}, now=0.0) is LaneMode.SPILLING


def test_a_failing_or_slow_sink_spills() -> None:
    lane = direct_lane()
    assert lane.decide(sink_ok=False, head_wait_s=0, done={}, now=1.0) is LaneMode.SPILLING
    lane = direct_lane()
    assert lane.decide(sink_ok=True, head_wait_s=1.9, done={}, now=1.0) is LaneMode.DIRECT
    assert lane.decide(sink_ok=True, head_wait_s=2.1, done={}, now=1.0) is LaneMode.SPILLING
    assert "waited" in lane.reason
    lane = direct_lane()
    lane.failed("connection refused", now=3.0)
    assert (lane.mode, lane.since) == (LaneMode.SPILLING, 3.0)


def test_a_lane_spills_when_it_holds_the_others_back_not_when_every_lane_is_busy() -> None:
    lane = direct_lane()
    # A backlog: every lane's oldest batch has waited about as long; spilling would add work.
    assert lane.decide(sink_ok=True, head_wait_s=3.0, behind_s=0.2, done={}, now=1.0) is LaneMode.DIRECT
    # This sink is slow: the others' batches are fresh (or their lanes idle), its own waits.
    assert lane.decide(sink_ok=True, head_wait_s=3.0, behind_s=2.5, done={}, now=1.0) is LaneMode.SPILLING
    assert "2.5s more than the other lanes'" in lane.reason


def test_a_slow_lane_stays_in_process_while_the_worker_has_no_cpu_to_spare() -> None:
    # CPU-bound (a backlog): the slowest lane is the pace, and a spill's extra produce, consume and
    # check would run on the same busy worker.
    lane = direct_lane()
    busy = LanePolicy().spill_busy_max
    assert lane.decide(sink_ok=True, head_wait_s=3.0, behind_s=2.5, busy=busy, done={}, now=1.0) \
        is LaneMode.DIRECT
    # The worker waits on the slow sink: spilling lets the other sinks go on.
    assert lane.decide(sink_ok=True, head_wait_s=3.0, behind_s=2.5, busy=busy - 0.1, done={}, now=1.0) \
        is LaneMode.SPILLING
    assert "of a core busy" in lane.reason
    # A failing sink spills however busy the worker is: its records cannot wait in process.
    lane = direct_lane()
    assert lane.decide(sink_ok=False, head_wait_s=0.0, busy=2.0, done={}, now=1.0) is LaneMode.SPILLING


def test_cpu_share_is_the_process_cpu_per_wall_second_over_each_window() -> None:
    clock, cpu = [0.0], [10.0]
    share = CpuShare(2.0, clock=lambda: clock[0], cpu=lambda: cpu[0])
    assert share.share() == 0.0  # no window has passed yet
    clock[0], cpu[0] = 1.0, 10.9
    assert share.share() == 0.0  # still within the first window
    clock[0], cpu[0] = 2.5, 12.0
    assert share.share() == 2.0 / 2.5
    clock[0], cpu[0] = 3.0, 13.0
    assert share.share() == 2.0 / 2.5  # kept until the next window ends
    clock[0], cpu[0] = 4.5, 13.0
    assert share.share() == 1.0 / 2.0


def test_switching_back_waits_for_what_was_spilled_to_be_written() -> None:
    lane = direct_lane()
    lane.failed("down", now=1.0)
    lane.spilled(0, 500)
    lane.spilled(1, 200)
    lane.spilled(0, 450)  # an earlier acknowledgement arriving late moves nothing back
    assert lane.need == {0: 500, 1: 200}
    # the sink answers, but 700 records are still in its topic: keep spilling
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 0, 1: 0}, now=2.0) is LaneMode.SPILLING
    # near the end: stop spilling, hold new batches until the sink agent has written the rest
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 450, 1: 200}, now=3.0) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=0.5, done={0: 499, 1: 200}, now=3.1) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=0.6, done={0: 500, 1: 200}, now=3.2) is LaneMode.DIRECT


def test_a_switch_that_takes_too_long_or_meets_a_failure_spills_again() -> None:
    lane = direct_lane()
    lane.failed("down", now=1.0)
    lane.spilled(0, 50)
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=2.0) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=0.4, done={0: 10}, now=2.4) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=0.6, done={0: 10}, now=2.6) is LaneMode.SPILLING
    assert "next try in 1s" in lane.reason
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 10}, now=4.6) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=False, head_wait_s=0, done={0: 10}, now=4.7) is LaneMode.SPILLING


def test_a_switch_counts_only_the_hold_it_made() -> None:
    """A batch that had waited in the queue before the switch began still gets the whole hold."""
    lane = direct_lane()
    lane.failed("down", now=1.0)
    lane.spilled(0, 50)
    assert lane.decide(sink_ok=True, head_wait_s=0.9, done={}, now=2.0) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=1.3, done={0: 10}, now=2.4) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=1.5, done={0: 10}, now=2.6) is LaneMode.SPILLING


def test_a_lane_whose_in_process_write_failed_does_not_switch_back_at_once() -> None:
    """One failure leaves the breaker closed (the sink looks fine): switching back at once held
    new batches for the spilled records, only to spill them when the next write failed too."""
    lane = direct_lane()
    lane.failed("connection reset", now=1.0)
    lane.spilled(0, 20)
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=1.5) is LaneMode.SPILLING
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=2.0) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=0.1, done={0: 20}, now=2.1) is LaneMode.DIRECT
    lane.failed("connection reset", now=3.0)  # back in process: the next failure waits 1 s again
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 20}, now=3.9) is LaneMode.SPILLING
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 20}, now=4.0) is LaneMode.DIRECT


def test_a_failed_switch_is_retried_later_and_later() -> None:
    """Each hold stops every lane's batches behind it: a sink agent that drains too slowly for a
    switch is not made to try again at once."""
    lane = direct_lane()
    lane.failed("down", now=0.0)
    lane.spilled(0, 50)
    now, waits = 1.0, []  # the first switch a second after the failure
    for _ in range(7):
        assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=now) is LaneMode.SWITCHING
        assert lane.decide(sink_ok=True, head_wait_s=0.6, done={}, now=now + 0.6) is LaneMode.SPILLING
        tried_at, now = now + 0.6, now + 0.7
        while lane.decide(sink_ok=True, head_wait_s=0, done={}, now=now) is LaneMode.SPILLING:
            now += 0.1
        waits.append(round(now - tried_at))
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 50}, now=now) is LaneMode.DIRECT
    lane.failed("down", now=now)
    lane.spilled(0, 60)
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 50}, now=now + 0.5) is LaneMode.SPILLING
    assert lane.decide(sink_ok=True, head_wait_s=0, done={0: 50}, now=now + 1) is LaneMode.SWITCHING  # reset


def test_a_sink_that_is_not_answering_keeps_its_lane_spilling() -> None:
    lane = direct_lane()
    lane.failed("down", now=1.0)
    assert lane.decide(sink_ok=False, head_wait_s=0, done={}, now=60.0) is LaneMode.SPILLING


def test_a_rebalance_drains_new_partitions_first_and_forgets_revoked_ones() -> None:
    lane = direct_lane((0, 1))
    lane.failed("down", now=1.0)
    lane.spilled(1, 40)
    lane.assign([0], now=2.0)  # partition 1 went to another worker, with its backlog
    assert lane.need == {0: 0}
    assert lane.decide(sink_ok=True, head_wait_s=0, done={}, now=2.0) is LaneMode.DIRECT
    lane.assign([0, 2], now=3.0)  # partition 2 came from another worker: what it spilled there first
    assert (lane.mode, lane.backlog({})) == (LaneMode.SPILLING, None)
    lane.measured({0: 9, 2: 70})
    assert lane.need == {0: 0, 2: 70}
    assert lane.decide(sink_ok=True, head_wait_s=0, done={2: 69}, now=3.0) is LaneMode.SWITCHING
    assert lane.decide(sink_ok=True, head_wait_s=0, done={2: 70}, now=3.0) is LaneMode.DIRECT


def test_the_same_assignment_again_changes_nothing() -> None:
    lane = direct_lane((0, 1))
    lane.assign([1, 0], now=5.0)
    assert lane.mode is LaneMode.DIRECT


@pytest.mark.parametrize("policy", [{"max_wait_s": 0}, {"switch_backlog": -1}, {"switch_wait_s": 0}])
def test_a_policy_that_cannot_work_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="max_wait_s"):
        LanePolicy(**policy)  # type: ignore[arg-type]


def test_mode_values_are_the_gauge() -> None:
    assert [int(m) for m in LaneMode] == [0, 1, 2]
    assert LaneMode.SWITCHING.label == "switching"


def test_shares_keep_each_entity_in_one_batch_in_order() -> None:
    items = [(f"t:{i % 7}", n) for n, i in enumerate(range(40))]  # 7 entities, several writes each
    batches = shares(items, key=lambda item: item[0], batch_size=10, parallel=4)
    assert 1 < len(batches) <= 4
    assert sorted(item for batch in batches for item in batch) == sorted(items)  # nothing lost or doubled
    for entity in {key for key, _ in items}:
        holding = [batch for batch in batches if any(key == entity for key, _ in batch)]
        assert len(holding) == 1
        assert [n for key, n in holding[0] if key == entity] == [n for key, n in items if key == entity]


def test_shares_write_a_small_batch_whole() -> None:
    items = [(f"t:{i}", i) for i in range(10)]
    assert shares(items, key=lambda item: item[0], batch_size=10, parallel=4) == [items]
    assert shares(items, key=lambda item: item[0], batch_size=3, parallel=1) == [items]
    assert shares([], key=lambda item: item[0], batch_size=3, parallel=4) == [[]]
