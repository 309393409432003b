"""Every SQL example in the README runs, as the read-only analyst role, on a populated warehouse,
and the views answer what they claim on the seed's examples."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from ingest.decode.batch import BatchInput, KeyedRecord, decode_batch
from tests.sealing import seal
from tests.seed_examples import SEED_EXAMPLES
from tests.warehouse_helpers import (
    ESDK,
    KEY,
    STREAM,
    batch,
    hold_lease,
    inner,
    migrated_pool,
    store,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_queries() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), re.S)
    queries = [q.strip() for block in blocks for q in block.split(";") if q.strip()]
    assert len(queries) >= 10
    return queries


async def test_readme_queries_run_as_the_analyst(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        items = [
            KeyedRecord(i, str(i + 1), seal(doc.encode(), KEY, version), KEY)
            for i, (version, doc) in enumerate(SEED_EXAMPLES.values())
        ]
        output = decode_batch(BatchInput("s", items, ESDK, stream_name=STREAM))
        await store(pool, token, output, "TRIM_HORIZON", str(len(items)))
        analyst = f"a_{secrets.token_hex(4)}"
        await pool.execute(f"CREATE ROLE {analyst} LOGIN IN ROLE das_analyst")
    finally:
        await pool.close()
    conn = await asyncpg.connect(
        pg_dsn.replace("postgresql://postgres@", f"postgresql://{analyst}@")
    )
    try:
        for query in readme_queries():
            await conn.fetch(query)  # raises on any error
        ddl = await conn.fetch("SELECT command, object_name FROM das.ddl_changes ORDER BY 1")
        assert [tuple(r) for r in ddl] == [("CREATE", "test1"), ("CREATE TABLE", None)]
        privileged = await conn.fetchval("SELECT count(*) FROM das.privileged_activity")
        assert privileged == 6  # rdsadmin x4 (PG) + rdsadmin/master MAIN events (MySQL)
        statements = await conn.fetch(
            "SELECT statement_id, has_main, jsonb_array_length(aux) AS n FROM das.statements "
            "ORDER BY statement_id"
        )
        # The seed's MySQL CONNECT (class MAIN, statementId 0) is a connection, not a
        # statement: it stays in activity_events only.
        assert [tuple(r) for r in statements] == [
            (65459278, True, 1),
            (65469218, True, 1),
        ]
        connects = await conn.fetch(
            "SELECT statement_id FROM das.activity_events "
            "WHERE server_type = 'MySQL' AND command = 'CONNECT'"
        )
        assert [r["statement_id"] for r in connects] == [0]
    finally:
        await conn.close()


async def test_views_classify_failures_sessions_and_logins(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        session = {"sessionId": "abc.1", "pid": 7, "dbUserName": "alice", "remoteHost": "10.0.0.9"}
        records = [
            (
                "1",
                inner(
                    {
                        "type": "record",
                        "command": "CONNECT",
                        "logTime": "2024-01-01 10:00:00+00",
                        **session,
                    }
                ),
            ),
            (
                "2",
                inner(
                    {
                        "type": "record",
                        "command": "SELECT",
                        "commandText": "select 1/0",
                        "errorMessage": "division by zero",
                        "exitCode": "22012",
                        "logTime": "2024-01-01 10:00:01+00",
                        **session,
                    }
                ),
            ),
            (
                "3",
                inner(
                    {
                        "type": "record",
                        "command": "SELECT",
                        "commandText": "select 1",
                        "logTime": "2024-01-01 10:00:02+00",
                        **session,
                    }
                ),
            ),
            (
                "4",
                inner(
                    {
                        "type": "record",
                        "command": "DISCONNECT",
                        "logTime": "2024-01-01 10:05:00+00",
                        **session,
                    }
                ),
            ),
            (
                "5",
                inner(
                    {
                        "type": "record",
                        "command": "FAILED_CONNECT",
                        "dbUserName": "mallory",
                        "exitCode": "1045",
                        "logTime": "2024-01-01 11:00:00+00",
                        "sessionId": "9",
                    }
                ),
            ),
        ]
        await store(pool, token, batch("s", records), "TRIM_HORIZON", "5")
        failed = await pool.fetch("SELECT command_text FROM das.failed_statements")
        assert [r["command_text"] for r in failed] == ["select 1/0"]
        logins = await pool.fetch("SELECT db_user_name FROM das.failed_logins")
        assert [r["db_user_name"] for r in logins] == ["mallory"]
        row = await pool.fetchrow("SELECT * FROM das.sessions WHERE session_id = 'abc.1'")
        assert row is not None
        assert row["db_user_name"] == "alice"
        assert row["duration"].total_seconds() == 300
        assert row["statements"] == 4
        assert row["failed_statements"] == 1
    finally:
        await pool.close()


def recent(*activities: list[dict[str, Any]]) -> None:
    """Move the events in time, their spacing kept, so the earliest was logged 40 minutes ago:
    the README's questions are bounded by time (the last hour, day or week)."""
    events = [e for activity in activities for e in activity]
    first = min(datetime.fromisoformat(e["logTime"][:19]) for e in events)
    base = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(minutes=40)
    for event in events:
        moved = base + (datetime.fromisoformat(event["logTime"][:19]) - first)
        event["logTime"] = f"{moved:%Y-%m-%d %H:%M:%S}{event['logTime'][19:]}"


async def test_readme_queries_answer_for_oracle_and_sqlserver(pg_dsn: str) -> None:
    """The README's per-engine examples, as the analyst, on RDS for Oracle and RDS for SQL
    Server activity built from the field tables (logged in the last hour: the examples are
    bounded by time): each finds what it promises."""
    from tests.rds_examples import (
        ORACLE_INSTANCE,
        SQLSERVER_INSTANCE,
        inner_document,
        oracle_events,
        sqlserver_events,
    )

    oracle_activity, sqlserver_activity = oracle_events(), sqlserver_events()
    recent(oracle_activity, sqlserver_activity)
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        oracle = [(str(n + 1), inner_document(ORACLE_INSTANCE, e)) for n, e in
                  enumerate(oracle_activity)]  # fmt: skip
        await store(pool, token, batch("s", oracle, "1.3"), "TRIM_HORIZON", oracle[-1][0])
        sqlserver = [(str(n + 100), inner_document(SQLSERVER_INSTANCE, e)) for n, e in
                     enumerate(sqlserver_activity)]  # fmt: skip
        await store(pool, token, batch("s", sqlserver, "1.4"), oracle[-1][0], sqlserver[-1][0])
        analyst = f"a_{secrets.token_hex(4)}"
        await pool.execute(f"CREATE ROLE {analyst} LOGIN IN ROLE das_analyst")
    finally:
        await pool.close()
    conn = await asyncpg.connect(
        pg_dsn.replace("postgresql://postgres@", f"postgresql://{analyst}@")
    )
    try:
        answers: dict[str, int] = {}
        sessions: list[asyncpg.Record] = []
        for query in readme_queries():
            rows = await conn.fetch(query)
            if "sessions of the last hour" in query or (
                "das.sessions_between(now() - interval '1 hour'" in query
            ):
                sessions = rows
            if any(f"engine = '{e}'" in query for e in ("oracle", "sqlserver")) or (
                "das.sqlserver_statements" in query
            ):
                answers[query] = len(rows)
        assert len(answers) == 5, "the README has two Oracle and three SQL Server examples"
        expected = {
            "exit_code = '1017'": 1,  # MALLORY's ORA-01017
            "'CREATE USER', 'ALTER USER'": 2,  # the GRANT and SYS's ALTER USER
            "FROM das.failed_logins\nWHERE engine = 'sqlserver'": 1,
            "'ADD MEMBER', 'DROP MEMBER'": 2,
            "FROM das.sqlserver_statements": 1,  # the statement split over three events
        }
        for needle, count in expected.items():
            (query,) = [q for q in answers if needle in q]
            assert answers[query] == count, query
        # Sessions of the last hour, side by side: APP's Oracle session (MALLORY's ORA-01017
        # opened none) and app's SQL Server session (55), each with its failed statement.
        assert [(r["engine"], r["db_user_name"], r["failed_statements"]) for r in sessions] == [
            ("oracle", "APP", 1),
            ("sqlserver", "app", 1),
        ]
    finally:
        await conn.close()
