"""das.session_summaries (migrations/0050): sessions merged per batch equal the old view's
aggregate of the stored events, whatever the batches, shards, re-merges, re-drives, rebuilds and
retention; and the sessions questions read it through an index, no event partition."""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from ingest.warehouse.deadletters import KeptRecord, store_redriven
from ingest.warehouse.retention import apply_retention
from ingest.warehouse.sessions import rebuild_sessions
from ingest.warehouse.sink import MERGE_SESSIONS, CopyUnit, DeadLetter, Sink, store_units
from tests.fleet import Fleet, assert_exactly_once, expected, migrated, options, produce, stored
from tests.test_query_plans import filled, indexes, plan_of
from tests.warehouse_helpers import STREAM, batch, hold_lease, inner, migrated_pool

#: das.sessions as migration 0008 defined it: every event of every session aggregated. The
#: table must give exactly this, row for row.
OLD_VIEW = """
SELECT
    das.engine(record_version, server_type)                  AS engine,
    cluster_id,
    instance_id,
    session_id,
    pid,
    max(db_user_name)                                        AS db_user_name,
    max(database_name)                                       AS database_name,
    max(remote_host)                                         AS remote_host,
    max(client_application)                                  AS client_application,
    max(server_type)                                         AS server_type,
    min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)) AS connected_at,
    max(log_time) FILTER (WHERE das.is_session_end(command)) AS disconnected_at,
    max(log_time) FILTER (WHERE das.is_session_end(command))
      - min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)) AS duration,
    min(log_time)                                            AS first_event_at,
    max(log_time)                                            AS last_event_at,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX')     AS statements,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                       AND das.event_failed(record_version, error_message, exit_code))
                                                             AS failed_statements
FROM das.activity_events
WHERE session_id IS NOT NULL
  AND NOT (record_version = '1.4' AND session_id = '0')
GROUP BY das.engine(record_version, server_type), cluster_id, instance_id, session_id, pid
ORDER BY 1, 2, 3, 4, 5
"""

Reader = asyncpg.Connection | asyncpg.Pool

TABLE = "SELECT * FROM das.sessions ORDER BY 1, 2, 3, 4, 5"


async def sessions_of(conn: Reader, sql: str = TABLE) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(sql)]


async def assert_as_the_old_view(conn: Reader) -> list[dict[str, Any]]:
    merged = await sessions_of(conn)
    assert merged == await sessions_of(conn, OLD_VIEW)
    return merged


async def guards_of(conn: asyncpg.Connection) -> dict[str, str]:
    rows = await conn.fetch("SELECT shard_id, merged_through::text AS m FROM das.session_merges")
    return {r["shard_id"]: r["m"] for r in rows}


@pytest.mark.usefixtures("aws_env")
async def test_a_fleet_of_all_engines_merges_the_old_views_sessions(
    fleet: Fleet, pg_dsn: str
) -> None:
    """Mixed traffic of the four engines over two shards, read by two real workers: the merged
    sessions are the old view's aggregate of the stored events, row for row; merging every
    shard's range again changes nothing; a rebuild gives exactly the merged rows."""
    await migrated(pg_dsn)
    stream = f"aws-rds-das-cluster-{secrets.token_hex(6).upper()}"
    opts = options(stream, engine="all", count=1600, shards=2, instances=4)
    await produce(opts)
    workers = [
        await fleet.start(
            name, stream, pg_dsn, "--processes", "0", "--max-records", "7", "--stop-when-idle", "2"
        )
        for name in ("w1", "w2")
    ]
    for worker in workers:
        assert await worker.wait(120) == 0
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    conn = await asyncpg.connect(pg_dsn)
    try:
        merged = await assert_as_the_old_view(conn)
        assert {r["engine"] for r in merged} == {"postgresql", "mysql", "oracle", "sqlserver"}
        assert any(r["duration"] is not None for r in merged)
        assert any(r["failed_statements"] > 0 for r in merged)
        # Each shard was committed, so merged, in several batches (a chain link each).
        commits = await conn.fetchval(
            "SELECT min(n) FROM (SELECT count(*) AS n FROM das.chain_links "
            "WHERE stream_name = $1 GROUP BY shard_id) AS c",
            stream,
        )
        assert commits > 1
        # ... and sessions have events in several of them: their rows were merged, not just
        # inserted.
        spanning = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM das.activity_events e JOIN das.chain_links l "
            "ON l.stream_name = e.stream_name AND l.shard_id = e.shard_id "
            "AND e.sequence_number BETWEEN l.first_sequence AND l.last_sequence "
            "WHERE e.session_id IS NOT NULL "
            "GROUP BY e.cluster_id, e.instance_id, e.session_id, e.pid "
            "HAVING count(DISTINCT (l.shard_id, l.link_no)) > 1) AS s"
        )
        assert spanning > 0
        shards = await conn.fetch(
            "SELECT shard_id, min(sequence_number)::text AS first, "
            "max(sequence_number)::text AS last "
            "FROM das.activity_events GROUP BY shard_id ORDER BY shard_id"
        )
        assert len(shards) == 2
        # The guard of each shard is at its last event.
        assert await guards_of(conn) == {s["shard_id"]: s["last"] for s in shards}
        for shard in shards:
            skipped = await conn.fetchval(
                MERGE_SESSIONS, stream, shard["shard_id"], shard["first"], shard["last"]
            )
            assert skipped == -1
        assert await sessions_of(conn) == merged
        assert await rebuild_sessions(conn) == len(merged)
        assert await sessions_of(conn) == merged
        assert await guards_of(conn) == {s["shard_id"]: s["last"] for s in shards}
    finally:
        await conn.close()


def _event(command: str, second: int, **fields: object) -> dict[str, object]:
    return {
        "type": "record",
        "command": command,
        "logTime": f"2024-01-01 10:00:{second:02d}+00",
        "sessionId": "s.1",
        "pid": 7,
        "dbUserName": "alice",
        **fields,
    }


async def test_a_redriven_record_and_a_rebuild_beside_a_worker_count_once(pg_dsn: str) -> None:
    """A dead-lettered record re-driven after later records were merged (its sequence number
    is below the shard's guard) is added; a worker whose batch was copied while a rebuild held
    the guards merges it after the rebuild, once."""
    pool = await migrated_pool(pg_dsn)
    try:
        await pool.execute("SELECT das.ensure_partitions('2023-12-31', '2024-01-02')")
        token, _ = await hold_lease(pool, "s", "w")
        sink = Sink(pool)
        first = batch("s", [("1", inner(_event("CONNECT", 0))), ("2", inner(_event("SELECT", 1)))])
        lost = inner(_event("SELECT", 2, exitCode="1045", errorMessage="denied"))
        await sink.commit(
            token,
            previous_checkpoint="TRIM_HORIZON",
            new_checkpoint="3",
            units=[CopyUnit(first.events, first.statements, chain=first.chain)],
            dead_letters=[DeadLetter("3", None, None, "decrypt", "test: lost", lost)],
            sequence_range=("1", "3"),
        )
        later = batch("s", [("4", inner(_event("SELECT", 3)))])
        await sink.commit(
            token,
            previous_checkpoint="3",
            new_checkpoint="4",
            units=[CopyUnit(later.events, later.statements, chain=later.chain)],
            sequence_range=("4", "4"),
        )
        (row,) = await sessions_of(pool)
        assert row["statements"] == 3  # CONNECT and two SELECTs: the dead letter is missing

        letter = await pool.fetchval("SELECT id FROM das.dead_letters")
        redriven = batch("s", [("3", lost)])
        async with pool.acquire() as conn:
            await store_redriven(
                conn,
                KeptRecord(letter, STREAM, "s", "3", None, None, lost),
                [CopyUnit(redriven.events, redriven.statements, chain=redriven.chain)],
                [],
            )
        (row,) = await assert_as_the_old_view(pool)
        assert (row["statements"], row["failed_statements"]) == (4, 1)

        # A worker's batch copied, not yet merged, when a rebuild takes the guards.
        last = batch("s", [("5", inner(_event("DISCONNECT", 9)))])
        async with (
            pool.acquire() as worker,
            pool.acquire() as rebuilder,
            worker.transaction(),
        ):
            await store_units(worker, STREAM, "s", [CopyUnit(last.events, None)])
            async with rebuilder.transaction():
                assert await rebuilder.fetchval("SELECT das.rebuild_sessions()") == 1
                merge = asyncio.ensure_future(
                    worker.fetchval(MERGE_SESSIONS, STREAM, "s", "5", "5")
                )
                await asyncio.sleep(0.5)
                assert not merge.done(), "the merge waits for the rebuild"
            assert await merge == 1  # after the rebuild (which saw up to 4): merged
        (row,) = await assert_as_the_old_view(pool)
        assert (row["statements"], row["disconnected_at"] is not None) == (5, True)
    finally:
        await pool.close()


async def test_retention_drops_the_sessions_wholly_before_its_cutoff(pg_dsn: str) -> None:
    today = await filled(pg_dsn, days=4)
    conn = await asyncpg.connect(pg_dsn)
    try:
        before = await assert_as_the_old_view(conn)
        keep = timedelta(days=2)
        now = today + timedelta(hours=12)
        cutoff = today - keep
        actions = await apply_retention(conn, keep, now=now)
        assert [a.partition for a in actions if a.refused is None]
        after = await sessions_of(conn)
        gone = [r for r in before if r["last_event_at"] < cutoff]
        kept = [r for r in before if r["last_event_at"] >= cutoff]
        assert gone, "the fill has sessions wholly before the cutoff"
        assert kept
        # The sessions that lost no event keep their rows as they were.
        assert after == kept
        assert min(r["first_event_at"] for r in after) >= cutoff - timedelta(days=1)
    finally:
        await conn.close()


#: The sessions questions (bench.scale's, and the README's), and the index each can use.
PLANS = {
    "SELECT * FROM das.sessions WHERE connected_at >= {since} AND connected_at < {until} "
    "ORDER BY connected_at DESC LIMIT 50": "session_summaries_connected",
    "SELECT * FROM das.sessions WHERE db_user_name = 'alice' AND connected_at >= {since} "
    "AND connected_at < {until} ORDER BY connected_at DESC LIMIT 50": (
        "session_summaries_user_connected"
    ),
    "SELECT * FROM das.sessions_between({since}, {until})": "session_summaries_last_event",
}


async def test_the_sessions_questions_use_an_index_and_no_event_partition(pg_dsn: str) -> None:
    from tests.test_readme_queries import readme_queries

    today = await filled(pg_dsn)
    day = today - timedelta(days=1)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await assert_as_the_old_view(conn)
        # Cheap scans win on a small table: ask whether the planner *can* use the index.
        await conn.execute("SET enable_seqscan = off")
        bounds = {"since": f"'{day.isoformat()}'", "until": f"'{today.isoformat()}'"}
        for sql, index in PLANS.items():
            nodes = await plan_of(conn, sql.format(**bounds))
            assert index in indexes(nodes), (sql, indexes(nodes))
            assert {n.get("Relation Name") for n in nodes} - {None} == {"session_summaries"}
        readme = [q for q in readme_queries() if "das.sessions" in q]
        assert len(readme) == 2
        for sql in readme:
            nodes = await plan_of(conn, sql)
            assert {n.get("Relation Name") for n in nodes} - {None} == {"session_summaries"}
            assert indexes(nodes), sql
    finally:
        await conn.close()


async def test_the_ingest_role_merges_only_through_the_function(pg_dsn: str) -> None:
    """The ingest role has no privilege on the session tables and may call das.merge_sessions
    only (not the unguarded add, the re-drive's merge or the rebuild); analysts read."""
    from tests.test_security import login_role

    await migrated(pg_dsn)
    ingest = await asyncpg.connect(await login_role(pg_dsn, "das_ingest", secrets.token_hex(8)))
    analyst = await asyncpg.connect(await login_role(pg_dsn, "das_analyst", secrets.token_hex(8)))
    try:
        assert await ingest.fetchval(MERGE_SESSIONS, STREAM, "s", "1", "9") == 0
        for statement in (
            "SELECT count(*) FROM das.sessions",
            "INSERT INTO das.session_summaries (session_id, statements, failed_statements) "
            "VALUES ('x', 1, 0)",
            "UPDATE das.session_summaries SET statements = 0",
            "DELETE FROM das.session_summaries",
            "UPDATE das.session_merges SET merged_through = 0",
            "DELETE FROM das.session_merges",
            "SELECT das.add_derived_events('s', 's', 1, 9)",
            "SELECT das.merge_redriven_sessions('s', 's', 1)",
            "SELECT das.rebuild_sessions()",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await ingest.execute(statement)
        assert await analyst.fetchval("SELECT count(*) FROM das.sessions") == 0
        assert (
            await analyst.fetchval(
                "SELECT count(*) FROM das.sessions_between('-infinity', 'infinity')"
            )
            == 0
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await analyst.execute(MERGE_SESSIONS, STREAM, "s", "10", "19")
    finally:
        await ingest.close()
        await analyst.close()
