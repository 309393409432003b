"""Rebuilding ``das.statements`` (derived, not chained) from the stored events, in batches that
never block ingestion.

The incremental path (Sink, after each unit's COPY) and this rebuild run the same function,
``das.merge_statements`` (migrations/0005). The merge is associative and merging an event twice
changes nothing, which is what lets the rebuild run beside live workers, each step its own short
transaction taking only row locks:

1. Empty the table, ``batch`` rows per transaction. A worker's merge that lands meanwhile is
   either deleted (its events were committed before that delete, so step 2 sees them) or
   comes after the last delete (it stays, and merging its events again changes nothing).
2. Read each shard's range of statement events (after the deletes: it covers every event whose
   merge may have been deleted), and merge it again, ``batch`` events per transaction. Events
   committed later are merged by their workers.

So the result is exactly what an idle rebuild gives. While it runs, das.statements is
incomplete (readers see fewer statements than there are); it was consistent but stalled every
ingest commit when the rebuild held an EXCLUSIVE lock for its whole run.

With a ``window`` (``rebuild-statements --day``) only the statements whose ``log_time`` lies in
it are emptied, and the statement events of the window widened by :data:`MARGIN` on each side
are merged again (``das.merge_statements_between``, migration 0045): every step reads only the
window's partitions, so its cost is the day's, not the warehouse's. A statement's MAIN and AUX
events lie within seconds of each other; those of a statement of the day that lie within the
margin outside it are merged back with it, and merging the neighbours' events again changes
nothing. Statements outside the window are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from ingest.warehouse.db import Conn
from ingest.warehouse.sink import MERGE_STATEMENTS

SHARD_RANGES = """
SELECT stream_name, shard_id, count(*) AS events,
       min(sequence_number)::text AS first, max(sequence_number)::text AS last
FROM das.activity_events
WHERE das.is_statement_event(class, command, statement_id)
GROUP BY stream_name, shard_id
ORDER BY stream_name, shard_id
"""

#: Up to ``batch`` rows of das.statements, deleted.
DELETE_BATCH = """
DELETE FROM das.statements
WHERE ctid = ANY(ARRAY(SELECT ctid FROM das.statements LIMIT $1))
"""

#: The sequence number at which a batch of ``$4`` statement events starting at ``$3`` ends.
#: (Its output is not named sequence_number: ORDER BY would sort by that text, which no index
#: serves, so each batch sorted every statement event of the shard: a rebuild quadratic in the
#: events. Ordered by the column, the provenance index's partitions are merged in order.)
BATCH_END = """
SELECT sequence_number::text AS batch_end FROM das.activity_events
WHERE stream_name = $1 AND shard_id = $2 AND sequence_number >= $3::text::numeric
  AND das.is_statement_event(class, command, statement_id)
ORDER BY sequence_number OFFSET $4 - 1 LIMIT 1
"""

#: The same three steps restricted to a time window ($3/$4, or $2/$3 for the delete).
SHARD_RANGES_BETWEEN = """
SELECT stream_name, shard_id, count(*) AS events,
       min(sequence_number)::text AS first, max(sequence_number)::text AS last
FROM das.activity_events
WHERE das.is_statement_event(class, command, statement_id)
  AND log_time >= $1 AND log_time < $2
GROUP BY stream_name, shard_id
ORDER BY stream_name, shard_id
"""

DELETE_BATCH_BETWEEN = """
DELETE FROM das.statements
WHERE ctid = ANY(ARRAY(SELECT ctid FROM das.statements
                       WHERE log_time >= $2 AND log_time < $3 LIMIT $1))
"""

BATCH_END_BETWEEN = """
SELECT sequence_number::text AS batch_end FROM das.activity_events
WHERE stream_name = $1 AND shard_id = $2 AND sequence_number >= $3::text::numeric
  AND das.is_statement_event(class, command, statement_id)
  AND log_time >= $5 AND log_time < $6
ORDER BY sequence_number OFFSET $4 - 1 LIMIT 1
"""

MERGE_STATEMENTS_BETWEEN = (
    "SELECT das.merge_statements_between($1, $2, $3::text::numeric, $4::text::numeric, $5, $6)"
)

#: How far outside a window its statements' events are looked for (see the module's text).
MARGIN = timedelta(hours=1)

#: Default events (and rows) per transaction.
BATCH = 10_000

#: Called with (phase, amount done since the last call, total of the phase or None).
ProgressCallback = Callable[[str, int, int | None], None]


#: (empty, shard ranges, batch end, merge): of the whole table, and of a window (with bounds).
WHOLE = (DELETE_BATCH, SHARD_RANGES, BATCH_END, MERGE_STATEMENTS)
WINDOW = (DELETE_BATCH_BETWEEN, SHARD_RANGES_BETWEEN, BATCH_END_BETWEEN, MERGE_STATEMENTS_BETWEEN)


async def rebuild_statements(
    conn: Conn,
    *,
    batch: int = BATCH,
    progress: ProgressCallback | None = None,
    window: tuple[datetime, datetime] | None = None,
) -> int:
    """Recompute das.statements from das.activity_events; returns its rows at the end (with a
    ``window`` [since, until): only its statements, and returns their rows)."""
    report = progress or (lambda phase, done, total: None)
    if window is None:
        await _empty_and_merge(conn, batch, report, WHOLE, (), ())
        return int(await conn.fetchval("SELECT count(*) FROM das.statements"))
    since, until = window
    # The events of the window and a margin around it (a statement's parts straddle it).
    await _empty_and_merge(
        conn, batch, report, WINDOW, (since, until), (since - MARGIN, until + MARGIN)
    )
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM das.statements WHERE log_time >= $1 AND log_time < $2",
            since,
            until,
        )
    )


async def _empty_and_merge(
    conn: Conn,
    batch: int,
    report: ProgressCallback,
    queries: tuple[str, str, str, str],
    delete_args: tuple[datetime, ...],
    bounds: tuple[datetime, ...],
) -> None:
    """Empty das.statements (all of it, or the window's) ``batch`` rows a transaction, then
    merge every shard's events again (all, or those within ``bounds``) ``batch`` at a time."""
    delete, shard_ranges, batch_end, merge = queries
    while True:
        status = await conn.execute(delete, batch, *delete_args)
        deleted = int(status.split()[-1])
        report("emptied", deleted, None)
        if deleted < batch:
            break
    shards = await conn.fetch(shard_ranges, *bounds)
    total = sum(int(s["events"]) for s in shards)
    for shard in shards:
        stream, shard_id, last = shard["stream_name"], shard["shard_id"], shard["last"]
        first = shard["first"]
        left = int(shard["events"])
        while True:
            end = await conn.fetchval(batch_end, stream, shard_id, first, batch, *bounds)
            if end is None or int(end) >= int(last):
                end = last
            await conn.execute(merge, stream, shard_id, first, end, *bounds)
            step = left if end == last else min(batch, left)
            left -= step
            report("merged", step, total)
            if end == last:
                break
            first = str(int(end) + 1)
