"""Event digests grouped by UTC day: what the decode pool hands the integrity chain (a pure leaf
module; see docs/integrity.md, "Links").

An event's digest is the SHA-256 of its canonical encoding (its COPY line); a chain link counts
and hashes them per UTC day, the unit retention removes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import Any

DIGEST_SIZE = 32


def utc_date(stamp: datetime) -> date:
    """The UTC date of a time (a naive time is taken as UTC)."""
    offset = stamp.utcoffset()
    return (stamp - offset).date() if offset else stamp.date()


def event_day(log_time: datetime | None) -> str:
    """The UTC day of an event (the unit retention removes), or "none"."""
    if log_time is None:
        return "none"
    return utc_date(log_time).isoformat()  # YYYY-MM-DD, the year padded to four digits


class DayDigests:
    """Event digests grouped by UTC day, in the order they are added (sequence order)."""

    def __init__(self) -> None:
        self.by_day: dict[str, bytearray] = {}

    def add(self, day: str, digest: bytes) -> None:
        digests = self.by_day.get(day)
        if digests is None:
            self.by_day[day] = bytearray(digest)
        else:
            digests.extend(digest)

    def extend(self, chains: Iterable[Mapping[str, bytes]]) -> None:
        for chain in chains:
            for day, digests in chain.items():
                self.by_day.setdefault(day, bytearray()).extend(digests)

    def packed(self) -> dict[str, bytes]:
        """What crosses the process pool: day -> concatenated 32-byte digests."""
        return {day: bytes(digests) for day, digests in self.by_day.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        """The link's ``days``: count and SHA-256 of the concatenated digests, per day."""
        return {
            day: {"n": len(digests) // DIGEST_SIZE, "sha256": hashlib.sha256(digests).hexdigest()}
            for day, digests in sorted(self.by_day.items())
        }

    @property
    def count(self) -> int:
        return sum(len(d) // DIGEST_SIZE for d in self.by_day.values())
