"""Dead letters are kept whole, listed, and re-driven through real KMS after a fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ingest.aws import aws_client
from ingest.consumer.redrive import redrive
from ingest.decode.batch import DecoderConfig
from ingest.kms import DataKeyCache, encryption_context
from ingest.warehouse.deadletters import list_dead_letters
from ingest.warehouse.sink import DeadLetter
from tests.cli_helpers import das_ingest
from tests.sealing import outer_record, seal_payload
from tests.warehouse_helpers import dead_lettered, inner, migrated_pool

RESOURCE_ID = "cluster-TEST"  # the helpers' stream is aws-rds-das-cluster-TEST


async def test_redrive_stores_the_fixed_and_keeps_the_broken(
    pg_dsn: str, aws_env: dict[str, str]
) -> None:
    async with aws_client("kms") as kms:
        key_id = (await kms.create_key())["KeyMetadata"]["KeyId"]
        data_key = await kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=encryption_context(RESOURCE_ID)
        )
    good = outer_record(
        seal_payload(
            inner({"type": "record", "command": "SELECT", "commandText": "select 42"}),
            data_key["Plaintext"],
        ),
        data_key["CiphertextBlob"],
        "1.1",
    )
    pool = await migrated_pool(pg_dsn)
    try:
        ids = await dead_lettered(
            pool,
            "shardId-000000000007",
            [
                DeadLetter(
                    "1", "pk", None, "kms", "kms: KMS Decrypt refused: AccessDeniedException", good
                ),
                DeadLetter("2", "pk", None, "json", "json: record is not JSON", b"not json"),
            ],
        )
        async with pool.acquire() as conn:
            listed = await list_dead_letters(conn)
            assert [(d.sequence_number, d.stage, d.attempts) for d in listed] == [
                ("1", "kms", 1),
                ("2", "json", 1),
            ]
            assert [d.id for d in listed] == [ids["1"], ids["2"]]
            assert await list_dead_letters(conn, stage="json") == listed[1:]
            async with aws_client("kms") as kms:
                report = await redrive(conn, None, DataKeyCache(kms), decoder=DecoderConfig("esdk"))
        assert report.stored == [listed[0].id]
        assert list(report.failed) == [listed[1].id]
        assert report.events == 1
        rows = await pool.fetch(
            "SELECT command_text, shard_id, sequence_number FROM das.activity_events"
        )
        assert [(r["command_text"], r["shard_id"], r["sequence_number"]) for r in rows] == [
            ("select 42", "shardId-000000000007", 1)
        ]
        left = await pool.fetch("SELECT sequence_number, stage, attempts FROM das.dead_letters")
        assert [tuple(r) for r in left] == [(2, "json", 2)]
    finally:
        await pool.close()


async def test_cli_lists_dead_letters_as_json(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        letter = DeadLetter("9", None, None, "decrypt", "decrypt: bad tag", os.urandom(64))
        ids = await dead_lettered(pool, "s", [letter])
    finally:
        await pool.close()
    env = {"DAS_DSN": pg_dsn}
    out = await das_ingest("dead-letters", "list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["sequence_number"], r["stage"], r["size"]) for r in rows] == [("9", "decrypt", 64)]
    assert [r["id"] for r in rows] == [ids["9"]]
    table = await das_ingest("dead-letters", "list", env=env)
    assert "decrypt: bad tag" in table.stdout


def test_retry_needs_an_explicit_selection() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ingest", "dead-letters", "retry"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "one of the arguments --id --stage --all is required" in result.stderr


async def test_a_missing_privilege_is_a_one_line_error(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        await pool.execute("CREATE ROLE only_ingest LOGIN IN ROLE das_ingest")
    finally:
        await pool.close()
    dsn = pg_dsn.replace("postgresql://postgres@", "postgresql://only_ingest@")
    result = await das_ingest("status", "--dsn", dsn, "--no-lag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "permission denied in the warehouse" in result.stderr


async def test_a_redrive_applies_the_policy_rules(pg_dsn: str, aws_env: dict[str, str]) -> None:
    """Re-driven events get what run's rules do: redaction before storage, drops counted in
    the redrive link, alerts."""
    from ingest.policy.rules import load_rules

    rules_text = (
        "rules:\n"
        "  - {name: pii, where: {database: hr}, action: redact}\n"
        "  - {name: noise, where: {user: rdsadmin}, action: drop}\n"
    )
    async with aws_client("kms") as kms:
        key_id = (await kms.create_key())["KeyMetadata"]["KeyId"]
        data_key = await kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=encryption_context(RESOURCE_ID)
        )
    events = [
        {"type": "record", "command": "SELECT", "databaseName": "hr", "dbUserName": "alice",
         "commandText": "SELECT * FROM people WHERE ssn = '123-45-6789'",
         "logTime": "2026-11-25 12:00:00+00"},
        {"type": "record", "command": "SELECT", "dbUserName": "rdsadmin", "commandText": "select 1",
         "logTime": "2026-11-25 12:00:01+00"},
        {"type": "record", "command": "GRANT", "dbUserName": "eve", "exitCode": "00000",
         "commandText": "GRANT ALL ON payroll TO eve", "logTime": "2026-11-25 12:00:02+00"},
    ]  # fmt: skip
    raw = outer_record(
        seal_payload(inner(*events), data_key["Plaintext"]), data_key["CiphertextBlob"], "1.1"
    )
    pool = await migrated_pool(pg_dsn)
    try:
        await dead_lettered(
            pool, "shardId-000000000007", [DeadLetter("1", "pk", None, "kms", "kms: x", raw)]
        )
        async with pool.acquire() as conn, aws_client("kms") as kms:
            report = await redrive(
                conn,
                None,
                DataKeyCache(kms),
                decoder=DecoderConfig("esdk", rules=rules_text),
                rules=load_rules(rules_text),
            )
        assert report.events == 2
        texts = [r[0] for r in await pool.fetch("SELECT command_text FROM das.activity_events")]
        assert sorted(texts) == [
            "GRANT ALL ON payroll TO eve",
            "SELECT * FROM people WHERE ssn = ?",
        ]
        link = await pool.fetchrow(
            "SELECT kind, dropped::text AS dropped FROM das.chain_links ORDER BY link_no DESC"
        )
        assert link is not None
        assert (link["kind"], json.loads(link["dropped"])) == ("redrive", {"noise": 1})
        alerts = await pool.fetch("SELECT rule, group_key FROM das.alerts")
        assert [tuple(a) for a in alerts] == [("privilege_change", "user=eve,instance=db-1")]
    finally:
        await pool.close()
