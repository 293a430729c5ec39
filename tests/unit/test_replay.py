import pytest

from ingest_stream.core.replay import PlanError, PlanStatus, ReplayPlan, new_plan, record_tenant

AT = "2026-11-24T00:00:00.000Z"


def plan(estimate: int = 50, threshold: int = 100, held: bool = False) -> ReplayPlan:
    return new_plan(plan_id="rp-1", tenant="acme-corp", from_ms=1000, to_ms=2000, sources=("kafka", "s3"),
                    throttle=100, ranges={"ingest.source.kafka:0": (10, 20), "ingest.source.s3:1": (0, 5)},
                    estimate={"kafka": estimate}, approval_threshold=threshold, at=AT, held=held)


def test_a_small_plan_is_approved_at_once_a_large_one_waits_for_an_rfa():
    assert plan(50).status is PlanStatus.APPROVED
    large = plan(500)
    assert (large.status, large.needs_approval) == (PlanStatus.PENDING, True)
    with pytest.raises(PlanError, match="needs approval"):
        large.start(at=AT, held=False)
    with pytest.raises(PlanError, match="RFA"):
        large.approve("1234", by="ops", at=AT, held=False)
    approved = large.approve("RFA-1234", by="ops", at=AT, held=False)
    assert (approved.status, approved.rfa, approved.approved_by) == (PlanStatus.APPROVED, "RFA-1234", "ops")
    with pytest.raises(PlanError, match="not pending"):
        approved.approve("RFA-1", by="ops", at=AT, held=False)
    assert approved.start(at=AT, held=False).status is PlanStatus.RUNNING


def test_a_legal_hold_blocks_planning_approval_and_running():
    with pytest.raises(PlanError, match="legal hold"):
        plan(held=True)
    with pytest.raises(PlanError, match="legal hold"):
        plan(500).approve("RFA-1", by="ops", at=AT, held=True)
    with pytest.raises(PlanError, match="legal hold"):
        plan(50).start(at=AT, held=True)


def test_progress_shrinks_what_remains_and_a_failed_run_resumes():
    running = plan().start(at=AT, held=False)
    assert running.remaining == {"ingest.source.kafka:0": (10, 20), "ingest.source.s3:1": (0, 5)}
    moved = running.advanced({"ingest.source.kafka:0": 15}, scanned=5, replayed=2, at=AT)
    assert moved.remaining == {"ingest.source.kafka:0": (15, 20), "ingest.source.s3:1": (0, 5)}
    assert (moved.scanned, moved.replayed) == (5, 2)
    failed = moved.failed("killed", at=AT)
    resumed = failed.start(at=AT, held=False)
    assert resumed.status is PlanStatus.RUNNING and resumed.error is None
    assert resumed.remaining == moved.remaining
    done = resumed.advanced({"ingest.source.kafka:0": 20, "ingest.source.s3:1": 5}, scanned=0, replayed=0,
                            at=AT).finished(at=AT)
    assert done.remaining == {} and done.status is PlanStatus.COMPLETED
    with pytest.raises(PlanError, match="completed"):
        done.start(at=AT, held=False)
    with pytest.raises(PlanError, match="already"):
        done.cancelled(by="ops", at=AT)


def test_cancel_is_final():
    cancelled = plan().cancelled(by="ops", at=AT)
    assert cancelled.status is PlanStatus.CANCELLED
    with pytest.raises(PlanError, match="cancelled"):
        cancelled.start(at=AT, held=False)


def test_plans_round_trip_through_their_encoding():
    original = plan(500).approve("RFA-9", by="ops", at=AT, held=False).advanced(
        {"ingest.source.kafka:0": 12}, scanned=2, replayed=1, at=AT)
    assert ReplayPlan.decode(original.encode()) == original


@pytest.mark.parametrize(("bad", "message"), [({"to_ms": 1000}, "after"), ({"throttle": 0}, "throttle")])
def test_bad_ranges_and_throttles_are_refused(bad, message):
    arguments = {"plan_id": "rp", "tenant": "t", "from_ms": 1000, "to_ms": 2000, "sources": ("kafka",),
                 "throttle": 10, "ranges": {}, "estimate": {}, "approval_threshold": 1, "at": AT,
                 "held": False}
    with pytest.raises(PlanError, match=message):
        new_plan(**{**arguments, **bad})


def test_record_tenant_reads_what_it_can():
    assert record_tenant(b'{"tenant": "acme-corp", "id": "1"}') == "acme-corp"
    assert record_tenant(b"not json") is None
    assert record_tenant(b"[1, 2]") is None
    assert record_tenant(b'{"tenant": 7}') is None
    assert record_tenant(None) is None
