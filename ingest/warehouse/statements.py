"""Rebuilding ``das.statements`` (derived, not chained) from the stored events.

The incremental path (Sink) and this rebuild agree: the earliest MAIN by log_time fills the main
columns, and every AUX event of the key is listed in ``aux``.
"""

from __future__ import annotations

from ingest.decode.correlate import PART_COLUMNS
from ingest.warehouse.db import Conn

_KEY = ("cluster_id", "instance_id", "pid", "session_id", "statement_id")
_MAIN_ORDER = "ORDER BY log_time, sequence_number, event_index"
_MAIN_SOURCE = {
    "main_shard_id": "shard_id",
    "main_sequence_number": "sequence_number",
    "main_event_index": "event_index",
}


def _main_expr(column: str) -> str:
    source = _MAIN_SOURCE.get(column, column)
    return f"(array_agg({source} {_MAIN_ORDER}) FILTER (WHERE class = 'MAIN'))[1]"


_SELECT_COLUMNS = [
    *(_KEY),
    "bool_or(class = 'MAIN')",
    *(_main_expr(c) for c in PART_COLUMNS if c not in (*_KEY, "has_main", "aux")),
    """coalesce(jsonb_agg(jsonb_build_object(
        'command', command, 'object_type', object_type, 'object_name', object_name,
        'command_text', command_text,
        'log_time', to_char(log_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
        'shard_id', shard_id, 'sequence_number', sequence_number::text,
        'event_index', event_index)
      ORDER BY sequence_number, event_index) FILTER (WHERE class = 'AUX'), '[]'::jsonb)""",
]

REBUILD = f"""
INSERT INTO das.statements ({", ".join(PART_COLUMNS)})
SELECT {", ".join(_SELECT_COLUMNS)}
FROM das.activity_events
WHERE class IN ('MAIN', 'AUX') AND statement_id IS NOT NULL
GROUP BY {", ".join(_KEY)}
"""


async def rebuild_statements(conn: Conn) -> int:
    """Recompute das.statements from das.activity_events in one transaction; returns rows."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE das.statements IN EXCLUSIVE MODE")
        await conn.execute("DELETE FROM das.statements")
        status = await conn.execute(REBUILD)
    return int(status.split()[-1])
