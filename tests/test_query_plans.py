"""The auditor views can use their indexes (their predicates imply the partial indexes'), and
das.sessions_between reads no event partition and agrees with das.sessions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.fill import Filler
from ingest.conn import Conn
from tests.warehouse_helpers import migrated_pool


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def plan_of(conn: Conn, sql: str) -> list[dict[str, Any]]:
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
    """das.sessions_between reads the session table (migrations/0050), no event partition, and
    gives the view's rows of the sessions with an event in its window."""
    today = await filled(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        day = today - timedelta(days=1)
        window = f"'{day.isoformat()}'::timestamptz, '{today.isoformat()}'::timestamptz"
        nodes = await plan_of(conn, f"SELECT * FROM das.sessions_between({window})")
        scanned = {str(n.get("Relation Name")) for n in nodes if "Relation Name" in n}
        assert scanned == {"session_summaries"}, scanned
        columns = "engine, cluster_id, instance_id, session_id, pid"
        between = await conn.fetch(
            f"SELECT * FROM das.sessions_between({window}) ORDER BY {columns}"
        )
        bounds = window.split(",")
        overlapping = await conn.fetch(
            f"""
            SELECT * FROM das.sessions s
            WHERE EXISTS (SELECT 1 FROM das.activity_events e
                          WHERE e.cluster_id = s.cluster_id AND e.instance_id = s.instance_id
                            AND e.session_id = s.session_id AND e.pid IS NOT DISTINCT FROM s.pid
                            AND e.log_time >= {bounds[0]} AND e.log_time < {bounds[1]})
            ORDER BY {columns}
            """
        )
        assert overlapping, "the fill has sessions with events that day"
        assert [dict(r) for r in between] == [dict(r) for r in overlapping]
    finally:
        await conn.close()


#: The README's per-engine questions, by a phrase of each, and the days back its bound reaches.
BOUNDED_README_QUERIES = {
    "engine = 'oracle' AND exit_code = '1017'": 7,
    "'GRANT', 'REVOKE', 'CREATE USER', 'ALTER USER'": 7,
    "FROM das.failed_logins\nWHERE engine = 'sqlserver'": 7,
    "'ADD MEMBER', 'DROP MEMBER', 'GRANT', 'DENY'": 7,
    "FROM das.sqlserver_statements_between(now() - interval '1 day', now())": 1,
    # who touched a table: per user and command over a week (das.object_counts, and the
    # events of the week's first day), row by row over a day
    "das.object_activity_since(": 7,
    "'test1')\n  AND log_time > now() - interval '1 day'": 1,
}


async def test_the_readme_engine_queries_read_only_their_window(pg_dsn: str) -> None:
    """Over twelve day partitions, the README's per-engine questions (Oracle and SQL Server
    failed logins and permission changes, split SQL Server statements) read only the
    partitions of their time bound: none older than it. (The sessions of the last hour read
    das.session_summaries: tests/test_sessions_table.py.)"""
    from tests.test_readme_queries import readme_queries

    today = await filled(pg_dsn, days=12)
    conn = await asyncpg.connect(pg_dsn)
    try:
        partitions = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid "
                "WHERE h.inhparent = 'das.activity_events'::regclass "
                "AND c.relname ~ '^activity_events_p'"
            )
        }
        assert len(partitions) >= 12
        queries = readme_queries()
        for phrase, days in BOUNDED_README_QUERIES.items():
            (query,) = [q for q in queries if phrase in q]
            nodes = await plan_of(conn, query)
            scanned = {
                str(n["Relation Name"])
                for n in nodes
                if str(n.get("Relation Name", "")).startswith("activity_events_p")
            }
            window = {
                f"activity_events_p{today - timedelta(days=d):%Y%m%d}" for d in range(days + 1)
            }
            assert scanned, (phrase, "reads no day partition at all?")
            assert scanned <= window, (phrase, sorted(scanned - window))
            assert len(partitions - scanned) >= 12 - (days + 1), phrase
    finally:
        await conn.close()


async def test_sqlserver_statements_between_agrees_with_the_view(pg_dsn: str) -> None:
    """das.sqlserver_statements_between over a window gives the view's rows for the statements
    logged in it, and reads only the window's partitions."""
    from tests.rds_examples import SQLSERVER_INSTANCE, inner_document, sqlserver_events
    from tests.warehouse_helpers import batch, hold_lease, store

    pool = await migrated_pool(pg_dsn)
    try:
        # Day partitions around the examples' day (2024-03-01), as ingestion would have made.
        await pool.execute("SELECT das.ensure_partitions('2024-02-28', '2024-03-03')")
        token, _ = await hold_lease(pool, "s", "w")
        events = [(str(n + 1), inner_document(SQLSERVER_INSTANCE, e)) for n, e in
                  enumerate(sqlserver_events())]  # fmt: skip
        await store(pool, token, batch("s", events, "1.4"), "TRIM_HORIZON", events[-1][0])
        columns = "instance_id, session_id, statement_id, log_time, command_text, parts, failed"
        view = await pool.fetch(
            f"SELECT {columns} FROM das.sqlserver_statements ORDER BY statement_id"
        )
        between = await pool.fetch(
            f"SELECT {columns} FROM das.sqlserver_statements_between("
            "'2024-03-01', '2024-03-02') ORDER BY statement_id"
        )
        assert [r["parts"] for r in view if r["parts"] > 1] == [3]
        assert [tuple(r) for r in between] == [tuple(r) for r in view]
        assert not await pool.fetch(
            "SELECT 1 FROM das.sqlserver_statements_between('2024-03-02', '2024-03-03')"
        )
        async with pool.acquire() as conn:
            nodes = await plan_of(
                conn,
                "SELECT * FROM das.sqlserver_statements_between('2024-03-01', '2024-03-02')",
            )
        scanned = {
            str(n["Relation Name"])
            for n in nodes
            if str(n.get("Relation Name", "")).startswith("activity_events")
        }
        assert scanned == {"activity_events_p20240301"}, scanned
    finally:
        await pool.close()


async def test_the_rebuild_finds_each_batch_end_in_index_order(pg_dsn: str) -> None:
    """rebuild-statements finds where each batch of statement events ends in the provenance
    index's order (a merge of the partitions' index scans), not by sorting every statement
    event of the shard for each batch (which made a rebuild quadratic in the events)."""
    from ingest.warehouse.statements import BATCH_END, BATCH_END_BETWEEN

    today = await filled(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        # Whether the planner *can* avoid the sort: forbid sorts and sequential scans.
        await conn.execute("SET enable_sort = off")
        await conn.execute("SET enable_seqscan = off")
        busiest = await conn.fetchrow(
            "SELECT stream_name, shard_id, min(sequence_number)::text FROM das.activity_events "
            "WHERE das.is_statement_event(class, command, statement_id) "
            "GROUP BY 1, 2 ORDER BY count(*) DESC LIMIT 1"
        )
        assert busiest is not None
        stream, shard, first = busiest
        since = today - timedelta(days=1)
        for sql, args in (
            (BATCH_END, (stream, shard, first, 5)),
            (BATCH_END_BETWEEN, (stream, shard, first, 5, since, today)),
        ):
            # $n as literals: EXPLAIN of the statement with its parameters bound.
            bound = sql
            for n, value in reversed(list(enumerate(args, start=1))):
                literal = (
                    f"'{value.isoformat()}'::timestamptz"
                    if isinstance(value, datetime)
                    else (str(value) if isinstance(value, int) else f"'{value}'")
                )
                bound = bound.replace(f"${n}", literal)
            nodes = await plan_of(conn, bound)
            assert not [n for n in nodes if n["Node Type"] == "Sort"], bound
            assert any(n["Node Type"] == "Index Scan" for n in nodes), bound
            assert await conn.fetchval(sql, *args) is not None, (sql, args)
    finally:
        await conn.close()


#: README queries (a phrase of each) and the index that serves them (migrations 0047-0049).
README_INDEXES = {
    # das.ddl_changes' MySQL half: only the DDL statements of the window
    "FROM das.ddl_changes\nWHERE log_time > now() - interval '7 days'": "statements_ddl",
    # Oracle's grants and user changes: the privilege-change events of the week
    "'GRANT', 'REVOKE', 'CREATE USER', 'ALTER USER'": "activity_events_privilege_changes",
    # fields with no column yet: only the events whose extra is not empty
    "jsonb_object_keys(extra)": "activity_events_extra",
    # who touched a table over a day, row by row (the week's question, das.object_activity_since,
    # is tested in test_activity_counts on an object the fill names)
    "'test1')\n  AND log_time > now() - interval '1 day'": "activity_events_object",
}


async def test_the_readme_queries_can_use_their_indexes(pg_dsn: str) -> None:
    """The README's DDL, Oracle grant, new-field and who-touched-a-table questions can be served
    by their indexes (their WHERE implies each partial index's predicate), not by reading the
    whole window."""
    from tests.test_readme_queries import readme_queries

    await filled(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        # Whether the planner *can* use each index, not whether it is cheaper on a table this
        # small: no sequential scans, and without the plain time indexes (on a few thousand
        # events one of them costs the same as a partial index; dropped in a transaction that
        # is rolled back).
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("DROP INDEX das.activity_events_time, das.statements_time")
        queries = readme_queries()
        for phrase, index in README_INDEXES.items():
            (query,) = [q for q in queries if phrase in q]
            nodes = await plan_of(conn, query)
            used = {await parent_index(conn, name) for name in indexes(nodes)}
            assert index in used, (phrase, used)
            scans = [
                n["Relation Name"]
                for n in nodes
                if n.get("Node Type") == "Seq Scan"
                and str(n.get("Relation Name", "")).startswith(("activity_events_p", "statements"))
            ]
            assert not scans, (phrase, scans)
        await transaction.rollback()
    finally:
        await conn.close()


async def test_the_ddl_statements_rule_is_the_views_old_rule(pg_dsn: str) -> None:
    """das.is_ddl_statement (0047) is the test das.ddl_changes spelled out before (0026), row
    for row, on the fill's MySQL statements (DDL, AUX-only DDL and plain ones)."""
    await filled(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        old = (
            "(command_text ~* '^\\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)\\M' "
            "OR EXISTS (SELECT 1 FROM jsonb_array_elements(aux) a "
            "WHERE a->>'command' ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)'))"
        )
        counts = await conn.fetchrow(
            f"SELECT count(*) FILTER (WHERE {old}) AS ddl, "
            f"count(*) FILTER (WHERE NOT {old}) AS other, "
            f"count(*) FILTER (WHERE {old} IS DISTINCT FROM "
            "das.is_ddl_statement(command_text, aux)) AS differ FROM das.statements"
        )
        assert counts is not None
        assert counts["ddl"] > 0, dict(counts)
        assert counts["other"] > 0, dict(counts)
        assert counts["differ"] == 0, dict(counts)
        # The view's MySQL rows are those statements.
        mysql = await conn.fetchval("SELECT count(*) FROM das.ddl_changes WHERE engine = 'mysql'")
        assert mysql == counts["ddl"]
    finally:
        await conn.close()
