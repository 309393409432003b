"""Points in time as the commands take them: ISO 8601, in UTC unless they name an offset."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_utc(text: str) -> datetime:
    """An ISO 8601 date or time (``2026-12-04``, ``2026-12-04T10:00``, ``...Z``, ``...+02:00``)
    as an aware datetime; one without an offset is UTC. Raises ValueError for anything else."""
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)
