"""Dead letters in the warehouse: listing them, and the statements of a re-drive.

A re-drive (``ingest.consumer.redrive``) prepares the kept raw record as the consumer does and,
on success, stores its events and removes the dead letter in ONE transaction
(:func:`store_redriven`). A record that fails again stays, with the new stage and reason and
one more attempt (:func:`failed_again`). Re-drives run as the schema owner (the ingest role
cannot delete dead letters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ingest.decode.batch import HeartbeatRow
from ingest.integrity.canonical import DayDigests
from ingest.integrity.chain import extend_chain
from ingest.warehouse.db import Conn
from ingest.warehouse.sink import CopyUnit, PolicyRecorder, store_units


@dataclass(frozen=True)
class DeadLetterRow:
    id: int
    stream_name: str
    shard_id: str
    sequence_number: str
    stage: str
    error: str
    first_seen: datetime
    last_attempt: datetime
    attempts: int
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stream_name": self.stream_name,
            "shard_id": self.shard_id,
            "sequence_number": self.sequence_number,
            "stage": self.stage,
            "error": self.error,
            "first_seen": self.first_seen.isoformat(),
            "last_attempt": self.last_attempt.isoformat(),
            "attempts": self.attempts,
            "size": self.size,
        }


async def list_dead_letters(
    conn: Conn, *, stage: str | None = None, limit: int = 100
) -> list[DeadLetterRow]:
    rows = await conn.fetch(
        """
        SELECT id, stream_name, shard_id, sequence_number::text AS sequence_number, stage, error,
               first_seen, last_attempt, attempts, octet_length(raw) AS size
        FROM das.dead_letters
        WHERE $1::text IS NULL OR stage = $1
        ORDER BY id
        LIMIT $2
        """,
        stage,
        limit,
    )
    return [DeadLetterRow(**dict(r)) for r in rows]


@dataclass(frozen=True)
class KeptRecord:
    """A dead letter's record, as a re-drive reads it."""

    id: int
    stream_name: str
    shard_id: str
    sequence_number: str
    partition_key: str | None
    arrival_time: datetime | None
    raw: bytes


async def dead_letter_ids(conn: Conn, stage: str | None) -> list[int]:
    """The ids of every dead letter, or of those of ``stage``, in order."""
    rows = await conn.fetch(
        "SELECT id FROM das.dead_letters WHERE $1::text IS NULL OR stage = $1 ORDER BY id", stage
    )
    return [r["id"] for r in rows]


async def kept_record(conn: Conn, letter_id: int) -> KeptRecord | None:
    row = await conn.fetchrow(
        "SELECT stream_name, shard_id, sequence_number::text AS seq, partition_key, "
        "arrival_time, raw FROM das.dead_letters WHERE id = $1",
        letter_id,
    )
    if row is None:
        return None
    return KeptRecord(
        letter_id,
        row["stream_name"],
        row["shard_id"],
        row["seq"],
        row["partition_key"],
        row["arrival_time"],
        bytes(row["raw"]),
    )


async def store_redriven(
    conn: Conn,
    kept: KeptRecord,
    units: Sequence[CopyUnit],
    heartbeats: Sequence[HeartbeatRow],
    *,
    policy: PolicyRecorder | None = None,
    policy_outputs: Sequence[Any] = (),
) -> None:
    """Store a re-driven record's rows (as the consumer's commit does), record what they mean
    for the policy rules (alerts, and the events drop rules removed, in the link), extend its
    shard's chain with a ``redrive`` link, and delete the dead letter: one transaction."""
    async with conn.transaction():
        await store_units(conn, kept.stream_name, kept.shard_id, units, heartbeats=heartbeats)
        # Its shard's guard is past this record: its sessions and activity counts are added
        # unguarded (this transaction deletes the dead letter, so the record is stored once;
        # migrations/0050, 0051).
        await conn.execute(
            "SELECT das.merge_redriven_sessions($1, $2, $3::text::numeric)",
            kept.stream_name,
            kept.shard_id,
            kept.sequence_number,
        )
        dropped: Mapping[str, int] = {}
        if policy is not None and policy_outputs:
            dropped = await policy.record(conn, policy_outputs, kept.stream_name, kept.shard_id)
        digests = DayDigests()
        digests.extend(unit.chain for unit in units)
        await extend_chain(
            conn,
            kept.stream_name,
            kept.shard_id,
            kept.sequence_number,
            kept.sequence_number,
            digests,
            "redrive",
            # The chain records which dead letter this was: `verify` holds every
            # dead-lettered record to still be here, or to have been re-driven so.
            dead_letters=[(kept.sequence_number, kept.raw)],
            dropped=dropped,
        )
        await conn.execute("DELETE FROM das.dead_letters WHERE id = $1", kept.id)


async def failed_again(conn: Conn, letter_id: int, stage: str, error: str) -> None:
    await conn.execute(
        "UPDATE das.dead_letters SET attempts = attempts + 1, last_attempt = now(), "
        "stage = $2, error = $3 WHERE id = $1",
        letter_id,
        stage,
        error,
    )
