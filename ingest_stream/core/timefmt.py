"""RFC 3339 date-times: one checker shared by both validators, so their verdicts cannot diverge."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z"
)


@functools.lru_cache(maxsize=32768)
def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 date-time (calendar-checked) into an aware datetime; ValueError if not one.

    Cached: one record's times are parsed by the validator, the checkpoints, every sink's lag
    metric and its write in the same worker (datetimes are immutable). Up to 10,000 records are in
    flight between the first parse and the last (stream/app.py): the cache holds more (~6 MiB)."""
    match = _RFC3339.match(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time: {text[:64]!r}")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if offset == "Z" and text[10] == "T" and len(fraction or "") <= 7 and "0001" < year < "9999":
        # The usual form, which fromisoformat reads as it stands (half the time of the rest); the
        # years kept out are the ones whose instant may not exist in UTC.
        return datetime.fromisoformat(text)
    micros = int((fraction or ".0")[1:7].ljust(6, "0"))
    offset = "+00:00" if offset in ("Z", "z") else offset
    if int(offset[1:3]) > 23 or int(offset[4:6]) > 59:
        raise ValueError(f"bad UTC offset in {text[:64]!r}")
    # datetime() checks the calendar: month 13, 30 February and hour 24 raise ValueError.
    moment = datetime.fromisoformat(f"{year}-{month}-{day}T{hour}:{minute}:{second}.{micros:06d}{offset}")
    try:  # every sink stores the instant: it must exist in UTC (years 1..9999)
        moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text[:64]!r} is outside years 1..9999 in UTC") from None
    return moment


def is_rfc3339(value: object) -> bool:
    """The `date-time` format check (non-strings pass: the `type` keyword judges those)."""
    if not isinstance(value, str):
        return True
    try:
        parse_rfc3339(value)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=32768)
def epoch_ms(text: str) -> int:
    """Milliseconds since the epoch; cached as `parse_rfc3339` (each sink's lag metric asks too)."""
    return int(parse_rfc3339(text).timestamp() * 1000)


def format_rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
