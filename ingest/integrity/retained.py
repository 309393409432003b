"""Which vanished days retention accounts for, for ``verify`` (see docs/integrity.md).

das.retention_log is written by ``das-ingest retention``, but a superuser can write it too, so a
record is only believed when it is consistent with the chains and with the retention policy:

- it does not lie in the future, and it removed nothing newer than the retention period allows
  (the policy given to ``verify --retention-keep``, else the period the record says it ran with);
- its ``rows_removed`` equals the events the chains hold for the days it covers, among the links
  written before it (each such link's day is claimed by the earliest record covering the day
  that was written after the link: retention only removes what was there);
- and ``verify`` also holds each chain to retention's order: a day is only removed with every
  older day of the chain (checked where the events are recomputed).

A record that fails is reported (``retention_invalid``) and removes nothing: the days it claims
are reported as deleted.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import orjson

from ingest.conn import Conn

#: A retention record may be this far ahead of the verifier's clock (clock skew).
FUTURE_TOLERANCE = timedelta(minutes=10)


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def parse_day(day: str) -> date | None:
    """A link's day key as a date; None for "none" (events without a time: never retained)."""
    if day == "none":
        return None
    try:
        return date.fromisoformat(day)
    except ValueError:
        return None


@dataclass
class RetentionRecord:
    id: int
    partition: str
    start: datetime | None
    end: datetime | None
    rows: int
    removed_at: datetime
    keep: timedelta | None
    #: why the record is not believed (None: it is)
    problem: str | None = None
    #: events of the chains this record accounts for
    claimed: int = 0
    #: where the days it removed were archived (das-ingest archive), None: not archived
    archive: list[dict[str, Any]] | None = None

    def archived_at(self, day: str) -> list[str]:
        """The manifests the record names for ``day``."""
        return [str(a.get("manifest")) for a in self.archive or () if a.get("day") == day]

    def covers(self, day: date) -> bool:
        lo = day_start(day)
        return (
            (self.start is None or self.start <= lo)
            and self.end is not None
            and lo + timedelta(days=1) <= self.end
        )

    def describe(self) -> str:
        span = f"{self.start.isoformat() if self.start else '-inf'} .. {self.end}"
        return (
            f"retention record {self.id} ({self.partition}, {span}, {self.rows} rows, "
            f"removed at {self.removed_at.isoformat()})"
        )


class RetentionLedger:
    def __init__(
        self, records: list[RetentionRecord], *, policy_keep: timedelta | None, now: datetime
    ) -> None:
        self.records = sorted(records, key=lambda r: (r.removed_at, r.id))
        self.policy_keep = policy_keep
        self.now = now
        self._static_rules()
        believable = [r for r in self.records if r.problem is None]
        self._by_day: dict[date, list[RetentionRecord]] = {}
        self._ranges: list[RetentionRecord] = []
        for record in believable:  # in removal order
            if record.start is not None and record.end == record.start + timedelta(days=1):
                self._by_day.setdefault(record.start.astimezone(UTC).date(), []).append(record)
            else:
                self._ranges.append(record)
        self._range_times = [r.removed_at for r in self._ranges]

    @classmethod
    async def load(
        cls, conn: Conn, *, policy_keep: timedelta | None, now: datetime
    ) -> RetentionLedger:
        rows = await conn.fetch(
            "SELECT id, partition_name, range_start, range_end, rows_removed, removed_at, keep, "
            "archive::text AS archive FROM das.retention_log"
        )
        ledger = cls(
            [
                RetentionRecord(
                    r["id"],
                    r["partition_name"],
                    r["range_start"],
                    r["range_end"],
                    r["rows_removed"],
                    r["removed_at"],
                    r["keep"],
                    archive=orjson.loads(r["archive"]) if r["archive"] else None,
                )
                for r in rows
            ],
            policy_keep=policy_keep,
            now=now,
        )
        if rows:
            links = await conn.fetch("SELECT created_at, days::text AS days FROM das.chain_links")
            ledger.count([(r["created_at"], orjson.loads(r["days"])) for r in links])
        return ledger

    def _static_rules(self) -> None:
        for record in self.records:
            keep = self.policy_keep or record.keep
            archived = sum(int(a.get("rows", 0)) for a in record.archive or ())
            if record.end is None:
                record.problem = "it names no end of the range it removed"
            elif record.archive is not None and archived != record.rows:
                record.problem = (
                    f"it says {record.rows} rows were removed, but the archives it names hold "
                    f"{archived}"
                )
            elif record.removed_at > self.now + FUTURE_TOLERANCE:
                record.problem = "its removal time lies in the future"
            elif keep is not None:
                moment = (record.removed_at - keep).astimezone(UTC)
                cutoff = day_start(moment.date())
                if record.end > cutoff:
                    source = "the policy" if self.policy_keep else "the record's own"
                    record.problem = (
                        f"it removed events up to {record.end.isoformat()}, but {source} "
                        f"retention period of {keep} keeps everything from {cutoff.isoformat()} "
                        "on at that time"
                    )

    def claim(self, day: str, created_at: datetime) -> RetentionRecord | None:
        """The record that removed ``day`` of a link written at ``created_at``: the earliest
        believable (by the static rules) record covering the day, written after the link.
        Check its ``problem``: the count rule may still have rejected it."""
        when = parse_day(day)
        if when is None:
            return None
        best: RetentionRecord | None = None
        for record in self._by_day.get(when, ()):
            if record.removed_at > created_at:
                best = record
                break
        i = bisect.bisect_right(self._range_times, created_at)
        for record in self._ranges[i:]:
            if best is not None and (record.removed_at, record.id) >= (best.removed_at, best.id):
                break
            if record.covers(when):
                best = record
                break
        return best

    def count(self, links: list[tuple[datetime, dict[str, Any]]]) -> None:
        """The count rule, over every link of the warehouse: (created_at, days) pairs."""
        for created_at, days in links:
            for day, stored in days.items():
                record = self.claim(day, created_at)
                if record is not None:
                    record.claimed += int(stored.get("n", 0))
        first = min((c for c, _ in links), default=None)
        for record in self.records:
            if record.problem is not None or first is None or record.removed_at < first:
                continue  # rejected already, or older than every chain: nothing to count
            if record.rows != record.claimed:
                record.problem = (
                    f"it says {record.rows} rows were removed, but the chains hold "
                    f"{record.claimed} events of those days written before it"
                )

    @property
    def rejected(self) -> list[RetentionRecord]:
        return [r for r in self.records if r.problem is not None]
