"""The warehouse administration commands through the real command line: `dead-letters retry`,
`retention` and `migrate` (where its DSN comes from)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import asyncpg

from ingest.aws import aws_client
from ingest.kms import encryption_context
from ingest.warehouse.migrate import load_migrations
from ingest.warehouse.sink import DeadLetter
from tests.cli_helpers import das_ingest
from tests.sealing import outer_record, seal_payload
from tests.warehouse_helpers import batch, dead_lettered, hold_lease, inner, migrated_pool, store

RESOURCE_ID = "cluster-TEST"  # the helpers' stream is aws-rds-das-cluster-TEST


# -- dead-letters retry --id ----------------------------------------------------------------


async def sealed_with_kms(text: str) -> bytes:
    async with aws_client("kms") as kms:
        key_id = (await kms.create_key())["KeyMetadata"]["KeyId"]
        made = await kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=encryption_context(RESOURCE_ID)
        )
    doc = inner({"type": "record", "command": "SELECT", "commandText": text})
    return outer_record(seal_payload(doc, made["Plaintext"]), made["CiphertextBlob"], "1.1")


async def test_retry_by_id_stores_the_fixed_and_keeps_the_rest(
    pg_dsn: str, aws_env: dict[str, str]
) -> None:
    good = await sealed_with_kms("select 'fixed'")
    pool = await migrated_pool(pg_dsn)
    try:
        ids = await dead_lettered(
            pool,
            "shardId-000000000003",
            [
                DeadLetter("1", "pk", None, "kms", "kms: KMS Decrypt refused: X", good),
                DeadLetter("2", "pk", None, "json", "json: record is not JSON", b"not json"),
                DeadLetter("3", "pk", None, "kms", "kms: KMS Decrypt refused: X", good),
            ],
        )
    finally:
        await pool.close()
    env = {"DAS_DSN": pg_dsn}

    stored = await das_ingest("dead-letters", "retry", "--id", str(ids["1"]), env=env)
    assert stored.returncode == 0, stored.stderr
    assert f"dead letter {ids['1']}: stored" in stored.stdout
    assert "1 re-driven (1 events), 0 failed" in stored.stdout

    again = await das_ingest("dead-letters", "retry", "--id", str(ids["2"]), env=env)
    assert again.returncode == 1
    assert f"dead letter {ids['2']}: failed again: json:" in again.stderr

    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT command_text, sequence_number::text AS seq FROM das.activity_events"
        )
        assert [tuple(r) for r in rows] == [("select 'fixed'", "1")]
        left = await conn.fetch(
            "SELECT sequence_number::text AS seq, attempts FROM das.dead_letters ORDER BY 1"
        )
        assert [tuple(r) for r in left] == [("2", 2), ("3", 1)]  # 3 was not asked for
    finally:
        await conn.close()


async def test_retry_of_an_unknown_id_is_a_clear_error_and_retries_nothing(
    pg_dsn: str, aws_env: dict[str, str]
) -> None:
    good = await sealed_with_kms("select 'untouched'")
    pool = await migrated_pool(pg_dsn)
    try:
        ids = await dead_lettered(
            pool,
            "s",
            [DeadLetter("1", "pk", None, "kms", "kms: refused", good)],
        )
        known = ids["1"]
    finally:
        await pool.close()
    result = await das_ingest(
        "dead-letters", "retry", "--id", str(known), "424242", env={"DAS_DSN": pg_dsn}
    )
    assert result.returncode == 1
    assert "no dead letter with id 424242" in result.stderr
    assert "nothing was retried" in result.stderr
    assert "Traceback" not in result.stderr
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM das.activity_events") == 0
        assert await conn.fetchval("SELECT attempts FROM das.dead_letters") == 1
    finally:
        await conn.close()


# -- retention --------------------------------------------------------------------------------


async def test_retention_keep_90d_through_the_cli_with_a_dry_run_first(pg_dsn: str) -> None:
    now = datetime.now(UTC)
    old_day = (now - timedelta(days=100)).date()
    old = datetime(old_day.year, old_day.month, old_day.day, 6, tzinfo=UTC)
    pool = await migrated_pool(pg_dsn)
    try:
        token, _ = await hold_lease(pool, "s", "w")
        await pool.execute("SELECT das.ensure_partition($1)", old_day)
        output = batch(
            "s",
            [
                ("1", inner({"type": "record", "command": "OLD", "logTime": old.isoformat()})),
                ("2", inner({"type": "record", "command": "NEW", "logTime": now.isoformat()})),
            ],
        )
        await store(pool, token, output, "TRIM_HORIZON", "2")
    finally:
        await pool.close()
    env = {"DAS_DSN": pg_dsn}
    part = f"activity_events_p{old_day:%Y%m%d}"
    # Nothing here is archived: --no-archive drops anyway (tests/test_archive.py covers the
    # default, which refuses).
    dry = await das_ingest("retention", "--keep", "90d", "--dry-run", "--no-archive", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"would drop {part} " in dry.stdout
    assert dry.stdout.rstrip().endswith("1 rows")
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM das.activity_events") == 2
        assert await conn.fetchval("SELECT count(*) FROM das.retention_log") == 0
    finally:
        await conn.close()

    done = await das_ingest("retention", "--keep", "90d", "--no-archive", env=env)
    assert done.returncode == 0, done.stderr
    assert f"dropped {part} " in done.stdout
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT command FROM das.activity_events")
        assert [r["command"] for r in rows] == ["NEW"]
        assert await conn.fetchval("SELECT to_regclass($1)", f"das.{part}") is None
        logged = await conn.fetch("SELECT partition_name, rows_removed FROM das.retention_log")
        assert [tuple(r) for r in logged] == [(part, 1)]
    finally:
        await conn.close()

    again = await das_ingest("retention", "--keep", "90d", "--no-archive", env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing older than the retention period" in again.stdout


async def test_retention_refuses_a_period_it_cannot_read(pg_dsn: str) -> None:
    result = await das_ingest("retention", "--keep", "90", env={"DAS_DSN": pg_dsn})
    assert result.returncode == 2
    assert "das-ingest retention: error: retention '90'" in result.stderr
    assert "Traceback" not in result.stderr


# -- migrate: where the DSN comes from --------------------------------------------------------


async def schema_version_of(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('das.schema_migrations') IS NOT NULL")
        if not exists:
            return 0
        return int(await conn.fetchval("SELECT max(version) FROM das.schema_migrations"))
    finally:
        await conn.close()


async def test_migrate_takes_the_dsn_from_das_dsn(pg_dsn: str) -> None:
    latest = load_migrations()[-1].version
    assert await schema_version_of(pg_dsn) == 0
    result = await das_ingest("migrate", env={"DAS_DSN": pg_dsn})
    assert result.returncode == 0, result.stderr
    assert f"warehouse at schema version {latest}" in result.stdout
    assert await schema_version_of(pg_dsn) == latest


async def test_migrate_takes_the_connection_from_pg_variables(pg_dsn: str) -> None:
    latest = load_migrations()[-1].version
    parts = urlsplit(pg_dsn)
    assert parts.hostname is not None
    assert parts.port is not None
    assert parts.username is not None
    env = {
        "DAS_DSN": "",  # unset: libpq's variables decide
        "PGHOST": parts.hostname,
        "PGPORT": str(parts.port),
        "PGUSER": parts.username,
        "PGDATABASE": parts.path.lstrip("/"),
    }
    check = await das_ingest("migrate", "--check", env=env)
    assert check.returncode == 1  # pending: the database is empty
    assert f"schema version 0, latest {latest} ((PG* environment))" in check.stdout
    result = await das_ingest("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert await schema_version_of(pg_dsn) == latest
