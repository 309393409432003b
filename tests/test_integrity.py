"""Tamper evidence: a clean warehouse verifies clean after crashes, takeovers and re-drives;
every kind of tampering by a superuser is detected and reported precisely."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest

from das_dev.devstack import LocalStack
from ingest.aws import aws_client
from ingest.conn import Conn
from ingest.decode.batch import BatchInput, KeyedRecord, decode_batch
from ingest.emulate.traffic import EventKey, format_datetime
from ingest.errors import ConfigError
from ingest.integrity.alerts import ANCHOR_SHARD, ANCHOR_STREAM
from ingest.integrity.anchor import (
    AnchorError,
    AnchorKey,
    anchor_alert_head,
    anchor_heads,
    read_exported_anchors,
)
from ingest.integrity.canonical import (
    CHAIN_VERSION,
    EVENT_COLUMNS,
    EVENT_COLUMNS_V1,
    ZERO_HASH,
    DayDigests,
    LinkFields,
    event_day,
    event_digest,
    link_hash,
)
from ingest.integrity.verify import Report, stored_values, verify_warehouse
from ingest.lease import LeaseToken
from ingest.warehouse.retention import apply_retention
from ingest.warehouse.sink import CopyUnit, Sink
from tests.cli_helpers import das_ingest
from tests.fleet import (
    Fleet,
    assert_exactly_once,
    committed_events,
    expected,
    migrated,
    new_stream,
    options,
    produce,
    wait_until,
)
from tests.sealing import outer_record, seal, seal_payload
from tests.warehouse_helpers import (
    ESDK,
    KEY,
    STREAM,
    commit_sealed,
    hold_lease,
    inner,
    migrated_pool,
)

EVENT_DAY = date(2024, 3, 1)  # the emulator's traffic starts on this day


@dataclass
class Warehouse:
    dsn: str
    stream: str
    key_id: str
    events: int
    #: the shards the SIGKILLed worker held when it died (taken over by the survivor)
    victim_shards: set[str]
    #: anchors the workers made while running (periodic anchoring), per shard
    anchored_while_running: dict[str, int]
    #: verify's unanchored tail right after the graceful stop, and after the re-drive
    tail_after_shutdown: list[dict[str, Any]]
    tail_after_redrive: list[dict[str, Any]]
    #: `das-ingest anchor --export` of every anchor, taken at the end
    anchors_file: Path
    #: the sequence number of a record that stays dead-lettered (not JSON)
    poison_sequence: str


@pytest.fixture(scope="module")
async def warehouse(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Warehouse]:
    """A stream ingested by two workers, one SIGKILLed mid-way while holding a lease, with a
    dead letter re-driven and one kept; chain heads anchored by the workers (periodically and
    at their graceful stop) with a KMS HMAC key. Built once: the tampering tests roll back."""
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
        yield await _build(pg_dsn, stack, fleet, tmp_path_factory.mktemp("anchors"))
    finally:
        await fleet.close()
        admin = await asyncpg.connect(stack.dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        os.environ.clear()
        os.environ.update(saved)


async def _build(pg_dsn: str, stack: LocalStack, fleet: Fleet, tmp: Path) -> Warehouse:
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
    kinesis = boto3.client("kinesis", endpoint_url=stack.kinesis_endpoint)
    kinesis.put_record(StreamName=stream, Data=stray, PartitionKey="stray")
    # And one that is not a DAS record at all: dead-lettered for good.
    poison = kinesis.put_record(StreamName=stream, Data=b"not a record", PartitionKey="poison")
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
    await wait_until(lambda: _holds_lease(pg_dsn, "victim"), deadline=30)
    victim_shards = await _leases_of(pg_dsn, "victim")
    victim.kill()
    await victim.wait(30)
    await producing
    await wait_until(lambda: _at_least(pg_dsn, 2600), deadline=120)
    await wait_until(lambda: _dead_letters(pg_dsn, 2), deadline=60)
    # Periodic anchoring: the running workers anchored both chains (nobody ran `anchor`).
    await wait_until(lambda: _anchored_shards(pg_dsn, 2), deadline=30)
    anchored_while_running = await _anchors_per_shard(pg_dsn)
    survivor.terminate()
    assert await survivor.wait(60) == 0
    taken = {entry["shard"] for entry in survivor.logged("consuming shard")}
    assert victim_shards <= taken, (victim_shards, taken)
    conn = await asyncpg.connect(pg_dsn)
    try:
        tail_after_shutdown = (await verify_in(conn)).unanchored
        stray_id = await conn.fetchval("SELECT id FROM das.dead_letters WHERE stage = 'kms'")
    finally:
        await conn.close()
    retry = await das_ingest(
        "dead-letters",
        "retry",
        "--id",
        str(stray_id),
        "--resource-id",
        "cluster-ELSEWHERE",
        env={"DAS_DSN": pg_dsn},
    )
    assert retry.returncode == 0, retry.stderr
    assert "1 re-driven (1 events)" in retry.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        tail_after_redrive = (await verify_in(conn)).unanchored
    finally:
        await conn.close()
    anchored = await das_ingest("anchor", "--key-id", key_id, env={"DAS_DSN": pg_dsn})
    assert anchored.returncode == 0, anchored.stderr
    anchors_file = tmp / "anchors.jsonl"
    exported = await das_ingest("anchor", "--export", str(anchors_file), env={"DAS_DSN": pg_dsn})
    assert exported.returncode == 0, exported.stderr
    return Warehouse(
        pg_dsn,
        stream,
        key_id,
        2601,
        victim_shards,
        anchored_while_running,
        tail_after_shutdown,
        tail_after_redrive,
        anchors_file,
        poison["SequenceNumber"],
    )


async def _holds_lease(dsn: str, owner: str) -> bool:
    return bool(await _leases_of(dsn, owner))


async def _leases_of(dsn: str, owner: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT shard_id FROM das.leases WHERE owner = $1 AND expires_at > now()", owner
        )
        return {r["shard_id"] for r in rows}
    finally:
        await conn.close()


async def _anchors_per_shard(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT shard_id, count(*) AS n FROM das.chain_anchors WHERE stream_name <> $1 "
            "GROUP BY shard_id",
            ANCHOR_STREAM,  # the alert chain's anchors: not a shard's
        )
        return {r["shard_id"]: r["n"] for r in rows}
    finally:
        await conn.close()


async def _anchored_shards(dsn: str, n: int) -> bool:
    return len(await _anchors_per_shard(dsn)) >= n


async def _dead_letters(dsn: str, n: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM das.dead_letters")) >= n
    finally:
        await conn.close()


async def _at_least(dsn: str, n: int) -> bool:
    return await committed_events(dsn) >= n


async def verify_in(conn: Conn, **options: Any) -> Report:
    async with aws_client("kms") as kms:
        return await verify_warehouse(conn, kms=kms, **options)


@contextlib.asynccontextmanager
async def rolled_back_in(conn: Conn) -> AsyncIterator[None]:
    """A transaction on ``conn`` that is rolled back afterwards."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    finally:
        await transaction.rollback()


@contextlib.asynccontextmanager
async def rolled_back(w: Warehouse) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection in a transaction that is rolled back afterwards."""
    conn = await asyncpg.connect(w.dsn)
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield conn
    finally:
        await transaction.rollback()
        await conn.close()


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
    assert "rebuild-statements" not in human.stdout
    # The strictest verify: the key pinned, the exported anchors compared, a short tail limit.
    strict = await das_ingest(
        "verify",
        "--json",
        "--anchor-key-id",
        warehouse.key_id,
        "--anchors",
        str(warehouse.anchors_file),
        "--max-unanchored-seconds",
        "5",
        env={"DAS_DSN": warehouse.dsn},
    )
    assert strict.returncode == 0, strict.stdout + strict.stderr
    assert json.loads(strict.stdout)["anchor_key"].endswith(warehouse.key_id)


async def test_everything_is_chained_with_its_stream_and_dead_letters(warehouse: Warehouse) -> None:
    conn = await asyncpg.connect(warehouse.dsn)
    try:
        streams = await conn.fetch("SELECT DISTINCT stream_name FROM das.activity_events")
        assert [r["stream_name"] for r in streams] == [warehouse.stream]
        assert {r["version"] for r in await conn.fetch("SELECT version FROM das.chain_links")} == {
            CHAIN_VERSION
        }
        letters = await conn.fetch(
            "SELECT kind, e->>'sequence_number' AS seq, e->>'sha256' AS sha256 "
            "FROM das.chain_links, jsonb_array_elements(dead_letters) e"
        )
        kept = await conn.fetchrow("SELECT sequence_number::text AS seq, raw FROM das.dead_letters")
        assert kept is not None
    finally:
        await conn.close()
    # The batch links list both records that were dead-lettered; the re-drive names the one
    # it stored; the other is still kept, with the bytes the link recorded.
    batch = {r["seq"]: r["sha256"] for r in letters if r["kind"] == "batch"}
    redrive = {r["seq"]: r["sha256"] for r in letters if r["kind"] == "redrive"}
    assert len(batch) == 2
    assert len(redrive) == 1
    assert redrive.items() <= batch.items()
    assert kept["seq"] == warehouse.poison_sequence
    assert batch[kept["seq"]] == hashlib.sha256(bytes(kept["raw"])).hexdigest()


async def test_workers_anchor_periodically_and_at_a_graceful_stop(warehouse: Warehouse) -> None:
    # While they ran (before any `das-ingest anchor`), every chain had anchors...
    assert len(warehouse.anchored_while_running) == 2
    assert all(n >= 1 for n in warehouse.anchored_while_running.values())
    # ... and the graceful stop anchored each head: nothing was left unanchored.
    assert warehouse.tail_after_shutdown == []


async def test_the_killed_worker_held_a_lease_that_was_taken_over(warehouse: Warehouse) -> None:
    assert warehouse.victim_shards  # the fixture also checked the survivor consumed them
    assert warehouse.victim_shards <= {"shardId-000000000000", "shardId-000000000001"}


async def test_an_unanchored_tail_is_reported(warehouse: Warehouse) -> None:
    # The re-drive (after the workers stopped) extended one chain past its anchored head.
    assert len(warehouse.tail_after_redrive) == 1
    tail = warehouse.tail_after_redrive[0]
    assert tail["links"] == 1
    assert tail["first_link"] == tail["last_link"]
    conn = await asyncpg.connect(warehouse.dsn)
    try:
        kind = await conn.fetchval(
            "SELECT kind FROM das.chain_links WHERE stream_name = $1 AND shard_id = $2 "
            "AND link_no = $3",
            tail["stream"],
            tail["shard"],
            tail["first_link"],
        )
    finally:
        await conn.close()
    assert kind == "redrive"


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
    assert head is not None
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


async def rewrite_chain_consistently(conn: asyncpg.Connection, w: Warehouse, row: Any) -> None:
    """Change an event, then rebuild every link of its shard the way das-ingest writes them:
    digests and chain are consistent again; only the anchors (KMS) can tell."""
    shard = row["shard_id"]
    await conn.execute(f"UPDATE das.activity_events SET db_user_name = 'nobody' WHERE {where(row)}")
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
                w.stream,
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


async def test_a_consistently_rewritten_chain_fails_at_the_anchor(warehouse: Warehouse) -> None:
    async with rolled_back(warehouse) as conn:
        row = await target(conn)
        await rewrite_chain_consistently(conn, warehouse, row)
        report = await verify_in(conn)
    assert kinds(report) == ["anchor_mismatch"]
    assert {f.shard for f in report.findings} == {row["shard_id"]}


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
        assert "das-ingest rebuild-statements" in result.stdout  # how to rebuild derived data
    finally:  # put it back for the other tests of the module
        await conn.execute("INSERT INTO das.activity_events SELECT * FROM public.kept")
        await conn.execute("DROP TABLE public.kept")
        await conn.close()
    assert (await das_ingest("verify", env={"DAS_DSN": warehouse.dsn})).returncode == 0


async def test_awkward_values_verify_clean(pg_dsn: str, aws_env: dict[str, str]) -> None:
    """The digests computed from the values about to be stored equal those recomputed from
    what PostgreSQL gives back, for values whose text PostgreSQL normalizes (jsonb key order
    and numbers, time zones, escaped text)."""
    from tests.sealing import seal
    from tests.warehouse_helpers import KEY, STREAM, hold_lease, migrated_pool

    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        events: list[dict[str, Any]] = [
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
        items = [
            KeyedRecord(i, str(100 + i), seal(inner(e), KEY), KEY) for i, e in enumerate(events)
        ]
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


# -- anchors: deleted, pinned, refused, asymmetric ---------------------------------------------


async def test_deleted_anchors_are_found_with_the_exported_copy(warehouse: Warehouse) -> None:
    exported = read_exported_anchors(str(warehouse.anchors_file))
    async with rolled_back(warehouse) as conn:
        await conn.execute("DELETE FROM das.chain_anchors")
        # Without the safe copy, deleting every anchor only grows the unanchored tail ...
        blind = await verify_in(conn)
        assert blind.clean, blind.findings
        alerts = await conn.fetchval("SELECT count(*) FROM das.alerts")
        assert {(t["stream"], t["shard"]) for t in blind.unanchored} == {
            (warehouse.stream, "shardId-000000000000"),
            (warehouse.stream, "shardId-000000000001"),
        } | ({(ANCHOR_STREAM, ANCHOR_SHARD)} if alerts else set())
        # ... with it, each deleted anchor is a finding, and the anchors still count.
        report = await verify_in(conn, exported_anchors=exported)
    assert kinds(report) == ["anchor_missing"]
    assert len(report.findings) == len(exported)
    assert report.unanchored == []


async def test_deleted_anchors_and_a_rewritten_chain_fail_at_the_exported_copy(
    warehouse: Warehouse,
) -> None:
    exported = read_exported_anchors(str(warehouse.anchors_file))
    async with rolled_back(warehouse) as conn:
        row = await target(conn)
        await conn.execute("DELETE FROM das.chain_anchors")
        await rewrite_chain_consistently(conn, warehouse, row)
        blind = await verify_in(conn, anchor_key_id=warehouse.key_id)
        report = await verify_in(conn, anchor_key_id=warehouse.key_id, exported_anchors=exported)
    assert blind.clean, blind.findings  # the tail is young: nothing to see without the copy
    assert kinds(report) == ["anchor_mismatch", "anchor_missing"]
    assert {f.shard for f in report.findings if f.kind == "anchor_mismatch"} == {row["shard_id"]}


async def test_an_old_unanchored_tail_is_a_finding_when_the_key_is_pinned(
    warehouse: Warehouse,
) -> None:
    async with rolled_back(warehouse) as conn:
        shard = await conn.fetchval("SELECT min(shard_id) FROM das.chain_anchors")
        await conn.execute(
            "DELETE FROM das.chain_anchors WHERE id = (SELECT max(id) FROM das.chain_anchors "
            "WHERE shard_id = $1)",
            shard,
        )
        young = await verify_in(
            conn, anchor_key_id=warehouse.key_id, max_unanchored_age=timedelta(hours=1)
        )
        old = await verify_in(conn, anchor_key_id=warehouse.key_id, max_unanchored_age=timedelta())
        unpinned = await verify_in(conn, max_unanchored_age=timedelta())
    assert young.clean, young.findings
    assert [t["shard"] for t in young.unanchored] == [shard]
    assert kinds(old) == ["unanchored"]
    assert old.findings[0].shard == shard
    assert unpinned.clean  # without an expected key, the tail is reported, not judged


async def test_an_anchor_made_with_another_key_is_a_finding(
    warehouse: Warehouse, stack: LocalStack
) -> None:
    kms = boto3.client("kms", endpoint_url=stack.kms_endpoint)
    other = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    async with rolled_back(warehouse) as conn, aws_client("kms") as client:
        shard = await conn.fetchval("SELECT min(shard_id) FROM das.chain_links")
        # The head's anchors replaced by one made with a key of the administrator's own.
        await conn.execute(
            "DELETE FROM das.chain_anchors WHERE shard_id = $1 AND link_no = "
            "(SELECT max(link_no) FROM das.chain_links WHERE shard_id = $1)",
            shard,
        )
        made = await anchor_heads(conn, AnchorKey(client, other["KeyId"]), warehouse.stream)
        assert [a.shard_id for a in made] == [shard]
        unpinned = await verify_in(conn)
        pinned = await verify_in(conn, anchor_key_id=warehouse.key_id)
        # Naming the expected key in the row does not help: the MAC is checked with it.
        await conn.execute(
            "UPDATE das.chain_anchors SET key_id = $1 WHERE key_id = $2",
            pinned.anchor_key,
            other["Arn"],
        )
        renamed = await verify_in(conn, anchor_key_id=warehouse.key_id)
    assert unpinned.clean, unpinned.findings  # the row's own key vouches for it
    assert kinds(pinned) == ["anchor_unexpected_key"]
    assert pinned.findings[0].shard == shard
    assert "unexpected key" in pinned.findings[0].detail
    assert kinds(renamed) == ["anchor_invalid"]


async def test_the_worker_refuses_an_anchor_key_it_cannot_use(warehouse: Warehouse) -> None:
    """At startup, not every --anchor-seconds: an unknown key is a configuration error (exit 2,
    one line naming the key and KMS's answer), and nothing is consumed."""
    before = await count_rows(warehouse.dsn, "das.chain_links")
    result = await das_ingest(
        "run",
        "--stream",
        warehouse.stream,
        "--anchor-key-id",
        "alias/no-such-anchor-key",
        env={"DAS_DSN": warehouse.dsn},
        deadline=60,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot use anchor key 'alias/no-such-anchor-key': NotFoundException" in result.stderr
    assert "Traceback" not in result.stderr
    assert await count_rows(warehouse.dsn, "das.chain_links") == before


async def test_an_unreachable_kms_is_a_retriable_anchor_error(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KMS down while the anchor key is looked up is transient (the worker retries at startup,
    and at runtime logs it and anchors later); a refusal is a configuration error."""
    async with aws_client("kms") as kms:
        with pytest.raises(ConfigError, match="NotFoundException"):
            await AnchorKey(kms, "alias/no-such-anchor-key").info()
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:9")  # nothing listens there
    async with aws_client("kms") as kms:
        with pytest.raises(AnchorError, match="unreachable"):
            await AnchorKey(kms, "alias/das-anchor").info()


async def count_rows(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def test_a_kms_refusal_is_reported_with_its_own_exit_code(warehouse: Warehouse) -> None:
    result = await das_ingest(
        "verify",
        "--anchor-key-id",
        "alias/no-such-anchor-key",
        env={"DAS_DSN": warehouse.dsn},
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "ANCHOR_UNCHECKED" in result.stdout
    assert "no-such-anchor-key" in result.stdout
    assert "Traceback" not in result.stderr
    unreachable = await das_ingest(
        "verify",
        "--json",
        env={"DAS_DSN": warehouse.dsn, "AWS_ENDPOINT_URL_KMS": "http://127.0.0.1:9"},
    )
    assert unreachable.returncode == 3, unreachable.stdout + unreachable.stderr
    report = json.loads(unreachable.stdout)
    assert {f["kind"] for f in report["findings"]} == {"anchor_unchecked"}
    assert report["events"] == warehouse.events  # everything else was still checked
    # After a few failures in a row KMS is not asked again (each failure costs retries).
    assert "not asked again" in report["findings"][-1]["detail"]


async def test_asymmetric_anchors_sign_and_verify(warehouse: Warehouse, stack: LocalStack) -> None:
    kms = boto3.client("kms", endpoint_url=stack.kms_endpoint)
    signing = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    async with rolled_back(warehouse) as conn, aws_client("kms") as client:
        await conn.execute("DELETE FROM das.chain_anchors")
        key = AnchorKey(client, signing["KeyId"])
        made = await anchor_heads(conn, key, warehouse.stream)
        alert_head = await anchor_alert_head(conn, key)
        if alert_head is not None:
            made.append(alert_head)
        alerts = await conn.fetchval("SELECT count(*) FROM das.alerts")
        assert len(made) == 2 + (alerts > 0)
        assert {a.algorithm for a in made} == {"ECDSA_SHA_256"}
        assert {a.key_id for a in made} == {signing["Arn"]}
        good = await verify_in(conn, anchor_key_id=signing["KeyId"])
        await conn.execute(
            "UPDATE das.chain_anchors SET anchored_at = anchored_at + interval '1 microsecond' "
            "WHERE id = (SELECT min(id) FROM das.chain_anchors)"
        )
        bad = await verify_in(conn, anchor_key_id=signing["KeyId"])
    assert good.clean, good.findings
    assert good.anchors_checked == len(made)
    assert good.unanchored == []
    assert kinds(bad) == ["anchor_invalid"]


# -- verify's scope: --shard, --stream, --since, --no-anchors ----------------------------------


async def test_verify_can_be_limited_to_shards_and_streams(warehouse: Warehouse) -> None:
    async with rolled_back(warehouse) as conn:
        row = await target(conn)
        other = next(
            s for s in ("shardId-000000000000", "shardId-000000000001") if s != row["shard_id"]
        )
        await conn.execute(
            f"UPDATE das.activity_events SET command_text = 'changed' WHERE {where(row)}"
        )
        elsewhere = await verify_in(conn, shards=[other])
        here = await verify_in(conn, shards=[row["shard_id"]], stream=warehouse.stream)
        no_stream = await verify_in(conn, stream="aws-rds-das-cluster-NOSUCHTHING")
    assert elsewhere.clean, elsewhere.findings
    assert elsewhere.chains == 1
    assert kinds(here) == ["altered"]
    assert here.chains == 1
    assert here.events + elsewhere.events == warehouse.events
    assert no_stream.chains == 0
    assert no_stream.events == 0
    result = await das_ingest(
        "verify", "--json", "--shard", other, "--stream", warehouse.stream,
        env={"DAS_DSN": warehouse.dsn},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["chains"] == 1
    assert report["events"] == elsewhere.events


async def test_since_recomputes_only_the_newer_links(warehouse: Warehouse) -> None:
    async with rolled_back(warehouse) as conn:
        row = await target(conn)
        link = await conn.fetchrow(
            "SELECT link_no, created_at FROM das.chain_links WHERE shard_id = $1 "
            "AND $2 BETWEEN first_sequence AND last_sequence AND kind = 'batch'",
            row["shard_id"],
            row["sequence_number"],
        )
        assert link is not None
        later = await conn.fetchval(
            "SELECT min(created_at) FROM das.chain_links WHERE created_at > $1", link["created_at"]
        )
        await conn.execute(
            f"UPDATE das.activity_events SET command_text = 'changed' WHERE {where(row)}"
        )
        since_link = await verify_in(conn, since=link["created_at"])
        since_later = await verify_in(conn, since=later)
    assert kinds(since_link) == ["altered"]
    assert since_link.findings[0].link_no == link["link_no"]
    assert since_later.clean, since_later.findings  # the altered link was not recomputed
    assert since_later.events < since_link.events < warehouse.events + 1
    result = await das_ingest(
        "verify", "--json", "--since", "2999-01-01T00:00:00Z", env={"DAS_DSN": warehouse.dsn}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["events"] == 0
    assert report["links"] > 0  # the chains themselves are always walked


async def test_a_link_created_at_is_covered_by_its_hash(warehouse: Warehouse) -> None:
    """--since selects links by created_at: moving a link into the past to hide it from a
    --since run breaks the link instead."""
    report, conn = await tampered(
        warehouse,
        "UPDATE das.chain_links SET created_at = created_at - interval '1 day' "
        "WHERE link_no = 3 AND shard_id = 'shardId-000000000000'",
    )
    await conn.close()
    assert kinds(report) == ["link_altered"]
    assert report.findings[0].link_no == 3


async def test_no_anchors_says_so(warehouse: Warehouse) -> None:
    async with rolled_back(warehouse) as conn:
        row = await target(conn)
        await rewrite_chain_consistently(conn, warehouse, row)
        blind = await verify_warehouse(conn, kms=None)
    assert blind.clean  # only the anchors can tell a consistent rewrite
    assert blind.anchors_skipped
    result = await das_ingest("verify", "--json", "--no-anchors", env={"DAS_DSN": warehouse.dsn})
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["anchors_skipped"] is True
    assert report["anchors_checked"] == 0
    human = await das_ingest("verify", "--no-anchors", env={"DAS_DSN": warehouse.dsn})
    assert "anchors NOT checked" in human.stdout


# -- dead letters ------------------------------------------------------------------------------


async def test_a_deleted_dead_letter_is_reported(warehouse: Warehouse) -> None:
    report, conn = await tampered(warehouse, "DELETE FROM das.dead_letters")
    await conn.close()
    assert kinds(report) == ["dead_letter_missing"]
    finding = report.findings[0]
    assert finding.first_sequence == finding.last_sequence == warehouse.poison_sequence
    assert finding.stream == warehouse.stream
    assert finding.link_no is not None


async def test_an_altered_dead_letter_is_reported(warehouse: Warehouse) -> None:
    report, conn = await tampered(warehouse, "UPDATE das.dead_letters SET raw = raw || 'x'")
    await conn.close()
    assert kinds(report) == ["dead_letter_altered"]
    assert report.findings[0].first_sequence == warehouse.poison_sequence


async def test_a_forged_dead_letter_and_its_redrive_are_reported(warehouse: Warehouse) -> None:
    async with rolled_back(warehouse) as conn:
        link = await conn.fetchrow(
            "SELECT shard_id, first_sequence FROM das.chain_links WHERE kind = 'batch' "
            "AND first_sequence < last_sequence ORDER BY link_no LIMIT 1"
        )
        assert link is not None
        await conn.execute(
            "INSERT INTO das.dead_letters (stream_name, shard_id, sequence_number, stage, error, "
            "raw) VALUES ($1, $2, $3, 'kms', 'forged', 'x')",
            warehouse.stream,
            link["shard_id"],
            link["first_sequence"],
        )
        report = await verify_in(conn)
    assert kinds(report) == ["inserted"]
    assert "does not list" in report.findings[0].detail


# -- retention ---------------------------------------------------------------------------------


async def test_a_forged_retention_record_is_not_believed(warehouse: Warehouse) -> None:
    day = f"{EVENT_DAY:%Y%m%d}"
    async with rolled_back(warehouse) as conn:
        rows = await conn.fetchval(f"SELECT count(*) FROM das.activity_events_p{day}")
        await conn.execute(f"DROP TABLE das.activity_events_p{day}")
        await conn.execute(
            "INSERT INTO das.retention_log (partition_name, range_start, range_end, "
            "rows_removed) VALUES ($1, $2, $3, $4)",
            f"activity_events_p{day}",
            datetime.combine(EVENT_DAY, datetime.min.time(), tzinfo=UTC),
            datetime.combine(EVENT_DAY + timedelta(days=1), datetime.min.time(), tzinfo=UTC),
            rows - 1,
        )
        miscounted = await verify_in(conn)
        await conn.execute("UPDATE das.retention_log SET rows_removed = rows_removed + 1")
        # The right count, but the day is younger than the retention policy allows.
        young = await verify_in(conn, retention_keep=date.today() - EVENT_DAY + timedelta(days=30))
        # The right count and old enough for a policy of a day: retention, as far as anyone
        # can tell (the oldest day of a chain may go).
        allowed = await verify_in(conn, retention_keep=timedelta(days=1))
    assert kinds(miscounted) == ["deleted", "retention_invalid"]
    assert "rows were removed" in next(
        f.detail for f in miscounted.findings if f.kind == "retention_invalid"
    )
    assert kinds(young) == ["deleted", "retention_invalid"]
    assert "keeps everything from" in next(
        f.detail for f in young.findings if f.kind == "retention_invalid"
    )
    assert allowed.clean, allowed.findings
    assert allowed.retained_days == [EVENT_DAY.isoformat()]


async def test_legitimate_retention_verifies_clean_under_its_policy(warehouse: Warehouse) -> None:
    keep = date.today() - EVENT_DAY - timedelta(days=1)
    async with rolled_back(warehouse) as conn:
        actions = await apply_retention(conn, keep)
        assert any(a.partition == f"activity_events_p{EVENT_DAY:%Y%m%d}" for a in actions)
        report = await verify_in(conn, retention_keep=keep)
        recorded = await conn.fetch("SELECT keep FROM das.retention_log")
    assert report.clean, report.findings
    assert EVENT_DAY.isoformat() in report.retained_days
    assert {r["keep"] for r in recorded} == {keep}


# -- several streams in one warehouse ----------------------------------------------------------


async def _commit_events(
    pool: asyncpg.Pool,
    token: LeaseToken,
    events: list[dict[str, Any]],
    first: int,
    *,
    previous: str = "TRIM_HORIZON",
    cluster: str = "cluster-TEST",
) -> str:
    """Store one event per record, sequence numbers from ``first``, as a worker would (one
    batch, one link); returns the new checkpoint."""
    records = [seal(inner(e, cluster=cluster), KEY) for e in events]
    return await commit_sealed(pool, token, records, first, previous)


async def test_two_streams_share_shard_ids_and_sequence_numbers(
    pg_dsn: str, aws_env: dict[str, str]
) -> None:
    """Shard ids repeat across streams (and sequence numbers may): every event is stored
    once per stream, verifies clean, and tampering is attributed to the right stream."""
    pool = await migrated_pool(pg_dsn)
    streams = ("aws-rds-das-cluster-AAA", "aws-rds-das-cluster-BBB")
    shard = "shardId-000000000000"
    events = [
        {"type": "record", "logTime": "2024-03-01 10:00:00+00", "commandText": f"select {i}"}
        for i in range(3)
    ]
    try:
        for stream in streams:
            await _commit_events(pool, (await hold_lease(pool, shard, "w", stream))[0], events, 100)
        async with pool.acquire() as conn:
            counts = {
                r["stream_name"]: r["n"]
                for r in await conn.fetch(
                    "SELECT stream_name, count(*) AS n FROM das.activity_events GROUP BY 1"
                )
            }
            report = await verify_warehouse(conn, kms=None)
            async with rolled_back_in(conn):
                await conn.execute(
                    "UPDATE das.activity_events SET command_text = 'changed' "
                    "WHERE stream_name = $1 AND sequence_number = 101",
                    streams[1],
                )
                tampered_b = await verify_warehouse(conn, kms=None)
                only_a = await verify_warehouse(conn, kms=None, stream=streams[0])
    finally:
        await pool.close()
    assert counts == {streams[0]: 3, streams[1]: 3}
    assert report.clean, report.findings
    assert (report.chains, report.links, report.events) == (2, 2, 6)
    assert kinds(tampered_b) == ["altered"]
    assert tampered_b.findings[0].stream == streams[1]
    assert tampered_b.findings[0].shard == shard
    assert only_a.clean, only_a.findings


async def _stored_of(dsn: str, stream: str) -> list[EventKey]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT instance_id, pid, session_id, statement_id, substatement_id, class, log_time "
            "FROM das.activity_events WHERE stream_name = $1 "
            "ORDER BY ingested_at, sequence_number, event_index",
            stream,
        )
    finally:
        await conn.close()
    return [
        EventKey(
            r["instance_id"], r["pid"], r["session_id"], r["statement_id"],
            r["substatement_id"], r["class"], format_datetime(r["log_time"]),
        )
        for r in rows
    ]  # fmt: skip


async def test_two_streams_ingested_into_one_warehouse_verify_clean(
    fleet: Fleet, pg_dsn: str, aws_env: dict[str, str]
) -> None:
    await migrated(pg_dsn)
    streams = [new_stream(), new_stream()]
    opts = [
        options(stream, count=300, shards=2, instances=2, seed=30 + i)
        for i, stream in enumerate(streams)
    ]
    await asyncio.gather(*(produce(o) for o in opts))
    workers = [
        await fleet.start(f"w{i}", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "1")
        for i, stream in enumerate(streams)
    ]
    assert [await w.wait(120) for w in workers] == [0, 0]
    for stream, o in zip(streams, opts, strict=True):
        assert_exactly_once(await _stored_of(pg_dsn, stream), expected(o))
    result = await das_ingest("verify", "--json", "--no-anchors", env={"DAS_DSN": pg_dsn})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["chains"] == 4  # the same two shard ids in each stream
    assert report["events"] == sum(len(expected(o)) for o in opts)


# -- closed shards -----------------------------------------------------------------------------


async def test_a_closed_shard_is_anchored_and_held_to_its_last_record(
    fleet: Fleet, pg_dsn: str, aws_env: dict[str, str]
) -> None:
    await migrated(pg_dsn)
    key_id = boto3.client("kms", endpoint_url=aws_env["AWS_ENDPOINT_URL_KMS"]).create_key(
        KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC"
    )["KeyMetadata"]["KeyId"]
    stream = new_stream()
    await produce(options(stream, count=300, shards=2, instances=4))
    # No periodic anchoring in this run: only the end of the parent and the stop anchor.
    worker = await fleet.start(
        "w", stream, pg_dsn, "--processes", "0", "--anchor-key-id", key_id,
        "--anchor-seconds", "3600", "--max-records", "20", "--stop-when-idle", "3",
    )  # fmt: skip
    more = options(stream, count=900, seed=41, create_stream=False, shards=2, instances=4, rate=600)
    producing = asyncio.ensure_future(produce(more))
    kinesis = boto3.client("kinesis", endpoint_url=aws_env["AWS_ENDPOINT_URL_KINESIS"])
    await asyncio.sleep(0.7)
    await asyncio.to_thread(
        kinesis.split_shard,
        StreamName=stream,
        ShardToSplit="shardId-000000000000",
        NewStartingHashKey=str(2**126),
    )
    await producing
    assert await worker.wait(180) == 0
    parent = "shardId-000000000000"
    conn = await asyncpg.connect(pg_dsn)
    try:
        lease = await conn.fetchrow(
            "SELECT checkpoint, end_sequence::text AS end_sequence FROM das.leases "
            "WHERE shard_id = $1",
            parent,
        )
        assert lease is not None
        head = await conn.fetchrow(
            "SELECT max(link_no) AS n, max(last_sequence)::text AS last FROM das.chain_links "
            "WHERE shard_id = $1",
            parent,
        )
        assert head is not None
        anchored = await conn.fetchval(
            "SELECT max(link_no) FROM das.chain_anchors WHERE shard_id = $1", parent
        )
        report = await verify_in(conn, anchor_key_id=key_id)
        assert lease["checkpoint"] == "SHARD_END"
        assert lease["end_sequence"] == head["last"]
        assert anchored == head["n"]  # the worker anchored the closed parent's head
        assert report.clean, report.findings
        assert report.unanchored == []
        assert report.chains == 4  # the parent, its two children and the other shard
        async with rolled_back_in(conn):
            await conn.execute(
                """DELETE FROM das.activity_events e USING das.chain_links l
                   WHERE l.shard_id = $1 AND l.link_no > $2 AND e.shard_id = l.shard_id
                     AND e.stream_name = l.stream_name
                     AND e.sequence_number BETWEEN l.first_sequence AND l.last_sequence""",
                parent,
                head["n"] - 2,
            )
            await conn.execute(
                "DELETE FROM das.chain_links WHERE shard_id = $1 AND link_no > $2",
                parent,
                head["n"] - 2,
            )
            with_anchors = await verify_in(conn, anchor_key_id=key_id)
            without = await verify_warehouse(conn, kms=None)
    finally:
        await conn.close()
    assert kinds(with_anchors) == ["truncated"]
    assert {f.shard for f in with_anchors.findings} == {parent}
    assert any("anchored but is gone" in f.detail for f in with_anchors.findings)
    # Without KMS, the recorded end of the closed shard tells it.
    assert kinds(without) == ["truncated"]
    assert "closed" in without.findings[0].detail
    assert without.findings[0].last_sequence == head["last"]


# -- retention removes the oldest days first ---------------------------------------------------


def _day(d: date) -> datetime:
    return datetime.combine(d, datetime.min.time(), tzinfo=UTC)


async def test_retention_must_remove_the_oldest_days_first(
    pg_dsn: str, aws_env: dict[str, str]
) -> None:
    first, second = date(2024, 3, 1), date(2024, 3, 2)
    pool = await migrated_pool(pg_dsn)
    try:
        async with pool.acquire() as conn:
            for d in (first, second):  # outside the on-demand window: made by hand
                await conn.execute("SELECT das.ensure_partition($1)", d)
        token = (await hold_lease(pool, "shardId-000000000000", "w", STREAM))[0]
        events = [
            # a day before: in the default partition (no partition for it)
            {"type": "record", "logTime": "2024-02-01 08:00:00+00", "commandText": "a"},
            {"type": "record", "logTime": "2024-03-01 08:00:00+00", "commandText": "b"},
            {"type": "record", "logTime": "2024-03-01 09:00:00+00", "commandText": "c"},
            {"type": "record", "logTime": "2024-03-02 08:00:00+00", "commandText": "d"},
        ]
        await _commit_events(pool, token, events, 100)
        async with pool.acquire() as conn:
            assert (await verify_warehouse(conn, kms=None)).clean
            async with rolled_back_in(conn):
                # The newer day dropped, with a record that has the right count and period.
                await conn.execute(f"DROP TABLE das.activity_events_p{second:%Y%m%d}")
                await conn.execute(
                    "INSERT INTO das.retention_log (partition_name, range_start, range_end, "
                    "rows_removed, removed_at, keep) VALUES ($1, $2, $3, 1, now(), '1 day')",
                    f"activity_events_p{second:%Y%m%d}",
                    _day(second),
                    _day(second + timedelta(days=1)),
                )
                forged = await verify_warehouse(conn, kms=None)
            async with rolled_back_in(conn):
                # das-ingest retention keeping everything from 2024-03-02 on.
                keep_second = timedelta(days=(date.today() - second).days)
                await apply_retention(conn, keep_second)
                some = await verify_warehouse(conn, kms=None, retention_keep=keep_second)
                # ... and later, everything.
                await apply_retention(conn, timedelta(days=1))
                everything = await verify_warehouse(conn, kms=None)
                removed = await conn.fetch(
                    "SELECT partition_name, rows_removed FROM das.retention_log ORDER BY id"
                )
    finally:
        await pool.close()
    assert kinds(forged) == ["deleted"]
    assert forged.findings[0].day == second.isoformat()
    assert "older day" in forged.findings[0].detail
    assert some.clean, some.findings
    assert some.retained_days == ["2024-02-01", "2024-03-01"]
    assert everything.clean, everything.findings
    assert everything.retained_days == ["2024-02-01", "2024-03-01", "2024-03-02"]
    assert [(r["partition_name"], r["rows_removed"]) for r in removed] == [
        ("activity_events_p20240301", 2),
        ("activity_events_default", 1),
        ("activity_events_p20240302", 1),
    ]


# -- upgrading a warehouse with version 1 chains -----------------------------------------------


async def _legacy_chain(
    conn: asyncpg.Connection,
    stream: str,
    shard: str,
    events: list[tuple[int, str | None]],
) -> None:
    """Events and their version 1 link as das-ingest wrote them before migration 0004:
    (sequence number, cluster_id) pairs, one event each, one link over them."""
    for seq, cluster in events:
        await conn.execute(
            "INSERT INTO das.activity_events (log_time, cluster_id, record_version, shard_id, "
            "sequence_number, event_index, command_text, extra, ingested_at) "
            "VALUES ('2024-03-01 10:00:00+00', $1, '1.2', $2, $3, 0, 'select 1', "
            "'{\"a\": 1.5}', now())",
            cluster,
            shard,
            seq,
        )
    rows = await conn.fetch(
        f"SELECT {', '.join(EVENT_COLUMNS_V1)} FROM das.activity_events WHERE shard_id = $1 "
        "AND sequence_number = ANY ($2::numeric[]) ORDER BY sequence_number",
        shard,
        [seq for seq, _ in events],
    )
    digests = DayDigests()
    for row in rows:
        # Version 1 takes the same values (in EVENT_COLUMNS order) but never reads stream_name.
        values: list[Any] = [None] * len(EVENT_COLUMNS)
        for column in EVENT_COLUMNS_V1:
            values[EVENT_COLUMNS.index(column)] = row[column]
        extra = EVENT_COLUMNS.index("extra")
        values[extra] = json.loads(values[extra])
        digests.add(event_day(row["log_time"]), event_digest(values, version=1))
    first, last = str(events[0][0]), str(events[-1][0])
    link = LinkFields(
        stream, shard, 1, "batch", first, last, digests.count, digests.summary(), version=1
    )
    await conn.execute(
        "INSERT INTO das.chain_links (stream_name, shard_id, link_no, kind, first_sequence, "
        "last_sequence, event_count, days, prev_hash, link_hash) "
        "VALUES ($1, $2, 1, 'batch', $3::numeric, $4::numeric, $5, $6::jsonb, $7, $8)",
        stream,
        shard,
        first,
        last,
        digests.count,
        json.dumps(link.days),
        ZERO_HASH,
        link_hash(ZERO_HASH, link),
    )
    await conn.execute(
        "INSERT INTO das.leases (stream_name, shard_id, checkpoint) VALUES ($1, $2, $3)",
        stream,
        shard,
        last,
    )


async def _upgraded(
    dsn: str, tmp_path: Path, build: Any, before_version: int = 4
) -> tuple[list[str], Report]:
    """Migrate to the schema before ``before_version``, ``build`` the legacy data, migrate to
    the end; returns the migration's warnings and verify's report."""
    from ingest.warehouse.migrate import load_migrations, migrate, migrations_dir

    before = tmp_path / "migrations"
    before.mkdir()
    for migration in load_migrations():
        if migration.version < before_version:
            name = f"{migration.version:04d}_{migration.name}.sql"
            (before / name).write_text((migrations_dir() / name).read_text())
    conn = await asyncpg.connect(dsn)
    warnings: list[str] = []
    conn.add_log_listener(
        lambda _c, message: (
            warnings.append(str(message.message)) if message.severity == "WARNING" else None
        )
    )
    try:
        await migrate(conn, directory=before)
        await build(conn)
        await migrate(conn)
        return warnings, await verify_warehouse(conn, kms=None)
    finally:
        await conn.close()


async def test_upgrading_a_single_stream_warehouse(pg_dsn: str, tmp_path: Path) -> None:
    stream = "aws-rds-das-cluster-ONE"

    async def build(conn: asyncpg.Connection) -> None:
        await _legacy_chain(conn, stream, "shardId-000000000000", [(10, None), (11, "c")])
        await _legacy_chain(conn, stream, "shardId-000000000001", [(10, "c")])

    warnings, report = await _upgraded(pg_dsn, tmp_path, build)
    conn = await asyncpg.connect(pg_dsn)
    try:
        streams = [r[0] for r in await conn.fetch("SELECT stream_name FROM das.activity_events")]
    finally:
        await conn.close()
    assert streams == [stream] * 3
    assert warnings == []
    assert report.clean, report.findings
    assert (report.chains, report.links, report.events) == (2, 2, 3)


async def test_upgrading_a_warehouse_of_several_streams(pg_dsn: str, tmp_path: Path) -> None:
    a, b, c = "aws-rds-das-cluster-A", "aws-rds-das-cluster-B", "aws-rds-das-cluster-C"
    shared = "shardId-000000000000"

    async def build(conn: asyncpg.Connection) -> None:
        # A and B share a shard id and overlapping sequence ranges; their events name their
        # cluster, except one (sequence 11) that only A's link covers, and one (sequence 20)
        # that nothing can attribute: a NULL cluster, and both streams' links cover it.
        await _legacy_chain(conn, a, shared, [(10, "cluster-A"), (11, None), (20, None)])
        await _legacy_chain(conn, b, shared, [(12, "cluster-B"), (25, "cluster-B")])
        await _legacy_chain(conn, c, "shardId-000000000007", [(10, None)])

    warnings, report = await _upgraded(pg_dsn, tmp_path, build)
    conn = await asyncpg.connect(pg_dsn)
    try:
        got = {
            (r["shard_id"], int(r["sequence_number"])): r["stream_name"]
            for r in await conn.fetch(
                "SELECT stream_name, shard_id, sequence_number FROM das.activity_events"
            )
        }
    finally:
        await conn.close()
    assert got == {
        (shared, 10): a,  # its cluster's stream
        (shared, 12): b,
        (shared, 25): b,
        (shared, 11): a,  # the only stream whose link covers it
        (shared, 20): "",  # ambiguous: left for a human
        ("shardId-000000000007", 10): c,  # the only stream with that shard
    }
    assert any("1 existing events could not be attributed" in w for w in warnings), warnings
    # The version 1 links still verify; the ambiguous event is checked against both streams'
    # links of its shard, so the stream it does not belong to reports it.
    assert kinds(report) == ["inserted"]
    assert report.findings[0].stream == b
    assert "1 events of 2024-03-01" in report.findings[0].detail


# -- the fingerprint group and dropped counts (migration 0015) ---------------------------------


async def _insert_event(
    conn: asyncpg.Connection, values: dict[str, Any], columns: tuple[str, ...] = EVENT_COLUMNS
) -> list[Any]:
    """Insert one event; its values in EVENT_COLUMNS order (of ``columns``, the rest None)."""
    names = list(values)
    await conn.execute(
        f"INSERT INTO das.activity_events ({', '.join(names)}) "
        f"VALUES ({', '.join(f'${i + 1}' for i in range(len(names)))})",
        *values.values(),
    )
    row = await conn.fetchrow(
        f"SELECT {', '.join(columns)} FROM das.activity_events "
        "WHERE shard_id = $1 AND sequence_number = $2",
        values["shard_id"],
        values["sequence_number"],
    )
    assert row is not None
    return stored_values([*row, *[None] * (len(EVENT_COLUMNS) - len(row))])


async def _link(conn: asyncpg.Connection, link: LinkFields, prev: bytes) -> bytes:
    digest = link_hash(prev, link)
    with_dropped = bool(link.dropped)
    await conn.execute(
        "INSERT INTO das.chain_links (stream_name, shard_id, link_no, kind, first_sequence, "
        "last_sequence, event_count, days, prev_hash, link_hash, created_at, dead_letters, "
        "version" + (", dropped" if with_dropped else "") + ") "
        "VALUES ($1, $2, $3, 'batch', $4::numeric, $5::numeric, $6, $7::jsonb, $8, $9, $10, "
        "'[]', 2" + (", $11::jsonb" if with_dropped else "") + ")",
        link.stream, link.shard, link.link_no, link.first_sequence, link.last_sequence,
        link.event_count, json.dumps(link.days), prev, digest, link.created_at,
        *([json.dumps(dict(link.dropped))] if with_dropped else []),
    )  # fmt: skip
    return digest


async def test_fingerprints_and_dropped_counts_extend_a_chain_begun_before_them(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A chain begun before migration 0015 (events without fingerprint columns) continues with
    fingerprinted events and a link counting dropped events: all of it verifies, and tampering
    with either new field (or fingerprinting an old event) is found."""
    stream, shard = "aws-rds-das-cluster-FP", "shardId-000000000000"
    base = {
        "log_time": datetime(2024, 3, 1, 10, tzinfo=UTC), "cluster_id": "c",
        "record_version": "1.1", "stream_name": stream, "shard_id": shard, "event_index": 0,
        "command_text": "SELECT 1", "ingested_at": datetime(2024, 3, 1, 10, 1, tzinfo=UTC),
        "engine_native_audit_fields": "{}",
    }  # fmt: skip
    created = datetime(2024, 3, 1, 10, 2, tzinfo=UTC)
    before = tuple(c for c in EVENT_COLUMNS if not c.startswith("fingerprint"))

    async def build(conn: asyncpg.Connection) -> None:
        values = await _insert_event(conn, {**base, "sequence_number": 10}, before)
        digests = DayDigests()
        digests.add("2024-03-01", event_digest(values))
        link = LinkFields(stream, shard, 1, "batch", "10", "10", 1, digests.summary(), created)
        await _link(conn, link, ZERO_HASH)
        await conn.execute(
            "INSERT INTO das.leases (stream_name, shard_id, checkpoint) VALUES ($1, $2, '10')",
            stream,
            shard,
        )

    _, report = await _upgraded(pg_dsn, tmp_path, build, before_version=15)
    assert report.clean, report.findings
    conn = await asyncpg.connect(pg_dsn)
    try:
        prev = await conn.fetchval("SELECT link_hash FROM das.chain_links WHERE link_no = 1")
        values = await _insert_event(
            conn,
            {**base, "sequence_number": 11, "fingerprint": "select ?", "fingerprint_hash": -7},
        )
        digests = DayDigests()
        digests.add("2024-03-01", event_digest(values))
        link = LinkFields(
            stream, shard, 2, "batch", "11", "12", 1, digests.summary(), created, (),
            dropped={"noise": 2},
        )  # fmt: skip
        await _link(conn, link, bytes(prev))
        await conn.execute("UPDATE das.leases SET checkpoint = '12'")
        report = await verify_warehouse(conn, kms=None)
        assert report.clean, report.findings
        assert (report.links, report.events) == (2, 2)
        dropped = await conn.fetch("SELECT rule, events FROM das.dropped_events")
        assert [(r["rule"], r["events"]) for r in dropped] == [("noise", 2)]
        for statement, kind in (
            ("UPDATE das.activity_events SET fingerprint = 'select 1' WHERE sequence_number = 11",
             "altered"),
            ("UPDATE das.activity_events SET fingerprint = NULL, fingerprint_hash = NULL "
             "WHERE sequence_number = 11", "altered"),
            ("UPDATE das.activity_events SET fingerprint = 'x', fingerprint_hash = 1 "
             "WHERE sequence_number = 10", "altered"),
            ("UPDATE das.chain_links SET dropped = '{}' WHERE link_no = 2", "link_altered"),
        ):  # fmt: skip
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute(statement)
                assert kinds(await verify_warehouse(conn, kms=None)) == [kind], statement
            finally:
                await tx.rollback()
    finally:
        await conn.close()
