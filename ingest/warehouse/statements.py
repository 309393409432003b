"""Rebuilding ``das.statements`` (derived, not chained) from the stored events.

The incremental path (Sink, after each unit's COPY) and this rebuild run the same function,
``das.merge_statements`` (migrations/0005): the rebuild empties the table and merges every
shard's whole range of sequence numbers. The merge is associative and merging an event twice
changes nothing, so both give exactly the same rows.
"""

from __future__ import annotations

from ingest.warehouse.db import Conn
from ingest.warehouse.sink import MERGE_STATEMENTS

SHARD_RANGES = """
SELECT stream_name, shard_id,
       min(sequence_number)::text AS first, max(sequence_number)::text AS last
FROM das.activity_events
WHERE das.is_statement_event(class, command, statement_id)
GROUP BY stream_name, shard_id
ORDER BY stream_name, shard_id
"""


async def rebuild_statements(conn: Conn) -> int:
    """Recompute das.statements from das.activity_events in one transaction; returns rows."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE das.statements IN EXCLUSIVE MODE")
        await conn.execute("DELETE FROM das.statements")
        for shard in await conn.fetch(SHARD_RANGES):
            await conn.execute(
                MERGE_STATEMENTS,
                shard["stream_name"],
                shard["shard_id"],
                shard["first"],
                shard["last"],
            )
        count = await conn.fetchval("SELECT count(*) FROM das.statements")
    return int(count)
