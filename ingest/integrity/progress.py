"""How far ``verify`` verified each chain: the claim a routine run starts from.

A routine ``verify`` recomputes only what was added since the last run (plus a sample of older
links); what it skips it takes from ``das.verify_progress``. The warehouse's administrators can
write that table, so a claim is believed only when

* its MAC checks out: KMS ``GenerateMac`` (or ``Sign``) over :func:`progress_message` with the
  **verify key**, which only the auditors running ``verify`` may use, never the ingester nor
  the warehouse's administrators; and
* the link it names is still anchored (a valid anchor made with the pinned anchor key) with the
  hash it names, and the chain after it still starts from that hash (checked by ``verify``).

A claim that fails either is a ``progress_invalid`` finding, and the chain is verified in full.
Deleting a claim only makes the next run a full one; replaying an older claim of the same chain
only makes it recompute more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from ingest.conn import Conn
from ingest.integrity.anchor import AnchorKey
from ingest.integrity.canonical import canonical_time

PROGRESS_VERSION = 1


def progress_message(
    stream: str,
    shard: str,
    link_no: int,
    link_hash: bytes,
    last_sequence: str,
    verified_at: datetime,
    key_id: str,
    algorithm: str,
) -> bytes:
    """What a progress row's MAC authenticates (docs/integrity.md, "Incremental verify")."""
    lines = [
        f"das-verify-progress-v{PROGRESS_VERSION}", stream, shard, str(link_no), link_hash.hex(),
        last_sequence, canonical_time(verified_at), key_id, algorithm,
    ]  # fmt: skip
    return "\n".join(lines).encode()


@dataclass(frozen=True)
class VerifiedPoint:
    """Chain (stream, shard) was verified up to link ``link_no`` (hash ``link_hash``), i.e. every
    event up to ``last_sequence``."""

    stream_name: str
    shard_id: str
    link_no: int
    link_hash: bytes
    last_sequence: str
    verified_at: datetime
    key_id: str
    algorithm: str
    signature: bytes

    def message(self) -> bytes:
        return progress_message(
            self.stream_name,
            self.shard_id,
            self.link_no,
            self.link_hash,
            self.last_sequence,
            self.verified_at,
            self.key_id,
            self.algorithm,
        )


async def load_progress(
    conn: Conn, stream: str | None, shards: list[str] | None
) -> dict[tuple[str, str], VerifiedPoint]:
    rows = await conn.fetch(
        """
        SELECT stream_name, shard_id, link_no, link_hash, last_sequence::text AS last_sequence,
               verified_at, key_id, algorithm, mac
        FROM das.verify_progress
        WHERE ($1::text IS NULL OR stream_name = $1) AND ($2::text[] IS NULL OR shard_id = ANY ($2))
        """,
        stream,
        shards,
    )
    return {
        (r["stream_name"], r["shard_id"]): VerifiedPoint(
            r["stream_name"],
            r["shard_id"],
            r["link_no"],
            bytes(r["link_hash"]),
            r["last_sequence"],
            r["verified_at"],
            r["key_id"],
            r["algorithm"],
            bytes(r["mac"]),
        )
        for r in rows
    }


async def record_progress(
    conn: Conn,
    key: AnchorKey,
    stream: str,
    shard: str,
    link_no: int,
    link_hash: bytes,
    last_sequence: str,
) -> VerifiedPoint:
    """MAC the claim with the verify key and store it (replacing the chain's previous one)."""
    info = await key.info()
    verified_at: datetime = await conn.fetchval("SELECT clock_timestamp()")
    unsigned = VerifiedPoint(
        stream, shard, link_no, link_hash, last_sequence, verified_at, info.arn, info.algorithm, b""
    )
    progress = replace(unsigned, signature=await key.sign(unsigned.message()))
    await conn.execute(
        """
        INSERT INTO das.verify_progress (stream_name, shard_id, link_no, link_hash, last_sequence,
                                         verified_at, key_id, algorithm, mac, version)
        VALUES ($1, $2, $3, $4, $5::numeric, $6, $7, $8, $9, $10)
        ON CONFLICT (stream_name, shard_id) DO UPDATE SET
            link_no = excluded.link_no, link_hash = excluded.link_hash,
            last_sequence = excluded.last_sequence, verified_at = excluded.verified_at,
            key_id = excluded.key_id, algorithm = excluded.algorithm, mac = excluded.mac,
            version = excluded.version
        """,
        stream,
        shard,
        link_no,
        link_hash,
        last_sequence,
        verified_at,
        info.arn,
        info.algorithm,
        progress.signature,
        PROGRESS_VERSION,
    )
    return progress
