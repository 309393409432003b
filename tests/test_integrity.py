"""Tamper evidence: a clean warehouse verifies clean after crashes, takeovers and re-drives;
every kind of tampering by a superuser is detected and reported precisely."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import asyncpg
import boto3
import pytest

from ingest.aws import aws_client
from ingest.devstack import LocalStack
from ingest.integrity.canonical import (
    EVENT_COLUMNS,
    ZERO_HASH,
    DayDigests,
    LinkFields,
    event_day,
    event_digest,
    link_hash,
)
from ingest.integrity.verify import Report, stored_values, verify_warehouse
from ingest.warehouse.retention import apply_retention
from tests.cli_helpers import das_ingest
from tests.fleet import Fleet, committed_events, migrated, options, produce, wait_until
from tests.sealing import outer_record, seal_payload
from tests.warehouse_helpers import inner

EVENT_DAY = date(2024, 3, 1)  # the emulator's traffic starts on this day


@dataclass
class Warehouse:
    dsn: str
    stream: str
    key_id: str
    events: int


@pytest.fixture(scope="module")
async def warehouse(stack: LocalStack) -> AsyncIterator[Warehouse]:
    """A stream ingested by two workers, one SIGKILLed mid-way, with a dead letter re-driven;
    chain heads anchored with a KMS HMAC key. Built once: the tampering tests roll back."""
    saved = dict(os.environ)
    os.environ.update(stack.env())
    fleet = Fleet()
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(stack.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    assert stack.postgres is not None
    pg_dsn = stack.postgres.dsn_for(name)
    try:
        yield await _build(pg_dsn, stack, fleet)
    finally:
        await fleet.close()
        admin = await asyncpg.connect(stack.dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        os.environ.clear()
        os.environ.update(saved)


async def _build(pg_dsn: str, stack: LocalStack, fleet: Fleet) -> Warehouse:
    await migrated(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:  # a day partition, so that dropping one can be tried
        await conn.execute("SELECT das.ensure_partition($1)", EVENT_DAY)
    finally:
        await conn.close()
    kms = boto3.client("kms", endpoint_url=stack.kms_endpoint)
    key_id = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"][
        "KeyId"
    ]
    stream = f"aws-rds-das-cluster-{secrets.token_hex(5).upper()}"
    await produce(options(stream, count=600, shards=2, instances=2))
    # A record whose data key belongs to another cluster: dead-lettered at the kms stage.
    other = kms.generate_data_key(
        KeyId=kms.create_key()["KeyMetadata"]["KeyId"],
        KeySpec="AES_256",
        EncryptionContext={"aws:rds:dbc-id": "cluster-ELSEWHERE"},
    )
    stray = outer_record(
        seal_payload(
            inner(
                {
                    "type": "record",
                    "command": "SELECT",
                    "commandText": "select 7",
                    "logTime": "2024-03-01 12:00:00+00",
                }
            ),
            other["Plaintext"],
        ),
        other["CiphertextBlob"],
    )
    boto3.client("kinesis", endpoint_url=stack.kinesis_endpoint).put_record(
        StreamName=stream, Data=stray, PartitionKey="stray"
    )
    # Small batches: many links per chain, and a kill that lands between them.
    flags = (
        "--processes",
        "0",
        "--anchor-key-id",
        key_id,
        "--anchor-seconds",
        "1",
        "--max-records",
        "20",
    )
    victim = await fleet.start("victim", stream, pg_dsn, *flags)
    survivor = await fleet.start("survivor", stream, pg_dsn, *flags)
    more = options(
        stream, count=2000, seed=12, create_stream=False, shards=2, instances=2, rate=800
    )
    producing = asyncio.ensure_future(produce(more))
    await wait_until(lambda: _at_least(pg_dsn, 900), deadline=90)
    victim.kill()
    await victim.wait(30)
    await producing
    await wait_until(lambda: _at_least(pg_dsn, 2600), deadline=120)
    await wait_until(lambda: _dead_letters(pg_dsn, 1), deadline=60)
    survivor.terminate()
    assert await survivor.wait(60) == 0
    retry = await das_ingest(
        "dead-letters",
        "retry",
        "--all",
        "--resource-id",
        "cluster-ELSEWHERE",
        env={"DAS_DSN": pg_dsn},
    )
    assert retry.returncode == 0, retry.stderr
    assert "1 re-driven (1 events)" in retry.stdout
    anchored = await das_ingest("anchor", "--key-id", key_id, env={"DAS_DSN": pg_dsn})
    assert anchored.returncode == 0, anchored.stderr
    return Warehouse(pg_dsn, stream, key_id, 2601)


async def _dead_letters(dsn: str, n: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM das.dead_letters")) >= n
    finally:
        await conn.close()


async def _at_least(dsn: str, n: int) -> bool:
    return await committed_events(dsn) >= n


async def verify_in(conn: asyncpg.Connection) -> Report:
    async with aws_client("kms") as kms:
        return await verify_warehouse(conn, kms=kms)


def kinds(report: Report) -> list[str]:
    return sorted({f.kind for f in report.findings})


async def tampered(w: Warehouse, *statements: str) -> tuple[Report, asyncpg.Connection]:
    """Run ``statements`` as the superuser in a transaction the caller rolls back."""
    conn = await asyncpg.connect(w.dsn)
    transaction = conn.transaction()
    await transaction.start()
    for statement in statements:
        await conn.execute(statement)
    report = await verify_in(conn)
    await transaction.rollback()
    return report, conn


async def test_a_clean_warehouse_verifies_clean(warehouse: Warehouse) -> None:
    result = await das_ingest("verify", "--json", env={"DAS_DSN": warehouse.dsn})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["clean"] is True
    assert report["findings"] == []
    assert report["events"] == warehouse.events
    assert report["chains"] == 2
    assert report["anchors_checked"] >= 2
    assert report["unanchored_tail"] == []  # `anchor` just anchored every head
    conn = await asyncpg.connect(warehouse.dsn)
    try:
        kinds_of_links = {r["kind"] for r in await conn.fetch("SELECT kind FROM das.chain_links")}
        assert kinds_of_links == {"batch", "redrive"}
    finally:
        await conn.close()
    human = await das_ingest("verify", env={"DAS_DSN": warehouse.dsn})
    assert human.returncode == 0
    assert "no findings" in human.stdout


async def target(conn: asyncpg.Connection) -> Any:
    return await conn.fetchrow(
        "SELECT shard_id, sequence_number, event_index FROM das.activity_events "
        "WHERE command_text IS NOT NULL ORDER BY sequence_number DESC, event_index LIMIT 1 "
        "OFFSET 100"
    )


def where(row: Any) -> str:
    return (
        f"shard_id = '{row['shard_id']}' AND sequence_number = {row['sequence_number']} "
        f"AND event_index = {row['event_index']}"
    )


def assert_points_at(report: Report, kind: str, row: Any) -> None:
    hits = [f for f in report.findings if f.kind == kind]
    assert len(hits) == 1, report.findings
    finding = hits[0]
    assert finding.shard == row["shard_id"]
    assert finding.first_sequence is not None
    assert finding.last_sequence is not None
    assert int(finding.first_sequence) <= int(row["sequence_number"]) <= int(finding.last_sequence)
    assert finding.link_no is not None


async def test_an_updated_value_is_reported_as_altered(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    row = await target(conn)
    await conn.close()
    report, conn = await tampered(
        warehouse,
        f"UPDATE das.activity_events SET command_text = 'nothing to see' WHERE {where(row)}",
    )
    await conn.close()
    assert kinds(report) == ["altered"]
    assert_points_at(report, "altered", row)


async def test_a_deleted_row_is_reported(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    row = await target(conn)
    await conn.close()
    report, conn = await tampered(warehouse, f"DELETE FROM das.activity_events WHERE {where(row)}")
    await conn.close()
    assert kinds(report) == ["deleted"]
    assert_points_at(report, "deleted", row)
    assert "1 of" in report.findings[0].detail


async def test_a_forged_row_is_reported_as_inserted(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    row = await target(conn)
    await conn.close()
    report, conn = await tampered(
        warehouse,
        f"""INSERT INTO das.activity_events (log_time, cluster_id, instance_id, record_version,
            stream_name, shard_id, sequence_number, event_index, command, command_text,
            db_user_name)
            SELECT log_time, cluster_id, instance_id, record_version, stream_name, shard_id,
                   sequence_number, event_index + 1000, 'SELECT', 'select forged', 'alice'
            FROM das.activity_events WHERE {where(row)}""",
    )
    await conn.close()
    assert kinds(report) == ["inserted"]
    assert_points_at(report, "inserted", row)


async def test_swapped_batches_break_the_chain(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    pair = await conn.fetchrow(
        """SELECT a.shard_id, a.link_no AS a, b.link_no AS b FROM das.chain_links a
           JOIN das.chain_links b ON b.shard_id = a.shard_id AND b.link_no = a.link_no + 1
           WHERE a.kind = 'batch' AND b.kind = 'batch' AND a.event_count > 0
             AND b.event_count > 0
           ORDER BY a.shard_id, a.link_no LIMIT 1"""
    )
    links = await conn.fetch(
        "SELECT shard_id, link_no, kind, event_count FROM das.chain_links ORDER BY 1, 2"
    )
    await conn.close()
    assert pair is not None, [tuple(r) for r in links]
    shard, a, b = pair["shard_id"], pair["a"], pair["b"]
    report, conn = await tampered(
        warehouse,
        f"UPDATE das.chain_links SET link_no = -link_no "
        f"WHERE shard_id = '{shard}' AND link_no IN ({a}, {b})",
        f"UPDATE das.chain_links SET link_no = {a + b} + link_no "
        f"WHERE shard_id = '{shard}' AND link_no < 0",
    )
    await conn.close()
    assert "chain_broken" in kinds(report)
    assert "reordered" in kinds(report)
    assert {f.link_no for f in report.findings} <= {a, b, b + 1}
    assert {f.shard for f in report.findings} == {shard}


async def test_a_partition_dropped_outside_retention_is_reported(warehouse: Warehouse) -> None:
    report, conn = await tampered(warehouse, f"DROP TABLE das.activity_events_p{EVENT_DAY:%Y%m%d}")
    await conn.close()
    assert kinds(report) == ["deleted"]
    assert {f.day for f in report.findings} == {EVENT_DAY.isoformat()}
    assert all("no retention record" in f.detail for f in report.findings)


async def test_retention_is_told_apart_from_vanishing(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    transaction = conn.transaction()
    await transaction.start()
    try:
        keep = date.today() - EVENT_DAY - timedelta(days=1)
        actions = await apply_retention(conn, keep)
        assert any(a.partition == f"activity_events_p{EVENT_DAY:%Y%m%d}" for a in actions)
        report = await verify_in(conn)
        assert report.clean, report.findings
        assert EVENT_DAY.isoformat() in report.retained_days
    finally:
        await transaction.rollback()
        await conn.close()


async def test_truncated_newest_links_are_reported(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    shard = await conn.fetchval("SELECT min(shard_id) FROM das.chain_links")
    head = await conn.fetchrow(
        "SELECT max(link_no) AS n FROM das.chain_links WHERE shard_id = $1 AND kind = 'batch'",
        shard,
    )
    keep_to = head["n"] - 2
    # A re-drive among the removed links leaves its dead-lettered record unaccounted for.
    redrive_removed = await conn.fetchval(
        "SELECT count(*) FROM das.chain_links WHERE shard_id = $1 AND link_no > $2 "
        "AND kind = 'redrive'",
        shard,
        keep_to,
    )
    await conn.close()
    report, conn = await tampered(
        warehouse,
        f"""DELETE FROM das.activity_events e USING das.chain_links l
            WHERE l.shard_id = '{shard}' AND l.link_no > {keep_to} AND e.shard_id = l.shard_id
              AND e.sequence_number BETWEEN l.first_sequence AND l.last_sequence""",
        f"DELETE FROM das.chain_links WHERE shard_id = '{shard}' AND link_no > {keep_to}",
    )
    await conn.close()
    assert kinds(report) == (
        ["dead_letter_missing", "truncated"] if redrive_removed else ["truncated"]
    )
    assert {f.shard for f in report.findings} == {shard}


async def test_a_consistently_rewritten_chain_fails_at_the_anchor(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    row = await target(conn)
    shard = row["shard_id"]
    transaction = conn.transaction()
    await transaction.start()
    try:
        # Change an event, then rebuild every link of the shard the way das-ingest writes
        # them: digests and chain are consistent again; only the anchors (KMS) can tell.
        await conn.execute(
            f"UPDATE das.activity_events SET db_user_name = 'nobody' WHERE {where(row)}"
        )
        links = await conn.fetch(
            "SELECT link_no, kind, first_sequence::text AS f, last_sequence::text AS l, "
            "created_at, dead_letters::text AS letters "
            "FROM das.chain_links WHERE shard_id = $1 ORDER BY link_no",
            shard,
        )
        redriven = {r["f"] for r in links if r["kind"] == "redrive"}
        prev = ZERO_HASH
        for link in links:
            digests = DayDigests()
            rows = await conn.fetch(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM das.activity_events WHERE shard_id = $1 "
                "AND sequence_number BETWEEN $2::numeric AND $3::numeric "
                "ORDER BY sequence_number, event_index",
                shard,
                link["f"],
                link["l"],
            )
            for r in rows:
                if link["kind"] == "batch" and str(r["sequence_number"]) in redriven:
                    continue
                digests.add(event_day(r["log_time"]), event_digest(stored_values(r)))
            days = digests.summary()
            new_hash = link_hash(
                prev,
                LinkFields(
                    warehouse.stream,
                    shard,
                    link["link_no"],
                    link["kind"],
                    link["f"],
                    link["l"],
                    digests.count,
                    days,
                    link["created_at"],
                    json.loads(link["letters"]),
                ),
            )
            await conn.execute(
                "UPDATE das.chain_links SET days = $1::jsonb, event_count = $2, prev_hash = $3, "
                "link_hash = $4 WHERE shard_id = $5 AND link_no = $6",
                json.dumps(days),
                digests.count,
                prev,
                new_hash,
                shard,
                link["link_no"],
            )
            prev = new_hash
        report = await verify_in(conn)
    finally:
        await transaction.rollback()
        await conn.close()
    assert kinds(report) == ["anchor_mismatch"]
    assert {f.shard for f in report.findings} == {shard}


async def test_a_forged_anchor_is_rejected_by_kms(warehouse: Warehouse) -> None:
    report, conn = await tampered(
        warehouse,
        "UPDATE das.chain_anchors SET signature = sha256(signature) "
        "WHERE id = (SELECT max(id) FROM das.chain_anchors)",
    )
    await conn.close()
    assert kinds(report) == ["anchor_invalid"]


async def test_anchors_export_as_json_lines(warehouse: Warehouse) -> None:
    result = await das_ingest("anchor", "--export", "-", env={"DAS_DSN": warehouse.dsn})
    assert result.returncode == 0, result.stderr
    anchors = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(anchors) >= 2
    assert {a["algorithm"] for a in anchors} == {"HMAC_SHA_256"}
    assert all(len(bytes.fromhex(a["link_hash"])) == 32 for a in anchors)


async def test_findings_make_the_cli_fail(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    try:
        row = await target(conn)
        await conn.execute(
            f"CREATE TABLE public.kept AS SELECT * FROM das.activity_events WHERE {where(row)}"
        )
        await conn.execute(f"DELETE FROM das.activity_events WHERE {where(row)}")
        result = await das_ingest("verify", env={"DAS_DSN": warehouse.dsn})
        assert result.returncode == 1
        assert "DELETED" in result.stdout
        assert row["shard_id"] in result.stdout
    finally:  # put it back for the other tests of the module
        await conn.execute("INSERT INTO das.activity_events SELECT * FROM public.kept")
        await conn.execute("DROP TABLE public.kept")
        await conn.close()
    assert (await das_ingest("verify", env={"DAS_DSN": warehouse.dsn})).returncode == 0


async def test_awkward_values_verify_clean(pg_dsn: str, aws_env: dict[str, str]) -> None:
    """The digests computed from the values about to be stored equal those recomputed from
    what PostgreSQL gives back, for values whose text PostgreSQL normalizes (jsonb key order
    and numbers, time zones, escaped text)."""
    from ingest.decode.batch import BatchInput, decode_batch
    from ingest.warehouse.sink import CopyUnit, Sink
    from tests.sealing import seal
    from tests.warehouse_helpers import ESDK, KEY, STREAM, hold_lease, migrated_pool

    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        events = [
            {
                "type": "record",
                "logTime": "2024-03-01 10:00:00.5+05:30",
                "pid": "12",
                "extra1": {"zz": 1e20, "a": -0.0, "é": [1.5, 100.0, 1e-7, 12345678901234567890]},
                "commandText": "a\x00b\\c\t\n",
                "paramList": ["x", None, 2.50],
            },
            {
                "type": "record",
                "logTime": "0999-12-31 23:59:59.999999",
                "startTime": "bogus",
                "exitCode": 0,
                "sessionId": 5,
                "b": True,
                "c": None,
                "d": "\u2603\U0001f600",
            },
            {"type": "record"},
        ]
        items = [(i, str(100 + i), seal(inner(e), KEY), KEY) for i, e in enumerate(events)]
        output = decode_batch(BatchInput("s", items, ESDK, stream_name=STREAM))
        assert output.failures == []
        sink = Sink(pool)
        await sink.ensure_partitions(output.days)
        await sink.commit(
            token,
            previous_checkpoint="TRIM_HORIZON",
            new_checkpoint="102",
            units=[CopyUnit(output.events, output.statements, chain=output.chain)],
            sequence_range=("100", "102"),
        )
        async with pool.acquire() as conn:
            report = await verify_warehouse(conn, kms=None)
        assert report.clean, report.findings
        assert report.events == 3
        assert report.links == 1
    finally:
        await pool.close()
