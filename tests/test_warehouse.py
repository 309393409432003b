"""The audit warehouse against a real PostgreSQL: migrations, COPY, correlation, roles, fencing,
partitions, retention, heartbeats."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.decode.batch import BatchInput, DecoderConfig, KeyedRecord, decode_batch
from ingest.decode.normalize import unescape_text
from ingest.emulate.producer import EmulateOptions
from ingest.emulate.traffic import InnerRecord
from ingest.errors import ConfigError
from ingest.warehouse.leases import LeaseStore
from ingest.warehouse.migrate import (
    load_migrations,
    migrate,
    migrations_dir,
    require_current_schema,
    schema_version,
)
from ingest.warehouse.retention import apply_retention, parse_keep
from ingest.warehouse.sink import CopyUnit, DeadLetter, LeaseLostError, Sink
from ingest.warehouse.statements import rebuild_statements
from tests.sealing import seal
from tests.seed_examples import SEED_EXAMPLES
from tests.test_decode_seed import ATTRS, EXPECTED
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

# -- migrations -----------------------------------------------------------------------------


async def test_migrate_from_empty_then_again_is_a_no_op(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await schema_version(conn) == 0
        first = await migrate(conn)
        # every migration, in numeric order (the numbering may have gaps: ranges per branch)
        known = [m.version for m in load_migrations()]
        assert known == sorted(known)
        assert known[:5] == [1, 2, 3, 4, 5]
        latest = known[-1]
        assert [m.version for m in first.applied] == known
        assert await schema_version(conn) == latest
        second = await migrate(conn)
        assert second.applied == []
        rows = await conn.fetch("SELECT version FROM das.schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == known
        for table in ("activity_events", "statements", "dead_letters", "heartbeats", "leases"):
            assert await conn.fetchval("SELECT to_regclass($1)", f"das.{table}") is not None
    finally:
        await conn.close()


def test_migration_numbers_may_have_gaps_but_not_repeat(tmp_path: Path) -> None:
    """Each branch of work owns a range of numbers (docs: 0006-0009, 0010-0014, ...)."""
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0010_b.sql").write_text("SELECT 1;")
    assert [m.version for m in load_migrations(tmp_path)] == [1, 10]
    (tmp_path / "0010_c.sql").write_text("SELECT 1;")
    with pytest.raises(ConfigError, match="distinct"):
        load_migrations(tmp_path)


async def test_a_lower_migration_that_arrives_later_is_applied_and_required(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A branch's migration (say 0006) can land after a higher one (0010) was applied: migrate
    applies it then, and until it has, the schema is not current."""
    everything = load_migrations()
    # Below the last, applied late here: one the later migrations do not build on (0049, an
    # index; 0051 redefines 0050's functions, so 0050 could not arrive after it).
    (lower,) = [m for m in everything if m.version == 49]
    assert lower.version < everything[-1].version
    for m in everything:
        if m.version != lower.version:
            (tmp_path / f"{m.version:04d}_{m.name}.sql").write_text(m.sql)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, directory=tmp_path)
        with pytest.raises(ConfigError, match=f"migration {lower.version:04d} is not applied"):
            await require_current_schema(conn)
        report = await migrate(conn)
        assert [m.version for m in report.applied] == [lower.version]
        assert await require_current_schema(conn) == everything[-1].version
    finally:
        await conn.close()


async def test_concurrent_migrates_apply_each_migration_once(pg_dsn: str) -> None:
    conns = [await asyncpg.connect(pg_dsn) for _ in range(3)]
    try:
        reports = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(m.version for r in reports for m in r.applied)
        assert applied == [m.version for m in load_migrations()]
    finally:
        for c in conns:
            await c.close()


async def test_refuses_a_schema_newer_than_it_knows(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO das.schema_migrations (version, name, checksum) VALUES (999, 'x', 'y')"
        )
        with pytest.raises(ConfigError, match="newer than this das-ingest knows"):
            await migrate(conn)
    finally:
        await conn.close()


async def test_refuses_an_applied_migration_that_changed(pg_dsn: str, tmp_path: Path) -> None:
    changed = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), changed)
    first = sorted(changed.glob("0001_*.sql"))[0]
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, directory=changed)
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(ConfigError, match="changed after it was applied"):
            await migrate(conn, directory=changed)
    finally:
        await conn.close()


# -- COPY of the seed examples --------------------------------------------------------------


async def test_every_seed_example_is_stored_with_every_value(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "shardId-000000000000", "w1")
        names = sorted(SEED_EXAMPLES)
        items = []
        for i, name in enumerate(names):
            version, doc = SEED_EXAMPLES[name]
            items.append(KeyedRecord(i, str(1000 + i), seal(doc.encode(), KEY, version), KEY))
        output = decode_batch(BatchInput("shardId-000000000000", items, ESDK, stream_name=STREAM))
        assert output.failures == []
        await store(pool, token, output, "TRIM_HORIZON", str(1000 + len(names) - 1))
        rows = await pool.fetch("SELECT * FROM das.activity_events ORDER BY sequence_number")
        assert len(rows) == len(names)
        for row, name in zip(rows, names, strict=True):
            cluster_id, instance_id, values = EXPECTED[name]
            assert row["cluster_id"] == cluster_id
            assert row["instance_id"] == instance_id
            assert row["record_version"] == SEED_EXAMPLES[name][0]
            assert row["shard_id"] == "shardId-000000000000"
            assert row["event_index"] == 0
            assert row["extra"] == "{}"
            assert row["anomalies"] == []
            for attr in ATTRS:
                column = "class" if attr == "class_" else attr
                got: Any = row[column]
                if column == "param_list" and got is not None:
                    got = orjson.loads(got)
                assert got == values[attr], (name, column)
        checkpoint = await pool.fetchval("SELECT checkpoint FROM das.leases")
        assert checkpoint == str(1000 + len(names) - 1)
    finally:
        await pool.close()


# -- MySQL MAIN/AUX correlation -------------------------------------------------------------


def mysql_event(statement_id: int, kind: str, session: str = "725118") -> dict[str, Any]:
    base = {
        "type": "record",
        "pid": 2830,
        "sessionId": session,
        "statementId": statement_id,
        "dbUserName": "master",
        "databaseName": "test",
        "serverType": "MySQL",
    }
    if kind == "MAIN":
        return base | {
            "class": "MAIN",
            "substatementId": 1,
            "command": "QUERY",
            "commandText": f"UPDATE t1, t2 SET a = 1 /* {statement_id} */",
            "logTime": "2020-05-22 18:07:12.250221+00",
            "rowCount": 3,
            "exitCode": "0",
            "errorMessage": "",
        }
    return base | {
        "class": "AUX",
        "substatementId": 2,
        "command": "WRITE",
        "commandText": kind,
        "objectName": kind,
        "objectType": "TABLE",
        "logTime": "2020-05-22 18:07:12.247182+00",
    }


# How the three events of one statement reach the warehouse: one record; one record each in
# one batch; one batch each; one batch each through separate sinks (two ingest runs).
SPLITS = ("one_record", "records", "batches", "runs")


@pytest.mark.parametrize("role", ["owner", "ingest"])
async def test_main_and_aux_correlate_in_every_arrival_order(pg_dsn: str, role: str) -> None:
    """As the owner, and as the ingest role (which merges through das.merge_statements and has
    no privilege on das.statements itself)."""
    pool = await migrated_pool(pg_dsn)
    writer_dsn = pg_dsn
    if role == "ingest":
        admin = await asyncpg.connect(pg_dsn)
        try:
            writer_dsn = await login_dsn(pg_dsn, admin, "das_ingest")
        finally:
            await admin.close()
    writer = await migrated_pool_as(writer_dsn)
    try:
        token, _ = await hold_lease(pool, "shardId-000000000001", "w1")
        checkpoint = "TRIM_HORIZON"
        seq = 1
        cases = list(itertools.product(itertools.permutations(["MAIN", "t1", "t2"]), SPLITS))
        for case_number, (order, split) in enumerate(cases):
            statement_id = 70_000 + case_number
            events = [mysql_event(statement_id, kind) for kind in order]
            if split == "one_record":
                groups = [[events]]
            elif split == "records":
                groups = [[[e] for e in events]]
            else:
                groups = [[[e]] for e in events]
            for group in groups:
                records = []
                for evs in group:
                    records.append((str(seq), inner(*evs)))
                    seq += 1
                output = batch(token.shard_id, records)
                target = writer
                if split == "runs":
                    target = await migrated_pool_as(writer_dsn)  # another run of the ingester
                try:
                    await store(target, token, output, checkpoint, records[-1][0])
                finally:
                    if target is not writer:
                        await target.close()
                checkpoint = records[-1][0]
        rows = await pool.fetch("SELECT * FROM das.statements ORDER BY statement_id")
        assert len(rows) == len(cases)
        for row, (case_number, _) in zip(rows, enumerate(cases), strict=True):
            statement_id = 70_000 + case_number
            assert row["statement_id"] == statement_id
            assert row["has_main"] is True
            assert row["command"] == "QUERY"
            assert row["command_text"] == f"UPDATE t1, t2 SET a = 1 /* {statement_id} */"
            assert row["row_count"] == 3
            assert row["db_user_name"] == "master"
            assert row["stream_name"] == STREAM  # set by the merge (migration 0026)
            assert row["log_time"] == datetime(2020, 5, 22, 18, 7, 12, 250221, tzinfo=UTC)
            aux = orjson.loads(row["aux"])
            assert sorted(a["object_name"] for a in aux) == ["t1", "t2"]
            assert {a["command"] for a in aux} == {"WRITE"}
        events = await pool.fetchval("SELECT count(*) FROM das.activity_events")
        assert events == 3 * len(cases)
    finally:
        await writer.close()
        await pool.close()


async def test_statement_key_includes_session_and_instance(pg_dsn: str) -> None:
    """statementId restarts with the instance and session ids repeat: no cross-talk."""
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w1")
        records = [
            ("1", inner(mysql_event(5, "MAIN", session="1"), instance="db-1")),
            ("2", inner(mysql_event(5, "MAIN", session="2"), instance="db-1")),
            ("3", inner(mysql_event(5, "t1", session="1"), instance="db-2")),
        ]
        await store(pool, token, batch("s", records), "TRIM_HORIZON", "3")
        rows = await pool.fetch(
            "SELECT instance_id, session_id, has_main, jsonb_array_length(aux) AS n "
            "FROM das.statements ORDER BY instance_id, session_id"
        )
        assert [tuple(r) for r in rows] == [
            ("db-1", "1", True, 0),
            ("db-1", "2", True, 0),
            ("db-2", "1", False, 1),
        ]
    finally:
        await pool.close()


async def test_statements_merge_reads_only_its_own_streams_events(pg_dsn: str) -> None:
    """Two clusters' streams in one warehouse share shard ids and may share sequence numbers:
    a batch of one stream merges that stream's statement events only, whatever the other
    stream stored in the same shard and range (the merge selects by stream, shard, range)."""
    pool = await migrated_pool(pg_dsn)
    other = "aws-rds-das-cluster-OTHER"
    try:
        token_other, _ = await hold_lease(pool, "s", "w", stream=other)
        other_records = [("1", inner(mysql_event(7, "MAIN"), cluster="cluster-OTHER"))]
        await store(pool, token_other, batch("s", other_records, stream=other), "TRIM_HORIZON", "1")
        assert await pool.fetchval("SELECT count(*) FROM das.statements") == 1
        await pool.execute("DELETE FROM das.statements")  # as if not merged yet

        token, _ = await hold_lease(pool, "s", "w")
        records = [("1", inner(mysql_event(5, "MAIN"))), ("2", inner(mysql_event(5, "t1")))]
        await store(pool, token, batch("s", records), "TRIM_HORIZON", "2")
        rows = await pool.fetch(
            "SELECT cluster_id, statement_id, has_main, jsonb_array_length(aux) AS n "
            "FROM das.statements"
        )
        assert [tuple(r) for r in rows] == [("cluster-TEST", 5, True, 1)]
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM das.activity_events "
                "WHERE shard_id = 's' AND sequence_number = 1"
            )
            == 2
        )  # both streams' events are there, each under its own stream
    finally:
        await pool.close()


def connection_event(command: str, log_time: str, session: str = "725118") -> dict[str, Any]:
    """A MySQL connection event as the seed's CONNECT example has it: MAIN, statementId 0."""
    return {
        "type": "record",
        "class": "MAIN",
        "command": command,
        "commandText": "",
        "pid": 2830,
        "sessionId": session,
        "statementId": 0,
        "substatementId": 1,
        "dbUserName": "master",
        "databaseName": "test",
        "serverType": "MySQL",
        "exitCode": "1045" if command == "FAILED_CONNECT" else "0",
        "logTime": log_time,
    }


async def test_connection_events_are_not_statements(pg_dsn: str) -> None:
    """CONNECT, DISCONNECT and FAILED_CONNECT share statementId 0: folded into one statement,
    a session's DISCONNECT vanished from das.statements. They are activity events only."""
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w1")
        records = [
            ("1", inner(connection_event("CONNECT", "2020-05-22 18:07:10.000001+00"))),
            ("2", inner(mysql_event(9, "MAIN"), mysql_event(9, "t1"))),
            (
                "3",
                inner(
                    connection_event("DISCONNECT", "2020-05-22 18:07:20.000001+00"),
                    connection_event("FAILED_CONNECT", "2020-05-22 18:07:21+00", session="9"),
                ),
            ),
        ]
        output = batch("s", records)
        await store(pool, token, output, "TRIM_HORIZON", "3")
        rows = await pool.fetch(
            "SELECT statement_id, command, jsonb_array_length(aux) AS n FROM das.statements"
        )
        assert [tuple(r) for r in rows] == [(9, "QUERY", 1)]
        events = await pool.fetch(
            "SELECT command FROM das.activity_events ORDER BY sequence_number, event_index"
        )
        assert [r["command"] for r in events] == [
            "CONNECT",
            "QUERY",
            "WRITE",
            "DISCONNECT",
            "FAILED_CONNECT",
        ]
        async with pool.acquire() as conn:
            assert await rebuild_statements(conn) == 1  # the rebuild agrees
        rebuilt = await pool.fetch(
            "SELECT statement_id, command, jsonb_array_length(aux) AS n FROM das.statements"
        )
        assert [tuple(r) for r in rebuilt] == [(9, "QUERY", 1)]
    finally:
        await pool.close()


async def test_the_earliest_main_of_a_key_wins_in_any_arrival_order(pg_dsn: str) -> None:
    """An instance restart can reuse pid, session and statementId: the key's earliest MAIN (by
    log_time, NULL last) fills the statement whichever arrives first; the rebuild agrees."""
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w1")

        def main(text: str, log_time: str | None) -> dict[str, Any]:
            event = mysql_event(5, "MAIN") | {"commandText": text}
            if log_time is None:
                del event["logTime"]
            else:
                event["logTime"] = log_time
            return event

        arrivals = [
            main("undated", None),
            main("later", "2020-05-22 18:07:13+00"),
            main("earliest", "2020-05-22 18:07:11+00"),
            main("middle", "2020-05-22 18:07:12+00"),
        ]
        checkpoint = "TRIM_HORIZON"
        for n, event in enumerate(arrivals, start=1):
            await store(pool, token, batch("s", [(str(n), inner(event))]), checkpoint, str(n))
            checkpoint = str(n)
        row = await pool.fetchrow("SELECT command_text, main_sequence_number FROM das.statements")
        assert row is not None
        assert tuple(row) == ("earliest", 3)
        before = await statements_table(pool)
        async with pool.acquire() as conn:
            await rebuild_statements(conn)
        assert await statements_table(pool) == before
    finally:
        await pool.close()


def statement_positions(
    records: list[InnerRecord],
) -> dict[tuple[str, str, int], list[tuple[int, int, str]]]:
    """(instance, session, statementId) -> [(record, event, class)] in stream order."""
    positions: dict[tuple[str, str, int], list[tuple[int, int, str]]] = {}
    for r, record in enumerate(records):
        for e, event in enumerate(record.events):
            if event.get("type") == "record" and event["statementId"] > 0:
                key = (record.instance_id, event["sessionId"], event["statementId"])
                positions.setdefault(key, []).append((r, e, event["class"]))
    return positions


STATEMENT_COLUMNS = """
    cluster_id, instance_id, pid, session_id, statement_id, has_main, log_time, start_time,
    end_time, db_user_name, database_name, remote_host, command, command_text, object_type,
    object_name, row_count, exit_code, error_message, transaction_id, main_shard_id,
    main_sequence_number, main_event_index, aux
"""


async def statements_table(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        f"SELECT {STATEMENT_COLUMNS} FROM das.statements "
        "ORDER BY cluster_id, instance_id, pid, session_id, statement_id"
    )
    return [tuple(r) for r in rows]


async def test_rebuild_statements_equals_the_incremental_merge(pg_dsn: str) -> None:
    """An emulated Aurora MySQL stream (AUX before MAIN in one record, in an earlier record or
    batch, after it in a later one), one shard per instance, stored in batches of 1 to 4
    records: `rebuild-statements` yields exactly the table the incremental merges built, and
    merging everything once more changes nothing."""
    opts = EmulateOptions(
        stream=STREAM,
        engine="mysql",
        instances=2,
        events_per_record=3,
        count=900,
        seed=11,
        heartbeat_every=0,
    )
    records = list(opts.inner_records())
    positions = statement_positions(records)
    arrivals = {"aux first, same record": 0, "aux first, earlier record": 0, "aux later": 0}
    for parts in positions.values():
        main = [(r, e) for r, e, c in parts if c == "MAIN"]
        for r, e, c in parts:
            if c != "AUX" or not main:
                continue
            if (r, e) < main[0]:
                arrivals[
                    "aux first, same record" if r == main[0][0] else "aux first, earlier record"
                ] += 1
            elif r > main[0][0]:
                arrivals["aux later"] += 1
    assert all(arrivals.values()), arrivals  # the stream has every arrival order

    pool = await migrated_pool(pg_dsn)
    try:
        by_shard: dict[str, list[tuple[str, bytes]]] = {}
        for n, record in enumerate(records):
            shard = f"shardId-{record.instance_id}"
            doc = seal(orjson.dumps(record.doc), KEY, record.version)
            by_shard.setdefault(shard, []).append((str(1000 + n), doc))
        sizes = itertools.cycle([1, 3, 2, 4])
        for shard, sealed in by_shard.items():
            token, _ = await hold_lease(pool, shard, "w")
            checkpoint = "TRIM_HORIZON"
            at = 0
            while at < len(sealed):
                chunk = sealed[at : at + next(sizes)]
                at += len(chunk)
                items = [KeyedRecord(i, seq, raw, KEY) for i, (seq, raw) in enumerate(chunk)]
                output = decode_batch(BatchInput(shard, items, ESDK, stream_name=STREAM))
                assert output.failures == []
                await store(pool, token, output, checkpoint, chunk[-1][0])
                checkpoint = chunk[-1][0]
        incremental = await statements_table(pool)
        assert len(incremental) == len(positions)
        aux_events = sum(c == "AUX" for parts in positions.values() for _, _, c in parts)
        assert sum(len(orjson.loads(row[-1])) for row in incremental) == aux_events
        mains = sum(any(c == "MAIN" for _, _, c in parts) for parts in positions.values())
        assert sum(row[5] for row in incremental) == mains

        async with pool.acquire() as conn:
            rebuilt_rows = await rebuild_statements(conn)
        assert rebuilt_rows == len(incremental)
        assert await statements_table(pool) == incremental
        # In batches as small as 3 events (statements cut across batches) it is the same, and
        # a stale row no event backs is gone.
        await pool.execute(
            "INSERT INTO das.statements (cluster_id, instance_id, pid, session_id, statement_id, "
            "has_main, aux) VALUES ('stale', 'x', 1, 1, 1, false, '[]')"
        )
        steps: list[tuple[str, int, int | None]] = []
        async with pool.acquire() as conn:
            rebuilt_rows = await rebuild_statements(
                conn, batch=3, progress=lambda *step: steps.append(step)
            )
        assert rebuilt_rows == len(incremental)
        assert await statements_table(pool) == incremental
        merged = [done for phase, done, _ in steps if phase == "merged"]
        statement_events = len(incremental) and sum(merged)
        assert len(merged) > len(by_shard)  # more than one batch per shard
        assert statement_events == await pool.fetchval(
            "SELECT count(*) FROM das.activity_events "
            "WHERE das.is_statement_event(class, command, statement_id)"
        )
        assert sum(done for phase, done, _ in steps if phase == "emptied") == len(incremental) + 1

        for shard in by_shard:  # merging a range again changes nothing
            await pool.execute("SELECT das.merge_statements($1, $2, 0, 1e40)", STREAM, shard)
        assert await statements_table(pool) == incremental
    finally:
        await pool.close()


# -- values PostgreSQL cannot store as is ---------------------------------------------------


async def test_nul_bytes_and_a_one_megabyte_command_text(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w1")
        huge = "select '" + "x" * (1024 * 1024) + "'"
        records = [
            (
                "1",
                inner({"type": "record", "commandText": "a\x00b\tc\nd\\e", "paramList": ["\x00"]}),
            ),
            (
                "2",
                inner({"type": "record", "commandText": huge, "logTime": "2020-01-01 00:00:00+00"}),
            ),
        ]
        output = batch("s", records)
        await store(pool, token, output, "TRIM_HORIZON", "2")
        rows = await pool.fetch(
            "SELECT command_text, param_list, anomalies FROM das.activity_events "
            "ORDER BY sequence_number"
        )
        assert rows[0]["command_text"] == "a\\x00b\tc\nd\\\\e"
        assert orjson.loads(rows[0]["param_list"]) == ["\\x00"]
        assert sorted(rows[0]["anomalies"]) == ["commandText:nul", "paramList:nul"]
        assert rows[1]["command_text"] == huge
        assert rows[1]["anomalies"] == []
    finally:
        await pool.close()


# -- roles ----------------------------------------------------------------------------------


async def login_dsn(pg_dsn: str, admin: asyncpg.Connection, group: str) -> str:
    """The DSN of a new login that is a member of ``group`` and nothing else."""
    user = f"u_{secrets.token_hex(4)}"
    await admin.execute(f"CREATE ROLE {user} LOGIN IN ROLE {group}")
    dsn = pg_dsn.replace("postgresql://postgres@", f"postgresql://{user}@")
    assert dsn != pg_dsn
    return dsn


async def login_as(pg_dsn: str, admin: asyncpg.Connection, group: str) -> asyncpg.Connection:
    return await asyncpg.connect(await login_dsn(pg_dsn, admin, group))


async def test_ingest_role_appends_but_cannot_change_or_remove(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    admin = await asyncpg.connect(pg_dsn)
    try:
        # A hardened database: PUBLIC may not create temp tables, and the ingest role needs
        # none (MySQL statements are merged by das.merge_statements, not staged).
        database = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC')
        await migrate(admin)
        token, _ = await hold_lease(pool, "s", "w1")
        ingest = await login_as(pg_dsn, admin, "das_ingest")
        user = await ingest.fetchval("SELECT current_user")
        await ingest.close()
        ingest_dsn = pg_dsn.replace("postgresql://postgres@", f"postgresql://{user}@")
        ingest_pool = await migrated_pool_as(ingest_dsn)
        try:
            output = batch(
                "s",
                [
                    (
                        "1",
                        inner(
                            {
                                "type": "record",
                                "command": "SELECT",
                                "logTime": datetime.now(UTC).isoformat(),
                            }
                        ),
                    )
                ],
            )
            await store(ingest_pool, token, output, "TRIM_HORIZON", "1")  # COPY works
            async with ingest_pool.acquire() as conn:
                for statement in (
                    "UPDATE das.activity_events SET command = 'x'",
                    "DELETE FROM das.activity_events",
                    "TRUNCATE das.activity_events",
                    "DELETE FROM das.dead_letters",
                    "UPDATE das.dead_letters SET error = ''",
                    "DROP TABLE das.activity_events_default",
                    "CREATE TABLE das.sneaky (a int)",
                    # das.statements is derived from the events by das.merge_statements alone:
                    # das.ddl_changes reads it, and it is not covered by the integrity chain.
                    "UPDATE das.statements SET command_text = 'x'",
                    "DELETE FROM das.statements",
                    "TRUNCATE das.statements",
                    "INSERT INTO das.statements (statement_id, command_text) VALUES (1, 'x')",
                ):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(statement)
        finally:
            await ingest_pool.close()
        assert await admin.fetchval("SELECT count(*) FROM das.activity_events") == 1

        analyst = await login_as(pg_dsn, admin, "das_analyst")
        try:
            assert await analyst.fetchval("SELECT count(*) FROM das.activity_events") == 1
            assert await analyst.fetchval("SELECT count(*) FROM das.sessions") >= 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await analyst.execute("DELETE FROM das.activity_events")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await analyst.execute(
                    "INSERT INTO das.leases (stream_name, shard_id) VALUES ('a', 'b')"
                )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the ingest role's only
                await analyst.execute("SELECT das.merge_statements('x', 's', 0, 1)")
        finally:
            await analyst.close()
    finally:
        await admin.close()
        await pool.close()


async def migrated_pool_as(dsn: str) -> asyncpg.Pool:
    from ingest.warehouse.sink import init_connection

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    assert pool is not None
    return pool


# -- fencing ---------------------------------------------------------------------------------


async def test_a_stale_lease_holder_cannot_commit(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token_a, lease_a = await hold_lease(pool, "s", "worker-a")
        leases = LeaseStore(pool, STREAM, lease_seconds=30)
        stolen = await leases.take(lease_a, "worker-b")  # B steals: the counter moves
        assert stolen is not None
        assert stolen.lease_counter == lease_a.lease_counter + 1
        output = batch("s", [("1", inner({"type": "record", "command": "SELECT"}))])
        with pytest.raises(LeaseLostError):
            await store(pool, token_a, output, "TRIM_HORIZON", "1")
        assert await pool.fetchval("SELECT count(*) FROM das.activity_events") == 0
        assert await pool.fetchval("SELECT checkpoint FROM das.leases") == "TRIM_HORIZON"
        # A renewal by the old holder fails too.
        assert await leases.renew("worker-a", {"s": token_a.lease_counter}) == set()
    finally:
        await pool.close()


async def test_checkpoint_is_a_compare_and_set(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        first = batch("s", [("1", inner({"type": "record", "command": "A"}))])
        await store(pool, token, first, "TRIM_HORIZON", "1")
        again = batch("s", [("2", inner({"type": "record", "command": "B"}))])
        with pytest.raises(LeaseLostError):  # we did not start from the stored checkpoint
            await store(pool, token, again, "TRIM_HORIZON", "2")
        await store(pool, token, again, "1", "2")
        rows = await pool.fetch("SELECT command FROM das.activity_events ORDER BY command")
        assert [r["command"] for r in rows] == ["A", "B"]
    finally:
        await pool.close()


async def test_dead_letters_and_heartbeats_commit_with_the_batch(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        output = batch(
            "s",
            [
                ("1", inner({"type": "heartbeat", "logTime": "2020-01-01 00:00:01+00"})),
                ("2", inner({"type": "heartbeat", "logTime": "2020-01-01 00:00:03+00"})),
                (
                    "3",
                    inner(
                        {"type": "heartbeat", "logTime": "2020-01-01 00:00:02+00"}, instance="db-2"
                    ),
                ),
            ],
        )
        letter = DeadLetter("4", "pk", None, "json", "json: record is not JSON", b"garbage")
        await Sink(pool).commit(
            token,
            previous_checkpoint="TRIM_HORIZON",
            new_checkpoint="4",
            units=[CopyUnit(output.events, output.statements, chain=output.chain)],
            dead_letters=[letter],
            heartbeats=output.heartbeats,
        )
        assert await pool.fetchval("SELECT count(*) FROM das.activity_events") == 0
        beats = await pool.fetch(
            "SELECT instance_id, log_time, sequence_number::text AS seq FROM das.heartbeats "
            "ORDER BY instance_id"
        )
        assert [(b["instance_id"], b["seq"]) for b in beats] == [("db-1", "2"), ("db-2", "3")]
        assert beats[0]["log_time"] == datetime(2020, 1, 1, 0, 0, 3, tzinfo=UTC)
        dead = await pool.fetchrow("SELECT * FROM das.dead_letters")
        assert dead is not None
        assert dead["stage"] == "json"
        assert bytes(dead["raw"]) == b"garbage"
        assert dead["sequence_number"] == 4
        assert dead["stream_name"] == STREAM
    finally:
        await pool.close()


async def test_dead_letters_with_partition_keys_postgresql_cannot_store(pg_dsn: str) -> None:
    """A producer picks any Unicode partition key (kinesalite hands NUL and lone surrogates
    back): the dead letter is stored with the key escaped and flagged, not refused with the
    whole batch."""
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        letters = [
            DeadLetter("1", "db\x00-1\u0000", None, "json", "json: record is not JSON", b"a"),
            DeadLetter("2", "db\ud800-2", None, "json", "json: record is not JSON", b"b"),
            DeadLetter("3", "db\\x00-3", None, "json", "json: record is not JSON", b"c"),
            DeadLetter("4", None, None, "json", "json: record is not JSON", b"d"),
        ]
        await Sink(pool).commit(
            token,
            previous_checkpoint="TRIM_HORIZON",
            new_checkpoint="4",
            units=[],
            dead_letters=letters,
        )
        rows = await pool.fetch(
            "SELECT partition_key, error FROM das.dead_letters ORDER BY sequence_number"
        )
        assert [tuple(r) for r in rows] == [
            ("db\\x00-1\\x00", "json: record is not JSON (partition key stored escaped: nul)"),
            ("db\\ud800-2", "json: record is not JSON (partition key stored escaped: utf8)"),
            ("db\\x00-3", "json: record is not JSON"),  # a backslash alone needs nothing
            (None, "json: record is not JSON"),
        ]
        assert unescape_text(rows[0]["partition_key"]) == "db\x00-1\x00"
        assert unescape_text(rows[1]["partition_key"]) == "db\ud800-2"
        assert await pool.fetchval("SELECT checkpoint FROM das.leases") == "4"
    finally:
        await pool.close()


# -- partitions and retention ----------------------------------------------------------------


async def test_partitions_are_created_on_demand_and_rows_move_out_of_default(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        far = today + timedelta(days=10)  # outside the on-demand window: default partition
        output = batch(
            "s",
            [
                ("1", inner({"type": "record", "command": "A", "logTime": today.isoformat()})),
                ("2", inner({"type": "record", "command": "B", "logTime": far.isoformat()})),
                ("3", inner({"type": "record", "command": "C"})),  # no log_time at all
            ],
        )
        await store(pool, token, output, "TRIM_HORIZON", "3")
        where = await pool.fetch(
            "SELECT command, tableoid::regclass::text AS part FROM das.activity_events "
            "ORDER BY command"
        )
        assert [(r["command"], r["part"]) for r in where] == [
            ("A", f"das.activity_events_p{today:%Y%m%d}"),
            ("B", "das.activity_events_default"),
            ("C", "das.activity_events_default"),
        ]
        created = await pool.fetchval("SELECT das.ensure_partition($1)", far.date())
        assert created is True
        part = await pool.fetchval(
            "SELECT tableoid::regclass::text FROM das.activity_events WHERE command = 'B'"
        )
        assert part == f"das.activity_events_p{far:%Y%m%d}"
        assert await pool.fetchval("SELECT das.ensure_partition($1)", far.date()) is False
    finally:
        await pool.close()


@pytest.mark.parametrize("chain", [True, False], ids=["chain", "no-chain"])
async def test_one_record_over_two_past_days_lands_in_both_days_partitions(
    pg_dsn: str, chain: bool
) -> None:
    """Every event's day gets its partition, with or without the integrity chain: the days of
    a record are not only those of its last event (which here has no time at all)."""
    now = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    five, three = now - timedelta(days=5), now - timedelta(days=3)  # inside the window
    doc = inner(
        {"type": "record", "command": "FIVE", "logTime": five.isoformat()},
        {"type": "record", "command": "THREE", "logTime": three.isoformat()},
        {"type": "record", "command": "UNDATED"},
    )
    config = DecoderConfig(decryptor="esdk", chain=chain)
    output = decode_batch(
        BatchInput(
            "s", [KeyedRecord(0, "1", seal(doc, KEY, "1.2"), KEY)], config, stream_name=STREAM
        )
    )
    assert output.failures == []
    assert output.days == {five.date(), three.date()}
    assert output.undated_events == 1
    assert bool(output.chain) is chain

    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        sink = Sink(pool, chain=chain)
        await sink.ensure_partitions(output.days)  # what the consumer does before committing
        await sink.commit(
            token,
            previous_checkpoint="TRIM_HORIZON",
            new_checkpoint="1",
            units=[CopyUnit(output.events, output.statements, chain=output.chain)],
            sequence_range=("1", "1"),
        )
        where = await pool.fetch(
            "SELECT command, tableoid::regclass::text AS part FROM das.activity_events "
            "ORDER BY command"
        )
        assert [(r["command"], r["part"]) for r in where] == [
            ("FIVE", f"das.activity_events_p{five:%Y%m%d}"),
            ("THREE", f"das.activity_events_p{three:%Y%m%d}"),
            ("UNDATED", "das.activity_events_default"),
        ]
    finally:
        await pool.close()


def test_parse_keep() -> None:
    assert parse_keep("90d") == timedelta(days=90)
    assert parse_keep("2w") == timedelta(weeks=2)
    assert parse_keep(" 36h ") == timedelta(hours=36)
    for bad in ("90", "d", "-1d", "0d", "1y"):
        with pytest.raises(ValueError):
            parse_keep(bad)


async def test_retention_drops_whole_old_partitions_and_logs_them(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        now = datetime.now(UTC)
        old_day: date = (now - timedelta(days=100)).date()
        await pool.execute("SELECT das.ensure_partition($1)", old_day)
        old = datetime(old_day.year, old_day.month, old_day.day, 6, tzinfo=UTC)
        recent = now - timedelta(hours=1)
        output = batch(
            "s",
            [
                ("1", inner({"type": "record", "command": "OLD", "logTime": old.isoformat()})),
                ("2", inner({"type": "record", "command": "NEW", "logTime": recent.isoformat()})),
                (
                    "3",
                    inner(
                        {"type": "record", "command": "OLDER", "logTime": "2001-01-01 00:00:00+00"}
                    ),
                ),
            ],
        )
        await store(pool, token, output, "TRIM_HORIZON", "3")
        async with pool.acquire() as conn:
            dry = await apply_retention(conn, timedelta(days=90), dry_run=True)
            assert {a.partition for a in dry} == {
                f"activity_events_p{old_day:%Y%m%d}",
                "activity_events_default",
            }
            assert await conn.fetchval("SELECT count(*) FROM das.activity_events") == 3
            actions = await apply_retention(conn, timedelta(days=90))
        assert sorted((a.partition, a.rows) for a in actions) == sorted(
            [(f"activity_events_p{old_day:%Y%m%d}", 1), ("activity_events_default", 1)]
        )
        rows = await pool.fetch("SELECT command FROM das.activity_events")
        assert [r["command"] for r in rows] == ["NEW"]
        logged = await pool.fetch(
            "SELECT partition_name, rows_removed FROM das.retention_log ORDER BY id"
        )
        assert sorted((r["partition_name"], r["rows_removed"]) for r in logged) == sorted(
            [(f"activity_events_p{old_day:%Y%m%d}", 1), ("activity_events_default", 1)]
        )
        gone = await pool.fetchval(
            "SELECT to_regclass($1)", f"das.activity_events_p{old_day:%Y%m%d}"
        )
        assert gone is None
    finally:
        await pool.close()


async def test_concurrent_partition_creation_is_safe(pg_dsn: str) -> None:
    """Every worker creates partitions ahead: racing creations of one day must all succeed."""
    pool = await migrated_pool(pg_dsn)
    try:
        conns = [await asyncpg.connect(pg_dsn) for _ in range(6)]
        try:
            for offset in range(3):
                day = date(2031, 1, 1) + timedelta(days=offset)
                created = await asyncio.gather(
                    *(c.fetchval("SELECT das.ensure_partition($1)", day) for c in conns)
                )
                assert created.count(True) == 1
                assert await pool.fetchval(
                    "SELECT to_regclass($1)", f"das.activity_events_p{day:%Y%m%d}"
                )
        finally:
            for c in conns:
                await c.close()
    finally:
        await pool.close()


async def test_a_warehouse_missing_a_migration_below_the_newest_is_not_current(
    pg_dsn: str,
) -> None:
    """Migrations are numbered in ranges with gaps; one merged later with a lower number than
    the newest applied one is still pending, and workers refuse to run until it is applied."""
    from ingest.warehouse.migrate import require_current_schema

    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        assert await require_current_schema(conn) == load_migrations()[-1].version
        await conn.execute("DELETE FROM das.schema_migrations WHERE version = 3")
        with pytest.raises(ConfigError, match="migration 0003 is not applied"):
            await require_current_schema(conn)
    finally:
        await conn.close()
