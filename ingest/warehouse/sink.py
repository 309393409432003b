"""The COPY sink: a batch's rows, its dead letters, its heartbeats and the shard's new checkpoint
commit in ONE transaction, fenced by the lease.

The checkpoint UPDATE runs first and is conditional on the lease (owner and counter) and on the
checkpoint we started from (a compare-and-set, so checkpoints only move forward from where this
worker read). It also takes the lease row's lock, so a worker stealing the lease waits for this
commit, or this commit finds the lease gone and rolls back before copying anything. Zero rows
updated means the lease was lost: nothing of the batch is written. That is what makes delivery
exactly-once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import asyncpg
import orjson

from ingest.checkpoint import SHARD_END
from ingest.copytext import EVENT_COLUMNS
from ingest.decode.batch import HeartbeatRow
from ingest.decode.correlate import StatementRange
from ingest.decode.normalize import sanitize_text
from ingest.errors import IngestError
from ingest.integrity.canonical import DayDigests
from ingest.integrity.chain import extend_chain
from ingest.lease import LeaseToken
from ingest.warehouse.db import Conn, is_transient, warehouse_call

log = logging.getLogger(__name__)

#: Merges the statement events of the records just stored into das.statements. A SECURITY
#: DEFINER function (migrations/0005): the ingest role has no privilege on das.statements.
MERGE_STATEMENTS = "SELECT das.merge_statements($1, $2, $3::text::numeric, $4::text::numeric)"

#: Merges the sessions of the records a batch just stored into das.session_summaries, and their
#: events into the per-day das.activity_counts and das.object_counts (a SECURITY DEFINER
#: function, migrations/0050-0052): once per commit, over the batch's range, after its COPY.
#: A range merged already is skipped, so the counts never double.
MERGE_SESSIONS = "SELECT das.merge_sessions($1, $2, $3::text::numeric, $4::text::numeric)"

ADVANCE_CHECKPOINT = """
UPDATE das.leases SET checkpoint = $1, checkpoint_at = now()
WHERE stream_name = $2 AND shard_id = $3 AND owner = $4 AND lease_counter = $5
  AND checkpoint = $6
"""

INSERT_DEAD_LETTERS = """
INSERT INTO das.dead_letters
    (stream_name, shard_id, sequence_number, partition_key, arrival_time, stage, error, raw)
SELECT $1, $2, seq::numeric, pk, at, stage, error, raw
FROM unnest($3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::text[], $8::bytea[])
    AS d(seq, pk, at, stage, error, raw)
ON CONFLICT DO NOTHING
"""
# No conflict target: naming one (ON CONSTRAINT dead_letters_record) needs SELECT on the table,
# which the append-only ingest role does not have. The only other unique key is the identity id.

UPSERT_HEARTBEATS = """
INSERT INTO das.heartbeats AS h
    (cluster_id, instance_id, log_time, stream_name, shard_id, sequence_number, fields)
SELECT c, i, t, $1, $2, seq::numeric, f::jsonb
FROM unnest($3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::text[])
    AS b(c, i, t, seq, f)
ON CONFLICT (cluster_id, instance_id) DO UPDATE SET
    log_time = EXCLUDED.log_time, seen_at = now(), stream_name = EXCLUDED.stream_name,
    shard_id = EXCLUDED.shard_id, sequence_number = EXCLUDED.sequence_number,
    fields = EXCLUDED.fields
WHERE h.log_time IS NULL OR EXCLUDED.log_time IS NULL OR EXCLUDED.log_time >= h.log_time
"""


#: Days before and after today for which day partitions are created on demand.
PARTITION_WINDOW = (30, 2)


class LeaseLostError(IngestError):
    """The lease changed hands (or the checkpoint moved) since we read it: write nothing."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sequence_number: str
    partition_key: str | None
    arrival_time: datetime | None
    stage: str
    error: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class CopyUnit:
    """Rows to COPY (the events of one or more records) and the MySQL statements to merge."""

    events: bytes
    statements: StatementRange | None
    #: Dead letter to write instead if this unit cannot be stored (per-record mode only).
    on_store_error: DeadLetter | None = None
    #: The events' digests per UTC day, for the integrity chain (BatchOutput.chain).
    chain: Mapping[str, bytes] = field(default_factory=dict)


@dataclass
class CommitResult:
    events: int = 0
    dead_letters: int = 0
    store_failures: list[DeadLetter] = field(default_factory=list)


class PolicyRecorder(Protocol):
    """Records what a batch's events mean for the policy rules (ingest.alerts.store), in the
    batch's transaction: shared window and first-seen state, alerts. Returns, per drop rule, how
    many events the batch's records lost to it (for the chain link)."""

    async def record(
        self, conn: Conn, outputs: Sequence[Any], stream: str, shard: str
    ) -> Mapping[str, int]: ...


async def init_connection(conn: Conn) -> None:
    """Pool ``init``. Nothing to set up any more (MySQL statements used to be staged in a
    session temp table); kept so pools and re-drives keep one place for per-connection setup."""


class Sink:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        partition_window: tuple[int, int] = PARTITION_WINDOW,
        chain: bool = True,
        policy: PolicyRecorder | None = None,
    ) -> None:
        self._pool = pool
        self._chain = chain
        self._policy = policy
        self._known_days: set[date] = set()
        self._window = partition_window
        self._partition_lock = asyncio.Lock()

    @warehouse_call
    async def ensure_partitions(self, days: set[date] | Sequence[date]) -> None:
        """Create the day partitions rows are about to need (outside the batch transaction, so
        DDL locks are short). Days outside the window go to the default partition."""
        if all(d in self._known_days for d in days):
            return
        async with self._partition_lock, self._pool.acquire() as conn:
            await ensure_day_partitions(conn, days, self._window, self._known_days)

    @warehouse_call
    async def commit(
        self,
        lease: LeaseToken,
        *,
        previous_checkpoint: str,
        new_checkpoint: str,
        units: Sequence[CopyUnit],
        dead_letters: Sequence[DeadLetter] = (),
        heartbeats: Sequence[HeartbeatRow] = (),
        per_record: bool = False,
        sequence_range: tuple[str, str] | None = None,
        policy_outputs: Sequence[Any] = (),
    ) -> CommitResult:
        """One transaction. Raises LeaseLostError (nothing written) or the database error.

        ``sequence_range`` (first and last sequence number of the batch's records) extends the
        shard's hash chain with a link over the events just stored, in the same transaction.
        ``policy_outputs`` (the decode outputs' policy results) go to the policy recorder in
        the same transaction too: alerts commit with their events, and the link records the
        events drop rules removed.
        """
        result = CommitResult()
        async with self._pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                ADVANCE_CHECKPOINT,
                new_checkpoint,
                lease.stream_name,
                lease.shard_id,
                lease.owner,
                lease.lease_counter,
                previous_checkpoint,
            )
            if status != "UPDATE 1":
                raise LeaseLostError(
                    f"lease on {lease.shard_id} lost or checkpoint moved; batch not written"
                )
            stored, failed = await store_units(
                conn,
                lease.stream_name,
                lease.shard_id,
                units,
                heartbeats=heartbeats,
                per_record=per_record,
            )
            span = sequence_range or checkpoint_span(previous_checkpoint, new_checkpoint)
            if span is not None and stored:
                await conn.execute(MERGE_SESSIONS, lease.stream_name, lease.shard_id, *span)
            letters = [*dead_letters, *failed]
            if letters:
                await insert_dead_letters(conn, lease.stream_name, lease.shard_id, letters)
            dropped: Mapping[str, int] = {}
            if self._policy is not None and policy_outputs:
                dropped = await self._policy.record(
                    conn, policy_outputs, lease.stream_name, lease.shard_id
                )
            if sequence_range is not None and self._chain:
                digests = DayDigests()
                digests.extend(unit.chain for unit in stored)
                await extend_chain(
                    conn,
                    lease.stream_name,
                    lease.shard_id,
                    *sequence_range,
                    digests,
                    dead_letters=[(d.sequence_number, d.raw) for d in letters],
                    dropped=dropped,
                )
            if new_checkpoint == SHARD_END:
                await record_end(conn, lease, previous_checkpoint, sequence_range)
            result.dead_letters = len(letters)
            result.store_failures = failed
        return result


async def store_units(
    conn: Conn,
    stream_name: str,
    shard_id: str,
    units: Sequence[CopyUnit],
    *,
    heartbeats: Sequence[HeartbeatRow] = (),
    per_record: bool = False,
) -> tuple[list[CopyUnit], list[DeadLetter]]:
    """COPY the units and upsert the heartbeats, inside the caller's transaction: the rows of
    a consumer's commit and of a dead-letter re-drive. In ``per_record`` mode each unit has a
    savepoint, and a unit PostgreSQL refuses becomes its ``on_store_error`` dead letter
    (stage ``store``) instead of failing the rest. Returns (stored units, refused letters)."""
    failed: list[DeadLetter] = []
    stored: list[CopyUnit] = []
    for unit in units:
        if not per_record:
            await copy_unit(conn, unit, stream_name)
            stored.append(unit)
            continue
        try:
            async with conn.transaction():  # a savepoint per record
                await copy_unit(conn, unit, stream_name)
            stored.append(unit)
        except asyncpg.PostgresError as exc:
            if unit.on_store_error is None or is_transient(exc):
                raise
            letter = unit.on_store_error
            failed.append(
                DeadLetter(
                    letter.sequence_number,
                    letter.partition_key,
                    letter.arrival_time,
                    "store",
                    f"store: {type(exc).__name__} (SQLSTATE {exc.sqlstate})",
                    letter.raw,
                )
            )
    if heartbeats:
        await upsert_heartbeats(conn, stream_name, shard_id, heartbeats)
    return stored, failed


def checkpoint_span(previous: str, new: str) -> tuple[str, str] | None:
    """The sequence numbers a commit from checkpoint ``previous`` to ``new`` stores records of,
    for a caller that names no range: after ``previous`` (from 0 after a sentinel such as
    TRIM_HORIZON) up to ``new``. None when ``new`` is a sentinel (SHARD_END): unknown."""
    if not new.isdigit():
        return None
    return (str(int(previous) + 1) if previous.isdigit() else "0", new)


async def record_end(
    conn: Conn,
    lease: LeaseToken,
    previous_checkpoint: str,
    sequence_range: tuple[str, str] | None,
) -> None:
    """A shard reached SHARD_END: keep its last sequence number, which its chain must reach
    (``verify`` checks it, as it checks a sequence-number checkpoint of an open shard)."""
    last = sequence_range[1] if sequence_range is not None else previous_checkpoint
    if last.isdigit():
        await conn.execute(
            "UPDATE das.leases SET end_sequence = $3::numeric "
            "WHERE stream_name = $1 AND shard_id = $2",
            lease.stream_name,
            lease.shard_id,
            last,
        )


async def ensure_day_partitions(
    conn: Conn,
    days: set[date] | Sequence[date],
    window: tuple[int, int] = PARTITION_WINDOW,
    known: set[date] | None = None,
) -> None:
    known = known if known is not None else set()
    today = datetime.now(UTC).date()
    low, high = today - timedelta(days=window[0]), today + timedelta(days=window[1])
    for day in sorted(d for d in days if d not in known and low <= d <= high):
        await conn.execute("SELECT das.ensure_partition($1)", day)
        known.add(day)


async def copy_unit(conn: Conn, unit: CopyUnit, stream_name: str) -> None:
    """COPY a unit's events, then merge its MySQL statement events into das.statements."""
    if unit.events:
        await conn.copy_to_table(
            "activity_events",
            schema_name="das",
            # A memoryview: asyncpg would take plain bytes for a file path.
            source=memoryview(unit.events),  # type: ignore[arg-type]
            columns=list(EVENT_COLUMNS),
            format="text",
        )
    if unit.statements is not None:
        span = unit.statements
        await conn.execute(MERGE_STATEMENTS, stream_name, span.shard_id, span.first, span.last)


def storable_letter_text(letter: DeadLetter) -> tuple[str | None, str]:
    """The partition key and error as PostgreSQL text can hold them.

    A partition key is any Unicode the producer chose: a NUL (or a lone surrogate, which
    kinesalite hands back) would make the dead-letter INSERT fail, and with it the batch and
    its checkpoint, again and again. It is escaped reversibly (see normalize.sanitize_text),
    and the error says so, since an escaped key cannot be told from an odd one otherwise.
    """
    error, _ = sanitize_text(letter.error)
    key = letter.partition_key
    if key is not None:
        key, flag = sanitize_text(key)
        if flag:
            error = f"{error} (partition key stored escaped: {flag})"
    return key, error


async def insert_dead_letters(
    conn: Conn, stream_name: str, shard_id: str, letters: Sequence[DeadLetter]
) -> None:
    texts = [storable_letter_text(d) for d in letters]
    await conn.execute(
        INSERT_DEAD_LETTERS,
        stream_name,
        shard_id,
        [d.sequence_number for d in letters],
        [key for key, _ in texts],
        [d.arrival_time for d in letters],
        [d.stage for d in letters],
        [error for _, error in texts],
        [d.raw for d in letters],
    )


async def upsert_heartbeats(
    conn: Conn, stream_name: str, shard_id: str, beats: Sequence[HeartbeatRow]
) -> None:
    latest: dict[tuple[str, str], HeartbeatRow] = {}
    for beat in beats:  # in stream order: the last one per instance wins
        latest[(beat.cluster_id or "", beat.instance_id or "")] = beat
    rows = list(latest.items())
    await conn.execute(
        UPSERT_HEARTBEATS,
        stream_name,
        shard_id,
        [k[0] for k, _ in rows],
        [k[1] for k, _ in rows],
        [b.log_time for _, b in rows],
        [b.sequence_number for _, b in rows],
        [orjson.dumps(b.fields).decode() for _, b in rows],
    )
