"""RDS for Oracle (1.3) and RDS for SQL Server (1.4): every field of both tables in its typed
column, no anomaly for any documented shape, the engine columns in the integrity encoding, and
the auditor views answering for each engine."""

from __future__ import annotations

import hashlib
import itertools
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.decode import copyfmt
from ingest.decode.engines import engine_of, event_failed
from ingest.decode.fingerprint import of_statement
from ingest.decode.model import ENGINE_COLUMNS as MODEL_ENGINE_COLUMNS
from ingest.decode.normalize import decode_payload
from ingest.integrity.canonical import (
    ENGINE_COLUMNS,
    EVENT_COLUMNS,
    EVENT_COLUMNS_V2,
    event_digest,
    event_encoding,
    stored_event_values,
)
from ingest.integrity.verify import verify_warehouse
from ingest.warehouse.sink import CopyUnit, Sink
from tests.rds_examples import (
    ORACLE_FIELDS,
    ORACLE_INSTANCE,
    ORACLE_NATIVE,
    SQLSERVER_FIELDS,
    SQLSERVER_INSTANCE,
    SQLSERVER_NATIVE,
    inner_document,
    oracle_event,
    oracle_events,
    sqlserver_event,
    sqlserver_events,
)
from tests.warehouse_helpers import batch, hold_lease, migrated_pool, store

# -- every field of each table -----------------------------------------------------------------


def test_every_oracle_field_lands_in_its_column() -> None:
    sent = oracle_event(engineNativeAuditFields=ORACLE_NATIVE)
    assert set(sent) - {"type"} == set(ORACLE_FIELDS)
    record = decode_payload(inner_document(ORACLE_INSTANCE, sent), "1.3")
    (event,) = record.events
    assert event.anomalies == ()
    assert event.extra == {}
    stored = event.as_dict()
    assert record.cluster_id == ""
    assert record.instance_id == ORACLE_INSTANCE
    expected = {
        "class": "Standard",
        "client_application": "JDBC Thin Client",
        "command": "CREATE TABLE",
        "command_text": sent["commandText"],
        "database_name": "ORCL",
        "dbid": "1559204751",  # a number, kept as its text
        "db_protocol": "oracle",
        "db_user_name": "TEST",
        "end_time": None,
        "engine_native_audit_fields": ORACLE_NATIVE,
        "error_message": None,
        "exit_code": "0",
        # EVENT_TIMESTAMP_UTC without a zone: UTC
        "log_time": datetime(2021, 1, 15, 0, 22, 49, 535239, tzinfo=UTC),
        "net_protocol": "tcp",
        "object_name": "PERSONS",
        "object_type": "HR",
        "param_list": [],
        "pid": 17687,
        "remote_host": "10.0.0.7",
        "remote_port": "25440",
        "row_count": None,
        "server_host": "10.0.1.5",
        "server_type": "ORACLE",
        "server_version": "19.0.0.0.ru-2020-01.rur-2020-01.r1.EE.3",
        "service_name": "oracle-ee",
        "session_id": "1894327130",
        "start_time": None,
        "statement_id": 142197,
        "substatement_id": None,
        "transaction_id": "02000800D5030000",  # hex, as sent
    }
    assert {column: stored[column] for column in ORACLE_FIELDS.values()} == expected
    assert stored["statement_id_text"] is None
    assert stored["times_as_sent"] is None


def test_every_sqlserver_field_lands_in_its_column() -> None:
    sent = sqlserver_event(engineNativeAuditFields=SQLSERVER_NATIVE)
    assert set(sent) - {"type"} == set(SQLSERVER_FIELDS)
    record = decode_payload(inner_document(SQLSERVER_INSTANCE, sent), "1.4")
    (event,) = record.events
    assert event.anomalies == ()
    assert event.extra == {}
    stored = event.as_dict()
    expected = {
        "class": "SCHEMA",
        "client_application": "Microsoft SQL Server Management Studio - Query",
        "command": "ALTER",
        "command_text": sent["commandText"],
        "database_name": "testDB",
        "db_protocol": "SQLSERVER",
        "db_user_name": "test",
        "end_time": None,
        "engine_native_audit_fields": SQLSERVER_NATIVE,
        "error_message": None,
        "exit_code": "1",  # succeeded
        # seven fraction digits: microseconds in the column, the text in times_as_sent
        "log_time": datetime(2022, 10, 6, 21, 44, 38, 412067, tzinfo=UTC),
        "net_protocol": None,
        "object_name": "dbo",
        "object_type": "SCHEMA",
        "param_list": None,
        "pid": None,
        "remote_host": "local machine",
        "remote_port": None,
        "row_count": 0,
        "server_host": "172.31.30.159",
        "server_type": "SQLSERVER",
        "server_version": "15.00.4073.23.v1.R1",
        "service_name": "sqlserver-ee",
        "session_id": "62",
        "start_time": None,
        "statement_id_text": "0x03baed90412f564fad640ebe51f89b99",
        "substatement_id": 1,
        "transaction_id": "4532935",
    }
    assert {column: stored[column] for column in SQLSERVER_FIELDS.values()} == expected
    assert stored["statement_id"] is None
    assert stored["times_as_sent"] == {"logTime": "2022-10-06 21:44:38.4120677+00"}
    assert stored["dbid"] is None


@pytest.mark.parametrize(
    ("version", "overrides", "column", "value"),
    [
        # Oracle: dbid as AWS's example sends it (a string with a leading zero), exact.
        ("1.3", {"dbid": "0123456789"}, "dbid", "0123456789"),
        ("1.3", {"sessionId": "987654321"}, "session_id", "987654321"),
        ("1.3", {"transactionId": "0000000000000000"}, "transaction_id", "0000000000000000"),
        ("1.3", {"exitCode": 1017}, "exit_code", "1017"),
        ("1.3", {"remotePort": None, "netProtocol": "beq"}, "net_protocol", "beq"),
        ("1.3", {"class": "FineGrainedAudit"}, "class", "FineGrainedAudit"),
        ("1.3", {"class": "Database Vault"}, "class", "Database Vault"),
        # SQL Server: transactionId as a number or a numeric string, exitCode 0 (failed).
        ("1.4", {"transactionId": 4532935}, "transaction_id", "4532935"),
        ("1.4", {"transactionId": "0"}, "transaction_id", "0"),
        ("1.4", {"exitCode": 0}, "exit_code", "0"),
        ("1.4", {"remotePort": 1433}, "remote_port", "1433"),
        ("1.4", {"sessionId": 0}, "session_id", "0"),
        # six digits or fewer: nothing to keep
        ("1.4", {"logTime": "2022-10-06 21:44:38.412067+00"}, "times_as_sent", None),
        ("1.4", {"engineNativeAuditFields": {}}, "engine_native_audit_fields", {}),
    ],
)
def test_documented_shapes_are_stored_as_sent_without_anomaly(
    version: str, overrides: dict[str, Any], column: str, value: Any
) -> None:
    build = oracle_event if version == "1.3" else sqlserver_event
    (event,) = decode_payload(inner_document("db-X", build(**overrides)), version).events
    assert event.anomalies == ()
    assert event.extra == {}
    assert event.as_dict()[column] == value


def test_aurora_events_store_an_empty_engine_native_object() -> None:
    """The marker the integrity encoding relies on: never NULL for a decoded event."""
    doc = inner_document("db-1", {"type": "record", "command": "SELECT", "statementId": 3})
    (event,) = decode_payload(doc, "1.1").events
    assert event.engine_native_audit_fields == {}
    assert event.statement_id == 3


# -- hostile variants of the new shapes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "anomaly", "kept"),
    [
        ({"engineNativeAuditFields": "not an object"}, "engineNativeAuditFields:type", True),
        ({"engineNativeAuditFields": [1, 2]}, "engineNativeAuditFields:type", True),
        ({"engineNativeAuditFields": {"K\x00": "v\x00"}}, "engineNativeAuditFields:nul", False),
        ({"statementId": "0x\x00bad"}, "statementId:nul", False),
        ({"statementId": True}, "statementId:type", True),
        ({"statementId": 1.5}, "statementId:type", True),
        ({"dbid": {"nested": 1}}, "dbid:type", True),
        ({"logTime": "2022-10-06 21:44:38.41206771234567890+00"}, None, False),
        ({"logTime": "not a time.1234567"}, "logTime:time", True),
    ],
)
def test_hostile_variants_of_the_new_shapes(
    overrides: dict[str, Any], anomaly: str | None, kept: bool
) -> None:
    """Odd values never cost the event: stored escaped, or kept whole in extra, and flagged."""
    (event,) = decode_payload(inner_document("db-X", sqlserver_event(**overrides)), "1.4").events
    if anomaly is None:
        assert event.anomalies == ()
        assert event.times_as_sent == {"logTime": overrides["logTime"]}
        return
    assert anomaly in event.anomalies
    (wire,) = overrides
    assert (wire in event.extra) == kept
    if kept:
        assert event.extra[wire] == overrides[wire]
    assert isinstance(event.engine_native_audit_fields, dict)


# -- the failure rule, per engine ---------------------------------------------------------------

FAILURE_CASES = [
    ("1.4", None, "0", True),  # SQL Server: succeeded = 0
    ("1.4", None, "1", False),
    ("1.3", None, "0", False),  # Oracle RETURN_CODE
    ("1.3", None, "1017", True),
    ("1.3", None, "942", True),
    ("1.3", None, None, False),
    ("1.1", None, "0", False),  # Aurora PostgreSQL
    ("1.1", "division by zero", "22012", True),
    ("1.1", None, "00000", False),
    ("1.2", None, "1045", True),  # Aurora MySQL
    ("1.2", None, "", False),
]


@pytest.mark.parametrize(("version", "message", "code", "failed"), FAILURE_CASES)
def test_failed_means_the_same_for_every_engine(
    version: str, message: str | None, code: str | None, failed: bool
) -> None:
    assert event_failed(version, message, code) is failed


def test_engine_of_each_record_version() -> None:
    assert [engine_of(v) for v in ("1.0", "1.1", "1.2", "1.3", "1.4", "9.9")] == [
        "postgresql", "postgresql", "mysql", "oracle", "sqlserver", None,
    ]  # fmt: skip
    assert engine_of(None, "oracle") == "oracle"


# -- the engine columns in the integrity encoding ------------------------------------------------


def documented_example() -> list[Any]:
    """The example event of docs/integrity.md, as its 38 values (as test_canonical builds it)."""
    values: list[Any] = [None] * len(EVENT_COLUMNS_V2)
    named = {
        "cluster_id": "cluster-ABC",
        "record_version": "1.2",
        "stream_name": "aws-rds-das-cluster-ABC",
        "shard_id": "shardId-000000000000",
        "sequence_number": Decimal("49590338271490256608559692538361571095921575989136588898"),
        "event_index": 0,
        "class": "MAIN",
        "command_text": "SELECT 'é'\t\n",
        "param_list": [1.5, "x"],
        "pid": 42,
        "extra": {"b": 1, "a": None, "q": 'say "\\hi"'},
        "anomalies": ["commandText:nul", 'a"b'],
        "ingested_at": datetime(2026, 11, 25, 12, 0, 0, 5, tzinfo=UTC),
    }
    for column, value in named.items():
        values[EVENT_COLUMNS_V2.index(column)] = value
    return values


def test_the_engine_columns_follow_ingested_at_everywhere() -> None:
    # (the fingerprint columns of migration 0015 come after them)
    width = len(EVENT_COLUMNS_V2) + len(ENGINE_COLUMNS)
    assert EVENT_COLUMNS[:width] == EVENT_COLUMNS_V2 + ENGINE_COLUMNS
    assert EVENT_COLUMNS[width:] == ("fingerprint", "fingerprint_hash")
    assert ENGINE_COLUMNS == MODEL_ENGINE_COLUMNS
    assert copyfmt.LINE_COLUMNS == EVENT_COLUMNS


def test_the_documented_engine_columns_encoding() -> None:
    """docs/integrity.md, "Engine columns": both examples, byte for byte."""
    v2 = event_encoding(documented_example())
    aurora = [*documented_example(), None, {}, None, None]
    assert event_encoding(aurora) == v2 + b"\t\\N\t{}\t\\N\t\\N"
    sqlserver = [
        *documented_example(),
        "0123456789",
        {"SCN": 5133083, "OS_USERNAME": "rdsdb"},
        "0x03baed90412f564fad640ebe51f89b99",
        {"logTime": "2022-10-06 21:44:38.4120677+00"},
    ]
    assert event_encoding(sqlserver) == v2 + (
        b'\t0123456789\t{"OS_USERNAME":"rdsdb","SCN":5133083}'
        b'\t0x03baed90412f564fad640ebe51f89b99\t{"logTime":"2022-10-06 21:44:38.4120677+00"}'
    )
    assert event_digest(sqlserver) == hashlib.sha256(event_encoding(sqlserver)).digest()


def test_an_event_stored_before_the_engine_columns_keeps_its_encoding() -> None:
    """All four NULL: the 38-field line (version 2) or the JSON array (version 1), exactly as
    when its link was written; any of the four set, under either version: the full line."""
    old = documented_example()
    widened = [*old, None, None, None, None]
    for version in (1, 2):
        assert event_encoding(widened, version) == event_encoding(old, version)
    digests = {event_digest(widened, 1), event_digest(widened, 2)}
    for position, value in zip(range(4), ("1", {}, "0x1", {"logTime": "x"}), strict=True):
        tampered = list(widened)
        tampered[len(EVENT_COLUMNS_V2) + position] = value
        for version in (1, 2):
            assert event_digest(tampered, version) not in digests
            # the line up to the engine columns (the NULL fingerprint group is not encoded)
            width = len(EVENT_COLUMNS_V2) + len(ENGINE_COLUMNS)
            assert event_encoding(tampered, version).count(b"\t") == width - 1


def test_the_copy_line_of_an_rds_event_is_its_encoding() -> None:
    for version, doc in (
        ("1.3", inner_document(ORACLE_INSTANCE, *oracle_events())),
        ("1.4", inner_document(SQLSERVER_INSTANCE, *sqlserver_events())),
    ):
        record = decode_payload(doc, version)
        stamp = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
        data, count = copyfmt.encode_events([(record, "shardId-1", "5")], stamp, "s")
        lines = data.split(b"\n")[:-1]
        assert count == len(lines) == len(record.events)
        for line, event in zip(lines, record.events, strict=True):
            found = of_statement(event.command_text)
            values = stored_event_values(event, record, "s", "shardId-1", "5", stamp, found)
            if found is None:  # a NULL fingerprint group is not part of the encoding
                line = line.removesuffix(copyfmt.NULL_FINGERPRINT)
            assert line == event_encoding(values)


# -- the warehouse and its views, per engine ----------------------------------------------------


async def _stored_rds_activity(pg_dsn: str) -> asyncpg.Pool:
    pool = await migrated_pool(pg_dsn)
    token, _ = await hold_lease(pool, "s", "w")
    oracle = [
        (str(n + 1), inner_document(ORACLE_INSTANCE, event))
        for n, event in enumerate(oracle_events())
    ]
    sqlserver = [
        (str(n + 100), inner_document(SQLSERVER_INSTANCE, event))
        for n, event in enumerate(sqlserver_events())
    ]
    sink = Sink(pool)
    previous = "TRIM_HORIZON"
    for records, version in ((oracle, "1.3"), (sqlserver, "1.4")):
        output = batch("s", records, version=version)
        assert output.failures == []
        await sink.ensure_partitions(output.days)
        await sink.commit(  # with its chain link, as a worker commits
            token,
            previous_checkpoint=previous,
            new_checkpoint=records[-1][0],
            units=[CopyUnit(output.events, output.statements, chain=output.chain)],
            sequence_range=(records[0][0], records[-1][0]),
        )
        previous = records[-1][0]
    return pool


async def test_rds_events_are_stored_typed_and_verify(pg_dsn: str) -> None:
    pool = await _stored_rds_activity(pg_dsn)
    try:
        rows = await pool.fetch(
            "SELECT record_version, anomalies, extra, engine_native_audit_fields, times_as_sent,"
            " statement_id, statement_id_text FROM das.activity_events"
        )
        assert len(rows) == len(oracle_events()) + len(sqlserver_events())
        assert all(r["anomalies"] == [] and r["extra"] == "{}" for r in rows)
        assert all(r["engine_native_audit_fields"] == "{}" for r in rows)
        assert all(r["statement_id_text"] is None for r in rows if r["record_version"] == "1.3")
        assert all(r["statement_id"] is None for r in rows if r["record_version"] == "1.4")
        seven = [r["times_as_sent"] for r in rows if r["times_as_sent"] is not None]
        assert {orjson.loads(t)["logTime"] for t in seven} >= {"2024-03-01 10:00:05.7113072+00"}
        # Every time of these formats parsed (none is left without a day, i.e. without its
        # partition: the default one holds only what is outside the partition window).
        assert (
            await pool.fetchval("SELECT count(*) FROM das.activity_events WHERE log_time IS NULL")
            == 0
        )
        # The SQL rule is the Python rule.
        for version, message, code, failed in FAILURE_CASES:
            got = await pool.fetchval("SELECT das.event_failed($1, $2, $3)", version, message, code)
            assert got is failed, (version, message, code)
        for version in ("1.0", "1.1", "1.2", "1.3", "1.4", "9.9"):
            assert await pool.fetchval("SELECT das.engine($1, NULL)", version) == engine_of(version)
        async with pool.acquire() as conn:
            report = await verify_warehouse(conn, kms=None)
        assert report.clean, report.findings
        assert report.events == len(rows)
        # A value put into an engine column is caught by the chain.
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE das.activity_events SET dbid = '1' WHERE record_version = '1.4' "
                "AND command = 'LOGOUT'"
            )
            tampered = await verify_warehouse(conn, kms=None)
            assert [f.kind for f in tampered.findings] == ["altered"]
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await pool.close()


class _Rollback(Exception):
    pass


async def test_the_auditor_views_answer_for_oracle_and_sqlserver(pg_dsn: str) -> None:
    pool = await _stored_rds_activity(pg_dsn)
    try:
        sessions = {
            (r["engine"], r["session_id"]): r
            for r in await pool.fetch("SELECT * FROM das.sessions")
        }
        oracle = sessions[("oracle", "3001")]
        assert oracle["db_user_name"] == "APP"
        assert oracle["duration"].total_seconds() == 30 * 60
        assert oracle["failed_statements"] == 1  # ORA-00942
        assert sessions[("oracle", "3002")]["connected_at"] is None  # ORA-01017: no session
        assert ("sqlserver", "0") not in sessions  # failed logins happen in no session
        mssql = sessions[("sqlserver", "55")]
        # login at 10:00:00.1234567 (microseconds kept), logout at 10:30
        assert mssql["duration"].total_seconds() == 30 * 60 - 0.123456
        assert mssql["failed_statements"] == 1  # the denied SELECT
        logins = await pool.fetch(
            "SELECT engine, db_user_name, exit_code FROM das.failed_logins ORDER BY engine"
        )
        assert [tuple(r) for r in logins] == [
            ("oracle", "MALLORY", "1017"),
            ("sqlserver", "mallory", "0"),
        ]
        failed = await pool.fetch(
            "SELECT engine, command_text FROM das.failed_statements ORDER BY engine"
        )
        assert [tuple(r) for r in failed] == [
            ("oracle", "SELECT * FROM NOPE"),
            ("sqlserver", "SELECT * FROM secret"),
        ]
        changes = await pool.fetch(
            "SELECT engine, command FROM das.ddl_changes ORDER BY engine, log_time"
        )
        assert [tuple(r) for r in changes] == [
            ("oracle", "GRANT"),
            ("oracle", "CREATE AUDIT POLICY"),
            ("oracle", "ALTER USER"),
            ("sqlserver", "ADD MEMBER"),
            ("sqlserver", "GRANT"),
        ]
        privileged = await pool.fetch(
            "SELECT engine, db_user_name, command FROM das.privileged_activity "
            "ORDER BY engine, log_time"
        )
        assert [tuple(r) for r in privileged] == [
            ("oracle", "SYS", "ALTER USER"),
            ("sqlserver", "sa", "ADD MEMBER"),
            ("sqlserver", "sa", "GRANT"),
        ]
        (split,) = await pool.fetch("SELECT * FROM das.sqlserver_statements WHERE parts > 1")
        parts = [e for e in sqlserver_events() if e["statementId"].endswith("0001")]
        assert split["command_text"] == "".join(e["commandText"] for e in parts)
        assert split["parts"] == 3
        assert split["statement_id"] == "0xaaaa0000000000000000000000000001"
        schemas = await pool.fetch(
            "SELECT object_schema, object_name FROM das.events WHERE engine = 'oracle' "
            "AND object_name = 'EMPLOYEES'"
        )
        assert [tuple(r) for r in schemas] == [("HR", "EMPLOYEES")]
        failed_everywhere = await pool.fetch(
            "SELECT engine, count(*) FROM das.events WHERE failed GROUP BY engine ORDER BY 1"
        )
        assert [tuple(r) for r in failed_everywhere] == [("oracle", 2), ("sqlserver", 2)]
    finally:
        await pool.close()


async def test_a_split_record_delivered_twice_is_reassembled_once(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        parts = [
            sqlserver_event(commandText=text, statementId="0xbb", substatementId=n, sessionId=7)
            for n, text in ((2, "world"), (1, "hello "), (2, "world"))
        ]
        records = [(str(i + 1), inner_document("db-Y", p)) for i, p in enumerate(parts)]
        await store(pool, token, batch("s", records, version="1.4"), "TRIM_HORIZON", "3")
        rows = await pool.fetch("SELECT command_text, parts FROM das.sqlserver_statements")
        assert [tuple(r) for r in rows] == [("hello world", 2)]
    finally:
        await pool.close()


def test_fixture_ids_are_distinct() -> None:
    ids = [e["statementId"] for e in sqlserver_events()]
    assert len(set(ids)) == len(ids) - 2  # the three parts of the split statement share one
    assert not list(itertools.chain.from_iterable(e.get("class_", []) for e in oracle_events()))


async def test_events_stored_before_the_engine_columns_still_verify(
    pg_dsn: str, tmp_path: Any
) -> None:
    """A warehouse at migration 0005 with a version 2 chain (38-column events), migrated to the
    end: the chain still verifies; a value put into an engine column of the old event shows."""
    from ingest.integrity.canonical import ZERO_HASH, DayDigests, LinkFields, event_day, link_hash
    from ingest.warehouse.migrate import load_migrations, migrate, migrations_dir

    before = tmp_path / "migrations"
    before.mkdir()
    for migration in load_migrations():
        if migration.version < 6:
            name = f"{migration.version:04d}_{migration.name}.sql"
            (before / name).write_text((migrations_dir() / name).read_text())
    stream, shard = "aws-rds-das-cluster-OLD", "shardId-000000000000"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, directory=before)
        stamp = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
        values = documented_example()
        named = dict(zip(EVENT_COLUMNS_V2, values, strict=True))
        named.update(stream_name=stream, shard_id=shard, sequence_number=Decimal(10),
                     log_time=stamp, ingested_at=stamp)  # fmt: skip
        values = [named[c] for c in EVENT_COLUMNS_V2]
        await conn.execute(
            f"INSERT INTO das.activity_events ({', '.join(EVENT_COLUMNS_V2)}) VALUES "
            f"({', '.join(f'${i + 1}' for i in range(len(EVENT_COLUMNS_V2)))})",
            *[
                orjson.dumps(v).decode() if c in ("param_list", "extra") else v
                for c, v in named.items()
            ],
        )
        digests = DayDigests()
        digests.add(event_day(stamp), event_digest(values))
        created = await conn.fetchval("SELECT now()")
        link = LinkFields(stream, shard, 1, "batch", "10", "10", 1, digests.summary(), created)
        await conn.execute(
            "INSERT INTO das.chain_links (stream_name, shard_id, link_no, kind, first_sequence,"
            " last_sequence, event_count, days, prev_hash, link_hash, created_at, dead_letters,"
            " version) VALUES ($1, $2, 1, 'batch', 10, 10, 1, $3::jsonb, $4, $5, $6, '[]', 2)",
            stream,
            shard,
            orjson.dumps(link.days).decode(),
            ZERO_HASH,
            link_hash(ZERO_HASH, link),
            created,
        )
        await conn.execute(
            "INSERT INTO das.leases (stream_name, shard_id, checkpoint) VALUES ($1, $2, '10')",
            stream,
            shard,
        )
        await migrate(conn)
        report = await verify_warehouse(conn, kms=None)
        assert report.clean, report.findings
        assert report.events == 1
        await conn.execute("UPDATE das.activity_events SET engine_native_audit_fields = '{}'")
        tampered = await verify_warehouse(conn, kms=None)
        assert [f.kind for f in tampered.findings] == ["altered"]
    finally:
        await conn.close()
