"""Incremental verify: a routine run starts from the progress a previous run recorded (MACed
with the verify key, vouched for by an anchor), recomputes what is new plus a sample of older
links; --full recomputes everything; a forged progress record is a finding, never a blind spot."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import boto3
import pytest

from das_dev.devstack import LocalStack
from ingest.aws import aws_client
from ingest.conn import Conn
from ingest.integrity.anchor import AnchorKey, anchor_heads
from ingest.integrity.verify import Report, sampled_link_numbers, verify_warehouse
from ingest.warehouse.migrate import migrate
from ingest.warehouse.roles import RoleNames
from ingest.warehouse.sink import CopyUnit, Sink
from tests.cli_helpers import das_ingest
from tests.warehouse_helpers import STREAM, batch, hold_lease, inner, migrated_pool

SHARDS = ("shardId-000000000000", "shardId-000000000001")
EVENTS_PER_BATCH = 4


@dataclass
class Chains:
    dsn: str
    pool: asyncpg.Pool
    anchor_key: str
    verify_key: str
    #: per shard: the last sequence number written, and the lease token
    next_sequence: dict[str, int]
    tokens: dict[str, Any]
    checkpoints: dict[str, str]

    async def add_batches(self, n: int) -> None:
        """``n`` more batches (links) per shard, then anchor the heads."""
        for shard in SHARDS:
            for _ in range(n):
                first = self.next_sequence[shard]
                records = [
                    (
                        str(first + i),
                        inner(
                            {
                                "type": "record",
                                "logTime": f"2024-03-0{1 + (first + i) % 3} 10:00:00+00",
                                "command": "SELECT",
                                "commandText": f"select {first + i}",
                                "dbUserName": "alice",
                                "sessionId": str(first % 7),
                            }
                        ),
                    )
                    for i in range(EVENTS_PER_BATCH)
                ]
                last = str(first + EVENTS_PER_BATCH - 1)
                output = batch(shard, records)
                assert output.failures == []
                sink = Sink(self.pool)
                await sink.ensure_partitions(output.days)
                await sink.commit(
                    self.tokens[shard],
                    previous_checkpoint=self.checkpoints[shard],
                    new_checkpoint=last,
                    units=[CopyUnit(output.events, output.statements, chain=output.chain)],
                    sequence_range=(str(first), last),
                )
                self.checkpoints[shard] = last
                self.next_sequence[shard] = first + EVENTS_PER_BATCH
        async with aws_client("kms") as kms, self.pool.acquire() as conn:
            await anchor_heads(conn, AnchorKey(kms, self.anchor_key), STREAM)

    async def verify(self, conn: Conn, **options: Any) -> Report:
        async with aws_client("kms") as kms:
            return await verify_warehouse(
                conn,
                kms=kms,
                anchor_key_id=self.anchor_key,
                verify_key_id=self.verify_key,
                **options,
            )


@pytest.fixture
async def chains(pg_dsn: str, stack: LocalStack, aws_env: dict[str, str]) -> AsyncIterator[Chains]:
    """Two shard chains of 10 links each (4 events per link), anchored at their heads, with an
    anchor key and a verify key (both HMAC)."""
    kms = boto3.client("kms", endpoint_url=stack.kms_endpoint)
    keys = [
        kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
        for _ in range(2)
    ]
    pool = await migrated_pool(pg_dsn)
    try:
        tokens = {shard: (await hold_lease(pool, shard, "w"))[0] for shard in SHARDS}
        start = 10**20
        built = Chains(
            pg_dsn,
            pool,
            keys[0],
            keys[1],
            dict.fromkeys(SHARDS, start),
            tokens,
            dict.fromkeys(SHARDS, "TRIM_HORIZON"),
        )
        await built.add_batches(10)
        yield built
    finally:
        await pool.close()


def kinds(report: Report) -> list[str]:
    return sorted({f.kind for f in report.findings})


async def alter_event(conn: Conn, shard: str, link_no: int) -> None:
    """Change one stored value of an event that link ``link_no`` of ``shard`` covers."""
    bounds = await conn.fetchrow(
        "SELECT first_sequence, last_sequence FROM das.chain_links "
        "WHERE stream_name = $1 AND shard_id = $2 AND link_no = $3",
        STREAM,
        shard,
        link_no,
    )
    assert bounds is not None
    changed = await conn.execute(
        "UPDATE das.activity_events SET command_text = 'select 0' "
        "WHERE stream_name = $1 AND shard_id = $2 AND sequence_number = $3",
        STREAM,
        shard,
        bounds["first_sequence"],
    )
    assert changed == "UPDATE 1"


async def test_a_full_run_records_progress_and_a_routine_run_checks_only_what_is_new(
    chains: Chains,
) -> None:
    async with chains.pool.acquire() as conn:
        first = await chains.verify(conn, routine=True)
        assert first.clean, first.findings
        assert first.mode == "routine"
        assert first.routine_chains == 0
        assert first.events == 2 * 10 * EVENTS_PER_BATCH
        assert {(p["shard"], p["link"]) for p in first.progress_recorded} == {
            (shard, 10) for shard in SHARDS
        }
        await chains.add_batches(3)
        routine = await chains.verify(conn, routine=True, sample=2, seed=7)
        assert routine.clean, routine.findings
        assert routine.routine_chains == 2
        assert routine.sampled_links == 4
        # 3 new links and 2 sampled older ones per shard: nothing else was recomputed
        assert routine.events == 2 * (3 + 2) * EVENTS_PER_BATCH
        assert {(p["shard"], p["link"]) for p in routine.progress_recorded} == {
            (shard, 13) for shard in SHARDS
        }
        full = await chains.verify(conn, routine=False)
        assert full.clean, full.findings
        assert full.mode == "full"
        assert full.routine_chains == 0
        assert full.events == 2 * 13 * EVENTS_PER_BATCH


async def test_tampering_in_the_new_part_is_found_by_a_routine_run(chains: Chains) -> None:
    async with chains.pool.acquire() as conn:
        assert (await chains.verify(conn)).clean
        await chains.add_batches(2)
        await alter_event(conn, SHARDS[1], 12)
        report = await chains.verify(conn, routine=True, sample=0)
    assert report.routine_chains == 2
    assert kinds(report) == ["altered"]
    assert [(f.shard, f.link_no) for f in report.findings] == [(SHARDS[1], 12)]
    assert not any(p["shard"] == SHARDS[1] for p in report.progress_recorded)


async def test_tampering_in_the_old_part_is_found_by_full_and_by_a_sample_that_hits_it(
    chains: Chains,
) -> None:
    async with chains.pool.acquire() as conn:
        assert (await chains.verify(conn)).clean
        await alter_event(conn, SHARDS[0], 4)
        unsampled = await chains.verify(conn, routine=True, sample=0)
        # What a routine run does not recompute it does not see: the limit of sampling.
        assert unsampled.clean, unsampled.findings
        missing = next(
            seed
            for seed in range(1000)
            if 4 not in sampled_link_numbers(seed, STREAM, SHARDS[0], 10, 1)
        )
        hitting = next(
            seed
            for seed in range(1000)
            if 4 in sampled_link_numbers(seed, STREAM, SHARDS[0], 10, 1)
        )
        missed = await chains.verify(conn, routine=True, sample=1, seed=missing)
        hit = await chains.verify(conn, routine=True, sample=1, seed=hitting)
        full = await chains.verify(conn, routine=False)
    assert missed.clean, missed.findings
    for report in (hit, full):
        assert kinds(report) == ["altered"]
        assert [(f.shard, f.link_no) for f in report.findings] == [(SHARDS[0], 4)]
    assert hit.sample_seed == hitting
    assert hit.routine_chains == 2


async def test_a_forged_progress_record_is_found(chains: Chains) -> None:
    """Events altered before any verify, then progress forged to claim the whole chain was
    verified: the claim is not believed, the chain is verified in full, the alteration found."""
    async with chains.pool.acquire() as conn:
        await alter_event(conn, SHARDS[0], 3)
        head = await conn.fetchrow(
            "SELECT link_no, link_hash, last_sequence FROM das.chain_links "
            "WHERE shard_id = $1 ORDER BY link_no DESC LIMIT 1",
            SHARDS[0],
        )
        assert head is not None
        await conn.execute(
            "INSERT INTO das.verify_progress VALUES ($1, $2, $3, $4, $5, now(), $6, "
            "'HMAC_SHA_256', $7, 1)",
            STREAM,
            SHARDS[0],
            head["link_no"],
            head["link_hash"],
            head["last_sequence"],
            chains.verify_key,
            secrets.token_bytes(32),
        )
        forged = await chains.verify(conn, routine=True, sample=0)
    assert kinds(forged) == ["altered", "progress_invalid"]
    invalid = [f for f in forged.findings if f.kind == "progress_invalid"]
    assert [(f.shard, f.link_no) for f in invalid] == [(SHARDS[0], 10)]
    assert "not MACed with the verify key" in invalid[0].detail
    assert forged.routine_chains == 0  # the other chain had no claim: full as well


async def test_a_genuine_progress_record_moved_or_unvouched_is_found(chains: Chains) -> None:
    async with chains.pool.acquire() as conn:
        assert (await chains.verify(conn)).clean
        # A genuine claim replayed onto the other chain: its MAC names its own chain.
        tx = conn.transaction()
        await tx.start()
        await conn.execute("DELETE FROM das.verify_progress WHERE shard_id = $1", SHARDS[1])
        await conn.execute(
            "UPDATE das.verify_progress SET shard_id = $1 WHERE shard_id = $2", *SHARDS[::-1]
        )
        moved = await chains.verify(conn, routine=True, sample=0)
        await tx.rollback()
        # The anchor that vouched for the claimed link is gone (and the chain could have been
        # rewritten up to it): the claim is not believed.
        tx = conn.transaction()
        await tx.start()
        await conn.execute("DELETE FROM das.chain_anchors WHERE shard_id = $1", SHARDS[0])
        unvouched = await chains.verify(conn, routine=True, sample=0)
        await tx.rollback()
        # The claimed link no longer has the claimed hash (a rewritten chain).
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "UPDATE das.chain_links SET link_hash = sha256(link_hash) "
            "WHERE shard_id = $1 AND link_no = 10",
            SHARDS[0],
        )
        rewritten = await chains.verify(conn, routine=True, sample=0)
        await tx.rollback()
    assert [(f.kind, f.shard) for f in moved.findings] == [("progress_invalid", SHARDS[1])]
    assert "not MACed" in moved.findings[0].detail
    invalid = [f for f in unvouched.findings if f.kind == "progress_invalid"]
    assert [f.shard for f in invalid] == [SHARDS[0]]
    assert "no valid anchor vouches" in invalid[0].detail
    invalid = [f for f in rewritten.findings if f.kind == "progress_invalid"]
    assert [f.shard for f in invalid] == [SHARDS[0]]
    assert "hash it no longer has" in invalid[0].detail
    assert "link_altered" in kinds(rewritten)


async def test_without_a_verify_key_every_run_is_full(chains: Chains) -> None:
    async with chains.pool.acquire() as conn, aws_client("kms") as kms:
        report = await verify_warehouse(
            conn, kms=kms, anchor_key_id=chains.anchor_key, routine=True
        )
        unpinned = await verify_warehouse(
            conn, kms=kms, verify_key_id=chains.verify_key, routine=True
        )
        rows = await conn.fetchval("SELECT count(*) FROM das.verify_progress")
    assert report.clean
    assert report.mode == "full"
    assert not report.progress_recorded
    assert report.full_because is not None
    assert "verify key" in report.full_because
    assert unpinned.mode == "full"
    assert not unpinned.progress_recorded
    assert rows == 0


async def test_events_of_a_shard_without_any_chain_are_found(chains: Chains) -> None:
    async with chains.pool.acquire() as conn:
        # copies of three events, stored under a shard that has no chain
        await conn.execute(
            "CREATE TEMP TABLE copied AS SELECT * FROM das.activity_events "
            "WHERE shard_id = $1 AND sequence_number < $2",
            SHARDS[0],
            10**20 + 3,
        )
        await conn.execute("UPDATE copied SET shard_id = 'shardId-000000000009'")
        await conn.execute("INSERT INTO das.activity_events SELECT * FROM copied")
        report = await chains.verify(conn, routine=True, sample=0)
    unchained = [f for f in report.findings if f.shard == "shardId-000000000009"]
    assert [(f.kind, f.first_sequence, f.last_sequence) for f in unchained] == [
        ("inserted", str(10**20), str(10**20 + 2))
    ]
    assert "3 events of a shard without any chain" in unchained[0].detail


async def test_the_verifier_role_writes_only_the_progress(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, roles=RoleNames())
        privileges = {
            (table, privilege): await conn.fetchval(
                "SELECT has_table_privilege('das_verifier', $1, $2)", table, privilege
            )
            for table in ("das.verify_progress", "das.activity_events", "das.chain_links")
            for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE")
        }
        ingest_writes = await conn.fetchval(
            "SELECT has_table_privilege('das_ingest', 'das.verify_progress', 'INSERT')"
        )
    finally:
        await conn.close()
    assert {k for k, granted in privileges.items() if granted} == {
        ("das.verify_progress", "SELECT"),
        ("das.verify_progress", "INSERT"),
        ("das.verify_progress", "UPDATE"),
        ("das.verify_progress", "DELETE"),
        ("das.activity_events", "SELECT"),
        ("das.chain_links", "SELECT"),
    }
    assert not ingest_writes


async def test_the_cli_runs_routine_after_a_recorded_run_and_full_on_request(
    chains: Chains, aws_env: dict[str, str]
) -> None:
    env = {"DAS_DSN": chains.dsn, "DAS_ANCHOR_KEY_ID": chains.anchor_key}
    flags = ("--verify-key-id", chains.verify_key, "--sample", "1")
    first = await das_ingest("verify", *flags, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "progress recorded" in first.stdout
    second = await das_ingest("verify", *flags, "--seed", "3", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "routine run: 2 chains from their recorded progress" in second.stdout
    assert "(seed 3)" in second.stdout
    full = await das_ingest("verify", *flags, "--full", env=env)
    assert full.returncode == 0, full.stdout + full.stderr
    assert "routine run" not in full.stdout
    bad = await das_ingest("verify", "--sample", "-1", env=env)
    assert bad.returncode == 2
    assert "--sample" in bad.stderr


async def test_only_the_verifier_role_records_progress(chains: Chains) -> None:
    suffix = secrets.token_hex(4)
    await chains.pool.execute(f"CREATE ROLE analyst_{suffix} LOGIN IN ROLE das_analyst")
    await chains.pool.execute(f"CREATE ROLE verifier_{suffix} LOGIN IN ROLE das_verifier")
    reports = {}
    for role in ("analyst", "verifier"):
        conn = await asyncpg.connect(
            chains.dsn.replace("postgresql://postgres@", f"postgresql://{role}_{suffix}@")
        )
        try:
            reports[role] = await chains.verify(conn)
        finally:
            await conn.close()
    assert reports["analyst"].clean, reports["analyst"].findings
    assert reports["analyst"].progress_recorded == []
    assert "das_verifier" in (reports["analyst"].progress_error or "")
    assert reports["verifier"].clean, reports["verifier"].findings
    assert reports["verifier"].progress_error is None
    assert len(reports["verifier"].progress_recorded) == 2
