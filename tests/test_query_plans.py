"""The auditor views can use their indexes (their predicates imply the partial indexes'), and
das.sessions_between reads only its window's partitions and agrees with das.sessions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.fill import Filler
from tests.warehouse_helpers import migrated_pool


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def plan_of(conn: asyncpg.Connection, sql: str) -> list[dict[str, Any]]:
    return _nodes(json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}"))[0]["Plan"])


def indexes(nodes: list[dict[str, Any]]) -> set[str]:
    """The (partition) indexes a plan scans."""
    return {n["Index Name"] for n in nodes if "Index Name" in n}


async def filled(pg_dsn: str, days: int = 3) -> datetime:
    pool = await migrated_pool(pg_dsn)
    await pool.close()
    today = datetime.now(UTC).date()
    filler = Filler(pg_dsn, days=days, last_day=today, processes=1)
    try:
        await filler.fill_to(3000, progress=False)
    finally:
        await filler.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return datetime(today.year, today.month, today.day, tzinfo=UTC)


async def parent_index(conn: asyncpg.Connection, child: str) -> str:
    return str(
        await conn.fetchval(
            "SELECT coalesce((SELECT p.relname FROM pg_inherits h JOIN pg_class c "
            "ON c.oid = h.inhrelid JOIN pg_class p ON p.oid = h.inhparent "
            "WHERE c.relname = $1), $1)",
            child,
        )
    )


async def test_the_views_can_use_their_partial_indexes(pg_dsn: str) -> None:
    await filled(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        # Cheap scans win on a small table; forbid them so the test asks whether the planner
        # *can* use the index, i.e. whether the view's WHERE implies the index predicate.
        await conn.execute("SET enable_seqscan = off")
        expected = {
            "SELECT * FROM das.failed_statements": "activity_events_event_failed",
            "SELECT * FROM das.failed_logins": "activity_events_failed_logins",
            "SELECT * FROM das.ddl_changes": "activity_events_ddl",
            "SELECT anomalies, count(*) FROM das.activity_events WHERE anomalies <> '{}' "
            "GROUP BY anomalies": "activity_events_anomalies",
            "SELECT * FROM das.activity_events ORDER BY log_time DESC LIMIT 10": (
                "activity_events_time"
            ),
        }
        for sql, index in expected.items():
            nodes = await plan_of(conn, sql)
            used = {await parent_index(conn, name) for name in indexes(nodes)}
            assert index in used, (sql, used)
            scans = [
                n["Relation Name"]
                for n in nodes
                if n.get("Node Type") == "Seq Scan"
                and str(n.get("Relation Name", "")).startswith("activity_events_p")
            ]
            assert not scans, (sql, scans)
        remaining = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'das' "
                "AND tablename = 'activity_events'"
            )
        }
        assert "activity_events_session" not in remaining
        assert "activity_events_command" not in remaining
        assert "activity_events_failed" not in remaining  # Aurora's rule, which no view reads
    finally:
        await conn.close()


async def test_sessions_between_reads_only_its_window_and_agrees_with_the_view(
    pg_dsn: str,
) -> None:
    today = await filled(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        day = today - timedelta(days=1)
        window = f"'{day.isoformat()}'::timestamptz, '{today.isoformat()}'::timestamptz"
        nodes = await plan_of(conn, f"SELECT * FROM das.sessions_between({window})")
        scanned = {
            n["Relation Name"]
            for n in nodes
            if str(n.get("Relation Name", "")).startswith("activity_events")
        }
        assert scanned == {f"activity_events_p{day:%Y%m%d}"}, scanned
        between = await conn.fetch(
            f"SELECT * FROM das.sessions_between({window}) WHERE connected_at IS NOT NULL "
            "ORDER BY cluster_id, instance_id, session_id, pid"
        )
        # The view's answer for the sessions that connected that day and had no event outside it.
        whole = await conn.fetch(
            f"""
            SELECT * FROM das.sessions
            WHERE connected_at >= {window.split(",")[0]} AND last_event_at < {window.split(",")[1]}
            ORDER BY cluster_id, instance_id, session_id, pid
            """
        )
        assert whole, "the fill has sessions that connected and ended that day"
        keyed = {tuple(r.values())[:4]: dict(r) for r in between}
        for row in whole:
            assert keyed[tuple(row.values())[:4]] == dict(row)
    finally:
        await conn.close()
