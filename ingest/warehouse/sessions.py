"""``das.session_summaries``: one row per session, derived from the stored events (not chained,
as ``das.statements``), read through the ``das.sessions`` view (migrations/0050); and
``das.activity_counts``, events per UTC day, shard, user and command, read by
``das.privileged_activity_since`` (migrations/0051), and ``das.object_counts``, the same per
object, read by ``das.object_activity_since`` (0052), merged and rebuilt with them.

Each consumer commit merges the sessions of the records it stored, in its own transaction
(``das.merge_sessions``, called by :class:`ingest.warehouse.sink.Sink`, adds them to all
three tables); a shard's guard row (``das.session_merges``) makes a range merged twice count
once. A re-driven dead letter's record is added by ``das.merge_redriven_sessions``
(ingest.warehouse.deadletters).

:func:`rebuild_sessions` recomputes the table from every stored event in ONE transaction that
holds the guards' table in EXCLUSIVE mode: readers still read the old rows, but every worker's
commit waits at its merge until the rebuild commits (at 20M events, a minute or so: see the
migration), then merges its batch on top of it, once.
"""

from __future__ import annotations

from ingest.warehouse.db import Conn

REBUILD_SESSIONS = "SELECT das.rebuild_sessions()"


async def rebuild_sessions(conn: Conn) -> int:
    """Recompute das.session_summaries, das.activity_counts and das.object_counts from
    das.activity_events; returns the sessions."""
    async with conn.transaction():
        return int(await conn.fetchval(REBUILD_SESSIONS))
