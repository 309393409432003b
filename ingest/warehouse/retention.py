"""Retention: drop whole day partitions older than the retention period, and record each drop
in ``das.retention_log`` so that disappearing rows can be told apart from tampering.

Rows of the default partition (no log_time, or outside the partition window) older than the
cutoff are deleted and recorded the same way. Run as the schema owner, never as the ingest role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from ingest.progress import Progress
from ingest.warehouse.db import Conn

_PARTITION = re.compile(r"^activity_events_p(\d{8})$")
_DURATION = re.compile(r"^\s*(\d+)\s*([dhw])\s*$")


def parse_keep(text: str) -> timedelta:
    """'90d', '12w', '36h' -> timedelta."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"retention {text!r}: use a number with d (days), w (weeks) or h (hours)")
    amount, unit = int(match[1]), match[2]
    if amount <= 0:
        raise ValueError("retention must be positive")
    units = {"d": timedelta(days=1), "w": timedelta(weeks=1), "h": timedelta(hours=1)}
    return amount * units[unit]


@dataclass(frozen=True)
class Partition:
    name: str
    day: date

    @property
    def start(self) -> datetime:
        return datetime.combine(self.day, time(), tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=1)


@dataclass(frozen=True)
class RetentionAction:
    partition: str
    range_start: datetime | None
    range_end: datetime | None
    rows: int


async def day_partitions(conn: Conn) -> list[Partition]:
    rows = await conn.fetch(
        """
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'das.activity_events'::regclass
        """
    )
    found = []
    for row in rows:
        match = _PARTITION.match(row["relname"])
        if match:
            found.append(Partition(row["relname"], datetime.strptime(match[1], "%Y%m%d").date()))
    return sorted(found, key=lambda p: p.day)


async def apply_retention(
    conn: Conn,
    keep: timedelta,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> list[RetentionAction]:
    # Retention removes whole UTC days, the unit the integrity chain accounts for. The log
    # records the time and period the cutoff came from: `verify` recomputes it.
    basis = now or datetime.now(UTC)
    moment = basis - keep
    cutoff = datetime.combine(moment.astimezone(UTC).date(), time(), tzinfo=UTC)
    actions: list[RetentionAction] = []
    due = [part for part in await day_partitions(conn) if part.end <= cutoff]
    if progress is not None:
        progress.set_total(len(due) + 1)  # the day partitions, then the default partition
    for part in due:
        async with conn.transaction():
            rows = int(await conn.fetchval(f'SELECT count(*) FROM das."{part.name}"'))
            if not dry_run:
                await conn.execute(
                    f'ALTER TABLE das.activity_events DETACH PARTITION das."{part.name}"'
                )
                await conn.execute(f'DROP TABLE das."{part.name}"')
                await _log(conn, part.name, part.start, part.end, rows, basis, keep)
        actions.append(RetentionAction(part.name, part.start, part.end, rows))
        if progress is not None:
            progress.update()
    async with conn.transaction():
        if dry_run:
            rows = int(
                await conn.fetchval(
                    "SELECT count(*) FROM das.activity_events_default WHERE log_time < $1", cutoff
                )
            )
        else:
            status = await conn.execute(
                "DELETE FROM das.activity_events_default WHERE log_time < $1", cutoff
            )
            rows = int(status.split()[-1])
            if rows:
                await _log(conn, "activity_events_default", None, cutoff, rows, basis, keep)
        if rows:
            actions.append(RetentionAction("activity_events_default", None, cutoff, rows))
        if not dry_run:
            # The derived statements table follows its events.
            await conn.execute("DELETE FROM das.statements WHERE log_time < $1", cutoff)
    if progress is not None:
        progress.update()
    return actions


async def _log(
    conn: Conn,
    name: str,
    start: datetime | None,
    end: datetime | None,
    rows: int,
    removed_at: datetime,
    keep: timedelta,
) -> None:
    await conn.execute(
        "INSERT INTO das.retention_log "
        "(partition_name, range_start, range_end, rows_removed, removed_at, keep) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        name,
        start,
        end,
        rows,
        removed_at,
        keep,
    )
