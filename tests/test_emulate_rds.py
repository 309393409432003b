"""The emulator's RDS for Oracle and RDS for SQL Server traffic, and their streams ingested end to
end by a fleet of workers (exactly once, views answering per engine)."""

from __future__ import annotations

import secrets
from collections import Counter, defaultdict
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.decode.normalize import decode_payload
from ingest.emulate.traffic import Traffic, decoded_event_key, record_keys
from tests.fleet import (
    Fleet,
    assert_exactly_once,
    expected,
    migrated,
    options,
    produce,
    stored,
)
from tests.rds_examples import ORACLE_FIELDS, SQLSERVER_FIELDS


def _events(engine: str, native: bool = False, count: int = 3000) -> list[tuple[str, Any]]:
    traffic = Traffic(5, engine, instances=2, native_fields=native)  # type: ignore[arg-type]
    return [
        (record.version, record) for record in traffic.records(10, count) if record.record_events
    ]


@pytest.mark.parametrize(
    ("engine", "version", "fields"),
    [("oracle", "1.3", ORACLE_FIELDS), ("sqlserver", "1.4", SQLSERVER_FIELDS)],
)
def test_every_field_of_the_table_in_every_event_decoded_without_anomaly(
    engine: str, version: str, fields: dict[str, str]
) -> None:
    records = _events(engine)
    for got_version, record in records:
        assert got_version == version
        assert record.doc["clusterId"] == ""  # an RDS instance
        assert record.instance_id.startswith("db-")
        for event in record.events:
            if event["type"] == "record":
                assert set(event) - {"type"} == set(fields), sorted(set(event) ^ set(fields))
        decoded = decode_payload(orjson.dumps(record.doc), version)
        for event in decoded.events:
            assert event.anomalies == ()
            assert event.extra == {}
        keys = [decoded_event_key(decoded.instance_id, e) for e in decoded.events]
        assert keys == list(record_keys(record))


def test_oracle_traffic_is_what_auditors_look_for() -> None:
    events = [e for _, r in _events("oracle") for e in r.events if e["type"] == "record"]
    classes = Counter(e["class"] for e in events)
    assert {"Standard", "FineGrainedAudit", "Database Vault", "RMAN_AUDIT", "Datapump"} <= set(
        classes
    )
    commands = Counter(e["command"] for e in events)
    assert {"LOGON", "LOGOFF", "GRANT", "REVOKE", "CREATE USER", "ALTER USER",
            "CREATE AUDIT POLICY", "SELECT", "INSERT"} <= set(commands)  # fmt: skip
    failed_logons = [e for e in events if e["command"] == "LOGON" and e["exitCode"] == 1017]
    assert failed_logons
    assert any(e["exitCode"] == 942 for e in events)
    assert any(e["dbUserName"] in ("SYS", "SYSTEM", "RDSADMIN") for e in events)
    # EVENT_TIMESTAMP_UTC has no zone; transaction ids are hex; session and statement numbers.
    assert all("+" not in e["logTime"] for e in events)
    assert all(int(e["transactionId"], 16) >= 0 for e in events)
    assert all(isinstance(e["sessionId"], int) and isinstance(e["statementId"], int)
               for e in events)  # fmt: skip
    assert all(e["engineNativeAuditFields"] == {} for e in events)


def test_sqlserver_traffic_splits_long_statements_and_fails_logins() -> None:
    events = [e for _, r in _events("sqlserver") for e in r.events if e["type"] == "record"]
    commands = Counter(e["command"] for e in events)
    assert {"LOGIN SUCCEEDED", "LOGIN FAILED", "LOGOUT", "GRANT", "DENY", "ADD MEMBER",
            "ALTER", "SELECT"} <= set(commands)  # fmt: skip
    assert all(e["exitCode"] == 0 for e in events if e["command"] == "LOGIN FAILED")
    assert all(len(e["logTime"].split(".")[1]) == len("4120677+00") for e in events)
    assert all(e["statementId"].startswith("0x") for e in events)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        groups[event["statementId"]].append(event)
    split = [g for g in groups.values() if len(g) > 1]
    assert split, "long statements are split over several events"
    for parts in split:
        assert [p["substatementId"] for p in parts] == list(range(1, len(parts) + 1))
        assert len({p["logTime"] for p in parts}) == 1
        assert len({p["sessionId"] for p in parts}) == 1
        assert "das-emulator" in parts[0]["commandText"]


def test_engine_native_fields_on_and_off() -> None:
    for engine, upper in (("oracle", True), ("sqlserver", False)):
        events = [e for _, r in _events(engine, native=True, count=200) for e in r.events
                  if e["type"] == "record"]  # fmt: skip
        assert all(e["engineNativeAuditFields"] for e in events)
        keys = {k for e in events for k in e["engineNativeAuditFields"]}
        assert all(k == (k.upper() if upper else k.lower()) for k in keys), keys


def test_all_engines_alternate_by_instance() -> None:
    traffic = Traffic(2, "all", instances=4)
    versions = {r.instance_id: r.version for r in traffic.records(10, 400)}
    assert sorted(versions.values()) == ["1.1", "1.2", "1.3", "1.4"]


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("aws_env")
@pytest.mark.parametrize("engine", ["oracle", "sqlserver"])
async def test_an_rds_stream_lands_exactly_once_with_a_fleet(
    engine: str, fleet: Fleet, pg_dsn: str
) -> None:
    """A db- stream (data keys under aws:rds:db-id) of each RDS engine, engine-native fields on,
    read by two workers over two shards: every event once, no anomaly, no dead letter, and
    the views answer for the engine."""
    await migrated(pg_dsn)
    stream = f"aws-rds-das-db-{secrets.token_hex(6).upper()}"
    opts = options(stream, engine=engine, count=1200, shards=2, instances=2, native_fields=True)
    await produce(opts)
    workers = [
        await fleet.start(name, stream, pg_dsn, "--processes", "0", "--stop-when-idle", "2")
        for name in ("w1", "w2")
    ]
    for worker in workers:
        assert await worker.wait(120) == 0
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM das.dead_letters") == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM das.activity_events WHERE anomalies <> '{}' OR extra <> '{}'"
            )
            == 0
        )
        engines = await conn.fetch("SELECT DISTINCT engine FROM das.events")
        assert [r["engine"] for r in engines] == [engine]
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM das.events WHERE engine_native_audit_fields = '{}'"
            )
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM das.failed_logins") > 0
        assert await conn.fetchval("SELECT count(*) FROM das.ddl_changes") > 0
        assert await conn.fetchval("SELECT count(*) FROM das.sessions WHERE duration > "
                                   "interval '0'") > 0  # fmt: skip
        if engine == "sqlserver":
            split = await conn.fetchval(
                "SELECT count(*) FROM das.sqlserver_statements WHERE parts > 1"
            )
            assert split > 0
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM das.activity_events WHERE times_as_sent IS NOT NULL"
                )
                > 0
            )
        else:
            assert (
                await conn.fetchval("SELECT count(DISTINCT dbid) FROM das.activity_events") == 2
            )  # one per instance
    finally:
        await conn.close()
