"""Extending a shard's hash chain, in the caller's transaction (see docs/integrity.md).

The events' digests arrive with the rows (the decode pool computed them from the very values
it encoded for COPY); here they become a link: per-day counts and digests, the records that
were dead-lettered instead of stored, the time, the previous link's hash, and this link's hash.
An advisory lock per shard serializes the writers of one chain (the worker holding the lease,
and dead-letter re-drives), so the chain never forks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from ingest.conn import Conn
from ingest.integrity.canonical import (
    CHAIN_VERSION,
    ZERO_HASH,
    DayDigests,
    LinkFields,
    dead_letter_entries,
    link_hash,
)

LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('das.chain:' || $1 || ':' || $2, 0))"

# The time is read after the lock: a chain's links are written, and timed, one after another.
HEAD = """
SELECT clock_timestamp() AS now, h.link_no, h.link_hash
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT link_no, link_hash FROM das.chain_links
    WHERE stream_name = $1 AND shard_id = $2 ORDER BY link_no DESC LIMIT 1
) AS h ON true
"""


async def extend_chain(
    conn: Conn,
    stream: str,
    shard: str,
    first_sequence: str,
    last_sequence: str,
    digests: DayDigests,
    kind: str = "batch",
    dead_letters: Sequence[tuple[str, bytes]] = (),
    dropped: Mapping[str, int] | None = None,
) -> int:
    """Append the link over [first_sequence, last_sequence]; returns its number.

    ``dead_letters`` are (sequence number, raw record) of the records of the range that were
    dead-lettered instead of stored (a batch), or of the dead letter re-driven (a redrive).
    ``dropped`` counts, per drop rule, the events of the range a policy kept out of storage.
    """
    await conn.execute(LOCK, stream, shard)
    head = await conn.fetchrow(HEAD, stream, shard)
    assert head is not None  # HEAD always returns its one row
    link_no = 1 if head["link_no"] is None else int(head["link_no"]) + 1
    prev = ZERO_HASH if head["link_hash"] is None else bytes(head["link_hash"])
    link = LinkFields(
        stream=stream,
        shard=shard,
        link_no=link_no,
        kind=kind,
        first_sequence=first_sequence,
        last_sequence=last_sequence,
        event_count=digests.count,
        days=digests.summary(),
        created_at=head["now"],
        dead_letters=dead_letter_entries(dead_letters),
        dropped=dict(sorted((dropped or {}).items())),
    )
    await conn.execute(
        """
        INSERT INTO das.chain_links (stream_name, shard_id, link_no, kind, first_sequence,
                                     last_sequence, event_count, days, prev_hash, link_hash,
                                     created_at, dead_letters, version, dropped)
        VALUES ($1, $2, $3, $4, $5::numeric, $6::numeric, $7, $8::jsonb, $9, $10, $11,
                $12::jsonb, $13, $14::jsonb)
        """,
        stream,
        shard,
        link_no,
        kind,
        first_sequence,
        last_sequence,
        link.event_count,
        orjson.dumps(link.days).decode(),
        prev,
        link_hash(prev, link),
        link.created_at,
        orjson.dumps(list(link.dead_letters)).decode(),
        CHAIN_VERSION,
        orjson.dumps(link.dropped).decode(),
    )
    return link_no
