import pytest

from ingest_stream.core.timefmt import epoch_ms, is_rfc3339, parse_rfc3339


@pytest.mark.parametrize("text", [
    "2025-01-01T00:00:00Z", "2025-01-01t00:00:00z", "2024-02-29T23:59:59.123456789+05:30",
    "2025-06-30T12:00:00-00:00",
])
def test_valid_date_times(text):
    assert is_rfc3339(text)


@pytest.mark.parametrize("text", [
    "2025-13-01T00:00:00Z", "2025-02-30T00:00:00Z", "2023-02-29T00:00:00Z", "2025-01-01T24:00:00Z",
    "2025-01-01", "2025-01-01T00:00:00", "yesterday", "2025-01-01T00:00:00+25:00", "",
    "2025-01-01 00:00:00Z",
])
def test_invalid_date_times(text):
    assert not is_rfc3339(text)


def test_non_strings_are_left_to_the_type_keyword():
    assert is_rfc3339(42)


def test_offsets_are_honoured():
    assert epoch_ms("1970-01-01T01:00:00+01:00") == 0
    assert parse_rfc3339("2025-01-01T00:00:00.5Z").microsecond == 500000


@pytest.mark.parametrize("fraction", ["", ".1", ".12", ".123", ".1234", ".12345", ".123456", ".1234567"])
@pytest.mark.parametrize("moment", ["2025-01-01T00:00:00", "2024-02-29T23:59:59", "0002-01-01T00:00:00",
                                    "9998-12-31T23:59:59", "0001-01-01T00:00:00", "9999-12-31T23:59:59"])
def test_the_usual_form_reads_as_the_general_one(moment, fraction):
    """`Z` and `T` take a shorter path; it must give what the same instant as `+00:00` gives."""
    general = parse_rfc3339(f"{moment}{fraction}+00:00")
    usual = parse_rfc3339(f"{moment}{fraction}Z")
    assert (usual, usual.utcoffset()) == (general, general.utcoffset())


def test_the_usual_form_checks_the_calendar():
    for text in ("2023-02-29T00:00:00Z", "2025-01-01T24:00:00Z", "2025-01-01T00:00:60Z"):
        assert not is_rfc3339(text)
