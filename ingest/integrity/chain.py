"""Extending a shard's hash chain, in the caller's transaction (see docs/integrity.md).

The events' digests arrive with the rows (the decode pool computed them from the very values
it encoded for COPY); here they become a link: per-day counts and digests, the previous link's
hash, and this link's hash. An advisory lock per shard serializes the writers of one chain (the
worker holding the lease, and dead-letter re-drives), so the chain never forks.
"""

from __future__ import annotations

from ingest.integrity.canonical import ZERO_HASH, DayDigests, link_hash
from ingest.warehouse.db import Conn

LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('das.chain:' || $1 || ':' || $2, 0))"


async def extend_chain(
    conn: Conn,
    stream: str,
    shard: str,
    first_sequence: str,
    last_sequence: str,
    digests: DayDigests,
    kind: str = "batch",
) -> int:
    """Append the link over [first_sequence, last_sequence]; returns its number."""
    await conn.execute(LOCK, stream, shard)
    head = await conn.fetchrow(
        "SELECT link_no, link_hash FROM das.chain_links WHERE stream_name = $1 AND shard_id = $2 "
        "ORDER BY link_no DESC LIMIT 1",
        stream,
        shard,
    )
    link_no = 1 if head is None else head["link_no"] + 1
    prev = ZERO_HASH if head is None else bytes(head["link_hash"])
    days = digests.summary()
    count = digests.count
    await conn.execute(
        """
        INSERT INTO das.chain_links (stream_name, shard_id, link_no, kind, first_sequence,
                                     last_sequence, event_count, days, prev_hash, link_hash)
        VALUES ($1, $2, $3, $4, $5::numeric, $6::numeric, $7, $8::jsonb, $9, $10)
        """,
        stream,
        shard,
        link_no,
        kind,
        first_sequence,
        last_sequence,
        count,
        _json(days),
        prev,
        link_hash(prev, stream, shard, link_no, kind, first_sequence, last_sequence, count, days),
    )
    return int(link_no)


def _json(value: object) -> str:
    import orjson

    return orjson.dumps(value).decode()
