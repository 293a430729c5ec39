"""core/reconcile.py: the sorted merge of the sinks' (id, revision, deleted) streams."""

from __future__ import annotations

import pytest

from ingest_stream.core.reconcile import (
    Diff,
    Entry,
    OutOfOrder,
    diff,
    merge_sorted,
    typesense_entry,
    window_end,
)


def e(entity_id: str, revision: int = 1, deleted: bool = False) -> Entry:
    return Entry(entity_id, revision, deleted)


def test_merge_yields_each_id_once_in_order_with_every_streams_view() -> None:
    merged = list(merge_sorted({"a": [e("1"), e("3")], "b": [e("2"), e("3", 2)], "c": []}))
    assert merged == [
        ("1", {"a": e("1"), "b": None, "c": None}),
        ("2", {"a": None, "b": e("2"), "c": None}),
        ("3", {"a": e("3"), "b": e("3", 2), "c": None}),
    ]


def test_merge_refuses_an_unsorted_or_repeating_stream() -> None:
    with pytest.raises(OutOfOrder):
        list(merge_sorted({"a": [e("2"), e("1")]}))
    with pytest.raises(OutOfOrder):
        list(merge_sorted({"a": [e("1"), e("1")]}))


def test_agreeing_sinks_have_no_mismatch() -> None:
    stream = [e("a"), e("b", 3, True), e("c", 2)]
    result = diff({"postgres": stream, "neo4j": list(stream), "typesense": iter(stream)})
    assert result.compared == 3 and result.mismatches == 0
    assert result.as_dict()["missing"] == {s: {"count": 0, "sample": []}
                                           for s in ("postgres", "neo4j", "typesense")}


def test_missing_revision_and_deletion_differences_are_counted_and_sampled() -> None:
    result = diff({
        "postgres": [e("a"), e("b", 2), e("c"), e("d")],
        "neo4j": [e("a"), e("b", 1), e("c", 1, True), e("d"), e("e")],
    })
    assert result.missing["postgres"].as_dict() == {"count": 1, "sample": ["e"]}
    assert result.missing["neo4j"].count == 0
    assert result.revision.sample == ["b"] and result.deleted.sample == ["c"]
    assert result.mismatches == 3 and result.compared == 5


def test_samples_are_bounded_but_counts_are_not() -> None:
    ids = [f"id-{n:05d}" for n in range(1000)]
    result = diff({"postgres": (e(i) for i in ids), "neo4j": iter(())}, limit=20)
    assert result.missing["neo4j"].count == 1000
    assert result.missing["neo4j"].sample == ids[:20]


def test_code_point_order_as_the_readers_sort() -> None:
    ids = sorted(["B", "a", "a b/ç%", "ä", "z", "Z9", "\u4e2d"])
    assert diff({"x": [e(i) for i in ids], "y": [e(i) for i in ids]}).mismatches == 0


def test_windows_fed_one_after_another_add_up() -> None:
    result = Diff(sinks=["postgres", "neo4j"])
    result.feed({"postgres": [e("a"), e("b")], "neo4j": [e("a")]})
    result.feed({"postgres": [e("c")], "neo4j": [e("c", 2)]})
    assert result.compared == 3 and result.missing["neo4j"].sample == ["b"]
    assert result.revision.sample == ["c"]


def test_window_end_is_the_smallest_last_id_of_a_full_page() -> None:
    assert window_end([[e("a"), e("d")], [e("b"), e("c")]], 2) == "c"
    assert window_end([[e("a"), e("d")], [e("b")]], 2) == "d"
    assert window_end([[e("a")], []], 2) is None


def test_typesense_holds_the_higher_of_document_and_tombstone() -> None:
    assert typesense_entry(e("a", 3), e("a", 2, True)) == e("a", 3)
    assert typesense_entry(e("a", 1), e("a", 2, True)) == e("a", 2, True)
    assert typesense_entry(None, e("a", 2, True)) == e("a", 2, True)
    assert typesense_entry(None, None) is None


def test_every_mismatched_id_is_a_suspect_to_read_again_up_to_the_limit() -> None:
    result = diff({"postgres": [e("a"), e("b", 2), e("c"), e("d")],
                   "neo4j": [e("a"), e("b", 1), e("c", 1, True), e("e")]})
    assert result.suspects == ["b", "c", "d", "e"] and not result.suspects_overflow
    bounded = Diff(sinks=["postgres", "neo4j"], recheck_limit=2)
    bounded.feed({"postgres": [e("a"), e("b"), e("c")], "neo4j": []})
    assert bounded.suspects == ["a", "b"] and bounded.suspects_overflow


def test_settled_keeps_only_what_still_disagrees_when_read_again() -> None:
    first = diff({"postgres": [e("a"), e("b", 2)], "neo4j": [e("a", 2), e("b", 1), e("c")]})
    assert first.mismatches == 3
    again = diff({"postgres": [e("a", 2), e("b", 2)], "neo4j": [e("a", 2), e("b", 1), e("c", 1)]})
    settled = first.settled(again)
    assert (settled.mismatches, settled.in_flight, settled.compared) == (2, 1, 3)
    assert settled.as_dict()["in_flight"] == 1 and settled.revision.sample == ["b"]
    too_many = Diff(sinks=["postgres", "neo4j"], recheck_limit=1)
    too_many.feed({"postgres": [e("a"), e("b")], "neo4j": []})
    assert too_many.settled(Diff(sinks=["postgres", "neo4j"])) is too_many  # the first look stands
