"""Dead letters: listing them, and re-driving them after a fix.

A re-drive decodes the kept raw record again (KMS, decrypt, decompress, parse, normalize) and,
on success, stores its events and removes the dead letter in ONE transaction. A record that
fails again stays, with the new stage and reason and one more attempt. Re-drives run as the
schema owner (the ingest role cannot delete dead letters).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ingest.decode.batch import BatchInput, DecoderConfig, decode_batch
from ingest.decode.envelope import read_envelope
from ingest.errors import DecodeError
from ingest.integrity.canonical import DayDigests
from ingest.integrity.chain import extend_chain
from ingest.kms import DataKeyCache, encryption_context, resource_id_from_stream
from ingest.progress import Progress
from ingest.warehouse.db import Conn
from ingest.warehouse.sink import (
    CopyUnit,
    copy_unit,
    ensure_day_partitions,
    init_connection,
    upsert_heartbeats,
)


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


@dataclass
class RedriveReport:
    stored: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    events: int = 0


def _counted(ids: Sequence[int], progress: Progress | None) -> Iterator[int]:
    """``ids``, each counted once the loop body for it is done (``continue`` included)."""
    for letter_id in ids:
        yield letter_id
        if progress is not None:
            progress.update()


async def redrive(
    conn: Conn,
    ids: Sequence[int] | None,
    keys: DataKeyCache,
    *,
    decoder: DecoderConfig,
    resource_id: str | None = None,
    stage: str | None = None,
    progress: Progress | None = None,
) -> RedriveReport:
    """Re-drive the dead letters ``ids`` (all, or those of ``stage``, when None);
    ``progress`` counts them."""
    await init_connection(conn)
    if ids is None:
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM das.dead_letters WHERE $1::text IS NULL OR stage = $1 ORDER BY id",
                stage,
            )
        ]
    report = RedriveReport()
    if progress is not None:
        progress.set_total(len(ids))
    for letter_id in _counted(ids, progress):
        row = await conn.fetchrow(
            "SELECT stream_name, shard_id, sequence_number::text AS seq, raw "
            "FROM das.dead_letters WHERE id = $1",
            letter_id,
        )
        if row is None:
            report.failed[letter_id] = "no such dead letter"
            continue
        context = encryption_context(resource_id or resource_id_from_stream(row["stream_name"]))
        raw = bytes(row["raw"])
        try:
            envelope = read_envelope(raw)
            data_key = await keys.get(envelope.key_blob(), context)
        except DecodeError as exc:
            await _failed_again(conn, letter_id, exc.stage.value, str(exc))
            report.failed[letter_id] = str(exc)
            continue
        output = decode_batch(
            BatchInput(
                row["shard_id"],
                [(0, row["seq"], raw, data_key)],
                decoder,
                stream_name=row["stream_name"],
            )
        )
        if output.failures:
            failure = output.failures[0]
            await _failed_again(conn, letter_id, failure.stage, failure.error)
            report.failed[letter_id] = failure.error
            continue
        await ensure_day_partitions(conn, output.days)
        async with conn.transaction():
            await copy_unit(
                conn,
                CopyUnit(output.events, output.statements, chain=output.chain),
                row["stream_name"],
            )
            if output.heartbeats:
                await upsert_heartbeats(
                    conn, row["stream_name"], row["shard_id"], output.heartbeats
                )
            digests = DayDigests()
            digests.extend([output.chain])
            await extend_chain(
                conn,
                row["stream_name"],
                row["shard_id"],
                row["seq"],
                row["seq"],
                digests,
                "redrive",
                # The chain records which dead letter this was: `verify` holds every
                # dead-lettered record to still be here, or to have been re-driven so.
                dead_letters=[(row["seq"], raw)],
            )
            await conn.execute("DELETE FROM das.dead_letters WHERE id = $1", letter_id)
        report.stored.append(letter_id)
        report.events += output.event_count
    return report


async def _failed_again(conn: Conn, letter_id: int, stage: str, error: str) -> None:
    await conn.execute(
        "UPDATE das.dead_letters SET attempts = attempts + 1, last_attempt = now(), "
        "stage = $2, error = $3 WHERE id = $1",
        letter_id,
        stage,
        error,
    )
