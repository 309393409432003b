"""das.activity_counts and das.object_counts (migrations/0051, 0052): the per-day counts merged
per batch equal the stored events' aggregate, and das.privileged_activity_since and
das.object_activity_since equal the README's old aggregates (of das.privileged_activity, and of
das.activity_events by object), whatever the batches, shards, re-merges, re-drives, rebuilds and
retention; the ingest role merges only through das.merge_sessions, auditors call the
functions."""

from __future__ import annotations

import json
import secrets
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.warehouse.deadletters import KeptRecord, store_redriven
from ingest.warehouse.migrate import migrate
from ingest.warehouse.retention import apply_retention
from ingest.warehouse.sessions import rebuild_sessions
from ingest.warehouse.sink import MERGE_SESSIONS, CopyUnit, DeadLetter, Sink
from tests.fleet import migrated
from tests.test_query_plans import _nodes, filled, indexes, parent_index, plan_of
from tests.warehouse_helpers import STREAM, batch, hold_lease, inner, migrated_pool

#: The README's question before 0051, over the raw events: the function must give exactly this.
RAW = """
SELECT db_user_name, command, count(*) AS events, max(log_time) AS last_seen
FROM das.privileged_activity
WHERE log_time > $1
GROUP BY db_user_name, command
ORDER BY 1, 2
"""
SINCE = "SELECT * FROM das.privileged_activity_since($1) ORDER BY 1, 2"

#: What das.activity_counts must hold: the stored events' aggregate, row for row.
COUNTED = """
SELECT (log_time AT TIME ZONE 'UTC')::date AS day, stream_name, shard_id, db_user_name, command,
       count(*) AS events, max(log_time) AS last_seen
FROM das.activity_events
WHERE log_time IS NOT NULL AND class IS DISTINCT FROM 'AUX'
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4, 5
"""
TABLE = "SELECT * FROM das.activity_counts ORDER BY 1, 2, 3, 4, 5"

#: The README's "Who touched a table" before 0052, over the raw events (AUX events included).
OBJECT_RAW = """
SELECT db_user_name, command, count(*) AS events,
       min(log_time) AS first_seen, max(log_time) AS last_seen
FROM das.activity_events
WHERE object_name = ANY ($1::text[]) AND log_time > $2
GROUP BY db_user_name, command
ORDER BY 1, 2
"""
OBJECT_SINCE = "SELECT * FROM das.object_activity_since($1, $2) ORDER BY 1, 2"
#: What das.object_counts must hold.
OBJECT_COUNTED = """
SELECT object_name, (log_time AT TIME ZONE 'UTC')::date AS day, stream_name, shard_id,
       db_user_name, command, count(*) AS events, min(log_time) AS first_seen,
       max(log_time) AS last_seen
FROM das.activity_events
WHERE log_time IS NOT NULL AND object_name IS NOT NULL
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY 1, 2, 3, 4, 5, 6
"""
OBJECT_TABLE = "SELECT * FROM das.object_counts ORDER BY 1, 2, 3, 4, 5, 6"
#: The objects asked about: the AUX events' table, it with the MAIN events' one, none stored.
OBJECTS = (["t1"], ["public.my_table", "t1"], ["public.my_table"], ["no_such_table"])

Reader = asyncpg.Connection | asyncpg.Pool

#: Events logged every 47 minutes from here: four UTC days (2024-01-01 to -04); the last
#: is outside the test's day partitions (the default partition's).
BASE = datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
USERS = ("rdsadmin", "master", "alice", "root", None)  # alice is not privileged
COMMANDS = ("QUERY", "SELECT", "CONNECT", None)


async def rows_of(conn: Reader, sql: str, *args: object) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(sql, *args)]


async def sinces(conn: Reader) -> list[datetime]:
    """Every event's own time (an event exactly at since is not after it), each UTC midnight and
    noon of the events' days (the function reads a day's events after since from noon on, the
    day's counts less its events up to since before), and times beside them."""
    times = [r["log_time"] for r in await conn.fetch("SELECT log_time FROM das.activity_events")]
    first, last = min(times), max(times)
    midnight = datetime.combine(first.date(), datetime.min.time(), tzinfo=UTC)
    found = set(times)
    while midnight <= last + timedelta(days=1):
        day = midnight - timedelta(days=1)
        for offset in (0, 1, 12 * 60 - 1, 12 * 60, 12 * 60 + 1, 24 * 60 - 1):
            found.add(day + timedelta(minutes=offset))
        for moment in (day, day + timedelta(hours=12)):
            found.update((moment - timedelta(microseconds=1), moment + timedelta(microseconds=1)))
        midnight += timedelta(days=1)
    found.add(first - timedelta(microseconds=1))
    return sorted(found)


async def assert_exact(conn: Reader) -> int:
    """The counts are the events' aggregate, and the function is the raw question for every
    since; returns how many answers had rows (so a test knows it asked something)."""
    assert await rows_of(conn, TABLE) == await rows_of(conn, COUNTED)
    assert await rows_of(conn, OBJECT_TABLE) == await rows_of(conn, OBJECT_COUNTED)
    answered = 0
    for since in await sinces(conn):
        raw = await rows_of(conn, RAW, since)
        assert await rows_of(conn, SINCE, since) == raw, since
        answered += bool(raw)
        for objects in OBJECTS:
            raw = await rows_of(conn, OBJECT_RAW, objects, since)
            assert await rows_of(conn, OBJECT_SINCE, objects, since) == raw, (objects, since)
            answered += bool(raw)
    return answered


def _event(n: int, user: str | None, command: str | None, **fields: object) -> dict[str, Any]:
    at = BASE + timedelta(minutes=47 * n)
    event: dict[str, Any] = {
        "type": "record",
        "class": "MAIN",
        "logTime": f"{at:%Y-%m-%d %H:%M:%S}.{n:06d}+00",
        "sessionId": str(1000 + n % 3),
        "pid": 7,
        "serverType": "MySQL",
        "statementId": n,
        "substatementId": 1,
        **fields,
    }
    if user is not None:
        event["dbUserName"] = user
    if command is not None:
        event["command"] = command
    return event


def _record(n: int) -> bytes:
    user, command = USERS[n % len(USERS)], COMMANDS[n % len(COMMANDS)]
    # Every third statement names its table in the MAIN event (as Aurora PostgreSQL's do).
    main = _event(n, user, command, **({"objectName": "public.my_table"} if n % 3 == 0 else {}))
    if n % 2:
        # The statement's AUX event (the table it read): not counted, as the view does not
        # list it (it logs a second earlier, as Aurora's can).
        aux = _event(n, user, "READ", substatementId=2, objectName="t1", **{"class": "AUX"})
        aux["logTime"] = aux["logTime"].replace(":00.", ":01.", 1)
        return inner(main, aux)
    return inner(main)


async def _commit(
    sink: Sink, token: Any, previous: str, records: list[tuple[str, bytes]], **kw: Any
) -> str:
    output = batch(token.shard_id, records)
    await sink.ensure_partitions(output.days)
    last = records[-1][0]
    for letter in kw.get("dead_letters", ()):
        last = max(last, letter.sequence_number, key=int)
    await sink.commit(
        token,
        previous_checkpoint=previous,
        new_checkpoint=last,
        units=[CopyUnit(output.events, output.statements, chain=output.chain)],
        sequence_range=(records[0][0], last),
        **kw,
    )
    return last


async def test_counts_merged_per_batch_answer_the_raw_question_exactly(pg_dsn: str) -> None:
    """Two shards, batches of a few records over four UTC days (privileged and other users,
    MySQL AUX events, events with no user or command, one day in the default partition), a
    batch merged twice, a dead letter re-driven after its shard's later batches, a rebuild."""
    pool = await migrated_pool(pg_dsn)
    try:
        await pool.execute("SELECT das.ensure_partitions('2023-12-31', '2024-01-03')")
        sink = Sink(pool)
        numbers = list(range(120))
        lost = 18  # shard s1's record 17 is dead-lettered, then re-driven
        for shard in ("s1", "s2"):
            token, _ = await hold_lease(pool, shard, "w")
            mine = [n for n in numbers if n % 2 == (shard == "s2")]
            checkpoint = "TRIM_HORIZON"
            for at in range(0, len(mine), 4):
                records = [(str(100 + n), _record(n)) for n in mine[at : at + 4] if n != lost]
                letters = [
                    DeadLetter(str(100 + lost), None, None, "decrypt", "test: lost", _record(lost))
                    for n in mine[at : at + 4]
                    if n == lost
                ]
                checkpoint = await _commit(sink, token, checkpoint, records, dead_letters=letters)
        assert await assert_exact(pool) > 10
        counted = await rows_of(pool, TABLE)
        assert {r["day"].isoformat() for r in counted} == {
            "2024-01-01",
            "2024-01-02",
            "2024-01-03",
            "2024-01-04",
        }
        assert await pool.fetchval("SELECT count(*) FROM das.activity_events_default") > 0
        assert await pool.fetchval("SELECT count(*) FROM das.activity_events WHERE class = 'AUX'")
        assert {r["db_user_name"] for r in counted} == set(USERS)
        # Rows were merged, not only inserted: a day's user and command met in several batches.
        assert any(r["events"] > 1 for r in counted)

        # Every batch merged again: skipped by the guard, nothing counts twice.
        for shard in ("s1", "s2"):
            span = await pool.fetchrow(
                "SELECT min(sequence_number)::text, max(sequence_number)::text "
                "FROM das.activity_events WHERE shard_id = $1",
                shard,
            )
            assert span is not None
            assert await pool.fetchval(MERGE_SESSIONS, STREAM, shard, *span) == -1
        assert await rows_of(pool, TABLE) == counted

        # The dead letter re-driven: its shard's guard is past it; its events are added once.
        before = await rows_of(pool, SINCE, BASE)
        letter = await pool.fetchval("SELECT id FROM das.dead_letters")
        redriven = batch("s1", [(str(100 + lost), _record(lost))])
        async with pool.acquire() as conn:
            await store_redriven(
                conn,
                KeptRecord(letter, STREAM, "s1", str(100 + lost), None, None, _record(lost)),
                [CopyUnit(redriven.events, redriven.statements, chain=redriven.chain)],
                [],
            )
        await assert_exact(pool)
        after = await rows_of(pool, SINCE, BASE)
        assert sum(r["events"] for r in after) == sum(r["events"] for r in before) + 1

        # A rebuild recomputes the counts (here from tables an accident emptied).
        counted = await rows_of(pool, TABLE)
        by_object = await rows_of(pool, OBJECT_TABLE)
        assert {r["object_name"] for r in by_object} == {"t1", "public.my_table"}
        assert any(r["events"] > 1 for r in by_object)
        await pool.execute("DELETE FROM das.activity_counts")
        await pool.execute("DELETE FROM das.object_counts")
        async with pool.acquire() as conn:
            await rebuild_sessions(conn)
        assert await rows_of(pool, TABLE) == counted
        assert await rows_of(pool, OBJECT_TABLE) == by_object
        await assert_exact(pool)

        # The privileged users as listed when asked: no rebuild needed.
        await pool.execute("INSERT INTO das.privileged_users VALUES ('alice', 'test')")
        assert "alice" in {r["db_user_name"] for r in await rows_of(pool, SINCE, BASE)}
        await assert_exact(pool)
    finally:
        await pool.close()


def _migrations_before(directory: Path, version: str) -> Path:
    directory.mkdir()
    for sql in sorted((Path(__file__).resolve().parents[1] / "migrations").glob("*.sql")):
        if sql.name < version:
            shutil.copy(sql, directory / sql.name)
    return directory


async def test_the_migration_counts_the_events_stored_before_it(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A warehouse at 0050 with events (merged into the sessions only): 0051's backfill counts
    every one of them, and batches after it are merged on top."""
    before = _migrations_before(tmp_path / "migrations", "0051")
    owner = await asyncpg.connect(pg_dsn)
    try:
        await migrate(owner, directory=before)
    finally:
        await owner.close()
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await pool.execute("SELECT das.ensure_partitions('2023-12-31', '2024-01-05')")
        token, _ = await hold_lease(pool, "s1", "w")
        sink = Sink(pool)
        checkpoint = await _commit(
            sink, token, "TRIM_HORIZON", [(str(100 + n), _record(n)) for n in range(40)]
        )
        assert await pool.fetchval("SELECT to_regclass('das.activity_counts')") is None
        async with pool.acquire() as conn:
            await migrate(conn)
        assert await assert_exact(pool) > 5
        await _commit(sink, token, checkpoint, [(str(100 + n), _record(n)) for n in range(40, 80)])
        assert await assert_exact(pool) > 5
    finally:
        await pool.close()


async def test_retention_drops_the_counts_of_the_days_it_drops(pg_dsn: str) -> None:
    """bench.fill's traffic (the emulator's users, MySQL AUX events) over four day partitions,
    committed by the sink; retention drops the oldest days, their counts with them."""
    today = await filled(pg_dsn, days=4)
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await assert_exact(conn) > 0
        before = await rows_of(conn, TABLE)
        by_object = await rows_of(conn, OBJECT_TABLE)
        keep = timedelta(days=2)
        cutoff = today - keep
        actions = await apply_retention(conn, keep, now=today + timedelta(hours=12))
        assert [a.partition for a in actions if a.refused is None]
        after = await rows_of(conn, TABLE)
        assert [r for r in before if r["day"] < cutoff.date()], "the fill has days dropped"
        assert after == [r for r in before if r["day"] >= cutoff.date()]
        assert [r for r in by_object if r["day"] < cutoff.date()], "the fill names objects"
        assert await rows_of(conn, OBJECT_TABLE) == [
            r for r in by_object if r["day"] >= cutoff.date()
        ]
        assert await assert_exact(conn) > 0
    finally:
        await conn.close()


async def test_the_question_reads_the_counts_and_half_of_the_first_day(pg_dsn: str) -> None:
    """Asked from three days ago: the counts and the events of that day's partition, and of
    those only one side of since (after it from noon on, up to it before noon) is executed."""
    today = await filled(pg_dsn, days=4)
    conn = await asyncpg.connect(pg_dsn)
    try:
        for hour in (3, 12, 21):
            since = today - timedelta(days=3) + timedelta(hours=hour)
            sql = f"SELECT * FROM das.privileged_activity_since('{since.isoformat()}')"
            nodes = await plan_of(conn, sql)
            read = {n.get("Relation Name") for n in nodes} - {None}
            first_day = f"activity_events_p{since:%Y%m%d}"
            assert read == {"activity_counts", "privileged_users", first_day}, read
            plan = json.loads(
                await conn.fetchval(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}")
            )
            executed = [
                n
                for n in _nodes(plan[0]["Plan"])
                if n.get("Relation Name") == first_day and n.get("Actual Loops", 0) > 0
            ]
            assert len(executed) == 1, (hour, executed)
            # log_time <= since: the events up to since (the other side: log_time > since)
            assert ("log_time <= " in json.dumps(executed[0])) == (hour < 12), executed[0]
    finally:
        await conn.close()


async def test_who_touched_a_table_reads_the_counts_and_the_first_day(pg_dsn: str) -> None:
    """das.object_activity_since reads das.object_counts and the first day's partition only,
    the events of the objects through an index (never a scan of the day)."""
    today = await filled(pg_dsn, days=4)
    conn = await asyncpg.connect(pg_dsn)
    try:
        busiest = await conn.fetchval(
            "SELECT object_name FROM das.object_counts GROUP BY 1 ORDER BY sum(events) DESC"
        )
        assert busiest
        since = today - timedelta(days=3) + timedelta(hours=5)
        sql = f"SELECT * FROM das.object_activity_since(ARRAY['{busiest}'], '{since.isoformat()}')"
        nodes = await plan_of(conn, sql)
        read = {n.get("Relation Name") for n in nodes} - {None}
        assert read == {"object_counts", f"activity_events_p{since:%Y%m%d}"}, read
        # (the counts are a few hundred rows here: scanning them is the planner's right choice)
        scans = {n.get("Relation Name") for n in nodes if n.get("Node Type") == "Seq Scan"}
        assert not scans - {"object_counts"}, scans
        # the first day's events of the object, through the index on (object_name, log_time)
        used = {await parent_index(conn, name) for name in indexes(nodes)}
        assert "activity_events_object" in used, used
        assert await rows_of(conn, OBJECT_SINCE, [busiest], since) == await rows_of(
            conn, OBJECT_RAW, [busiest], since
        )
    finally:
        await conn.close()


async def test_the_ingest_role_cannot_write_the_counts_and_auditors_ask(pg_dsn: str) -> None:
    """The ingest role has no privilege on das.activity_counts and may not call the unguarded
    add or the rebuild; analysts and verifiers call das.privileged_activity_since."""
    from tests.test_security import login_role

    await migrated(pg_dsn)
    ingest = await asyncpg.connect(await login_role(pg_dsn, "das_ingest", secrets.token_hex(8)))
    readers = [
        await asyncpg.connect(await login_role(pg_dsn, group, secrets.token_hex(8)))
        for group in ("das_analyst", "das_verifier")
    ]
    try:
        assert await ingest.fetchval(MERGE_SESSIONS, STREAM, "s", "1", "9") == 0
        for statement in (
            "SELECT count(*) FROM das.activity_counts",
            "INSERT INTO das.activity_counts VALUES "
            "('2024-01-01', 's', 's', 'rdsadmin', 'QUERY', 1000, now())",
            "UPDATE das.activity_counts SET events = 0",
            "DELETE FROM das.activity_counts",
            "SELECT das.add_derived_events('s', 's', 1, 9)",
            "SELECT das.rebuild_activity_counts()",
            "SELECT das.rebuild_object_counts()",
            "SELECT count(*) FROM das.object_counts",
            "DELETE FROM das.object_counts",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await ingest.execute(statement)
        for reader in readers:
            assert await reader.fetch(SINCE, BASE) == []
            assert await reader.fetch(OBJECT_SINCE, ["t1"], BASE) == []
            for table in ("das.activity_counts", "das.object_counts"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await reader.execute(f"DELETE FROM {table}")
    finally:
        await ingest.close()
        for reader in readers:
            await reader.close()
