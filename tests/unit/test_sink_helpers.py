from urllib.parse import quote, unquote

from ingest_stream.sinks.typesense import document_id, searchable_text


def test_document_ids_are_reversible_and_filter_safe():
    for raw in ["doc-1", "odd/id with spaces,and:colons", "100%", "`tick`", "ünïcode"]:
        doc_id = document_id(f"acme-corp:{raw}")
        tenant, _, escaped = doc_id.partition(":")
        assert tenant == "acme-corp"
        assert unquote(escaped) == raw
        assert all(c.isalnum() or c in "._-%" for c in escaped), doc_id


def test_ids_quote_leaves_alone_are_kept_as_they_are():
    """The shortcut for ids with nothing to escape gives what quote() gives."""
    for raw in ["doc-1", "A.b_c-9~", "", "a b", "é", "x:y", "100%", "a\nb"]:
        assert document_id(f"t:{raw}") == f"t:{quote(raw, safe='._-')}"


def test_distinct_ids_never_collide():
    ids = ["a b", "a%20b", "a+b", "a/b", "a%2Fb"]
    assert len({document_id(f"t:{i}") for i in ids}) == len(ids)


def test_searchable_text_takes_strings_and_numbers_in_order():
    assert searchable_text({"title": "Report", "n": 3, "tags": ["q1", {"x": "deep"}], "ok": True}) == \
        "Report 3 q1 deep"


def test_graph_chunks_respect_rows_and_bytes():
    from ingest_stream.sinks.neo4j import chunk_rows

    rows = [{"id": f"r{i}", "pad": "x" * 100} for i in range(10)]
    assert [len(c) for c in chunk_rows(rows, max_rows=4)] == [4, 4, 2]
    by_bytes = chunk_rows(rows, max_rows=100, max_bytes=400)
    assert all(len(c) <= 3 for c in by_bytes)
    assert [r for c in by_bytes for r in c] == rows
    assert chunk_rows([{"big": "x" * 1000}], max_rows=5, max_bytes=100) == [[{"big": "x" * 1000}]]
