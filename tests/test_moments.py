"""ingest.moments.parse_utc: the ISO 8601 points in time the commands take."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from ingest.moments import parse_utc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-04", datetime(2026, 12, 4, tzinfo=UTC)),
        ("2026-12-04T10:30", datetime(2026, 12, 4, 10, 30, tzinfo=UTC)),
        ("2026-12-04T10:30:00Z", datetime(2026, 12, 4, 10, 30, tzinfo=UTC)),
        ("2026-12-04T10:30:00.5+00:00", datetime(2026, 12, 4, 10, 30, 0, 500000, tzinfo=UTC)),
        (
            "2026-12-04T12:30:00+02:00",
            datetime(2026, 12, 4, 12, 30, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_iso_dates_and_times_are_aware_and_utc_unless_they_say_otherwise(
    text: str, expected: datetime
) -> None:
    got = parse_utc(text)
    assert got == expected
    assert got.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "04/12/2026", "2h"])
def test_anything_else_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_utc(text)
