from hypothesis import given, settings
from hypothesis import strategies as st

from ingest_stream.core.revision import RevisionDecision, Version, decide, plan_batch

A = "src:0"


def test_decisions():
    assert decide(None, Version(0), may_rewrite_equal=False) is RevisionDecision.APPLY
    assert decide(Version(3), Version(4), may_rewrite_equal=False) is RevisionDecision.APPLY
    assert decide(Version(3), Version(3), may_rewrite_equal=False) is RevisionDecision.NOOP
    assert decide(Version(3), Version(2), may_rewrite_equal=False) is RevisionDecision.OLDER


def test_redrive_and_replay_may_rewrite_equal_never_older():
    assert decide(Version(3), Version(3), may_rewrite_equal=True) is RevisionDecision.APPLY
    assert decide(Version(3), Version(2), may_rewrite_equal=True) is RevisionDecision.OLDER


def test_older_from_before_the_held_revision_in_the_same_partition_is_superseded_history():
    held = Version(5, A, 100)
    assert decide(held, Version(4, A, 90), may_rewrite_equal=False) is RevisionDecision.SUPERSEDED
    assert decide(held, Version(4, A, 110), may_rewrite_equal=False) is RevisionDecision.OLDER
    assert decide(held, Version(4, "src:1", 90), may_rewrite_equal=False) is RevisionDecision.OLDER
    assert decide(held, Version(4), may_rewrite_equal=False) is RevisionDecision.OLDER
    assert decide(Version(5), Version(4, A, 1), may_rewrite_equal=False) is RevisionDecision.OLDER


def _plan(items, held):
    return plan_batch(items, held, key=lambda i: i[0], version=lambda i: Version(i[1], A, i[2]),
                      may_rewrite_equal=lambda i: False)


def test_batch_keeps_the_newest_per_entity_and_rejects_what_arrives_late():
    items = [("a", 1, 10), ("b", 1, 11), ("a", 3, 12), ("a", 2, 13), ("b", 1, 14), ("c", 0, 15)]
    plan = _plan(items, {"b": Version(0, A, 1)})
    assert plan.apply == [("a", 3, 12), ("b", 1, 11), ("c", 0, 15)]
    assert plan.older == [("a", 2, 13)]
    assert sorted(plan.skip) == [("a", 1, 10), ("b", 1, 14)]


def test_batch_against_held_state():
    plan = _plan([("a", 1, 50), ("a", 7, 51), ("b", 2, 52)], {"a": Version(5, A, 40), "b": Version(2, A, 30)})
    assert plan.apply == [("a", 7, 51)]
    assert plan.older == [("a", 1, 50)]
    assert plan.skip == [("b", 2, 52)]


def test_redelivered_history_after_a_crash_is_not_rejected():
    # rev 3 (offset 10) and rev 4 (offset 11) were applied before a crash; both come again.
    plan = _plan([("a", 3, 10), ("a", 4, 11)], {"a": Version(4, A, 11)})
    assert plan.older == []
    assert plan.apply == []
    assert plan.skip == [("a", 3, 10), ("a", 4, 11)]


def test_an_older_revision_a_replay_resends_is_history_skipped_never_dead_lettered():
    held = Version(5, A, 40)
    assert decide(held, Version(3, A, 90), may_rewrite_equal=True, replayed=True) is RevisionDecision.REPLAYED
    assert decide(held, Version(3, A, 90), may_rewrite_equal=True) is RevisionDecision.OLDER
    assert decide(held, Version(7, A, 90), may_rewrite_equal=True, replayed=True) is RevisionDecision.APPLY
    items = [("a", 3, 90), ("b", 1, 91)]
    plan = plan_batch(items, {"a": held, "b": Version(4, A, 41)}, key=lambda i: i[0],
                      version=lambda i: Version(i[1], A, i[2]), may_rewrite_equal=lambda _: True,
                      replayed=lambda i: i[0] == "a")
    assert plan.skip == [("a", 3, 90)] and plan.older == [("b", 1, 91)] and plan.apply == []


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 4), st.integers(0, 50),
                                st.booleans()), max_size=12),
       held=st.dictionaries(st.sampled_from("abc"), st.tuples(st.integers(0, 4), st.integers(0, 50))))
def test_a_batch_ends_where_its_writes_one_by_one_would(items, held):
    """The plan against the writes decided and applied one at a time, in order."""
    versions = {e: Version(r, A, o) for e, (r, o) in held.items()}
    plan = plan_batch(items, versions, key=lambda i: i[0], version=lambda i: Version(i[1], A, i[2]),
                      may_rewrite_equal=lambda i: i[3])
    state = dict(versions)
    applied: dict[str, tuple] = {}
    older = []
    for item in items:
        decision = decide(state.get(item[0]), Version(item[1], A, item[2]), may_rewrite_equal=item[3])
        if decision is RevisionDecision.APPLY:
            state[item[0]] = Version(item[1], A, item[2])
            applied[item[0]] = item
        elif decision is RevisionDecision.OLDER:
            older.append(item)
    assert {i[0]: i for i in plan.apply} == applied
    assert plan.older == older
    assert len(plan.apply) + len(plan.skip) + len(plan.older) == len(items)
