"""Security: least privilege through the ingester itself."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.fleet import (
    Fleet,
    assert_exactly_once,
    committed_events,
    expected,
    migrated,
    options,
    produce,
    stored,
)

pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    running = Fleet()
    try:
        yield running
    finally:
        await running.close()


def new_stream() -> str:
    return f"aws-rds-das-cluster-{secrets.token_hex(6).upper()}"


async def login_role(dsn: str, group: str, password: str) -> str:
    """A login user in ``group`` with a password; its DSN (the password in the URL)."""
    user = f"u_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}' IN ROLE {group}")
    finally:
        await admin.close()
    with_user = dsn.replace("postgresql://postgres@", f"postgresql://{user}:{password}@")
    assert with_user != dsn
    return with_user


# -- least privilege, through the ingester ------------------------------------------------------


async def test_a_worker_logged_in_as_the_ingest_role_ingests_but_cannot_rewrite(
    fleet: Fleet, pg_dsn: str
) -> None:
    await migrated(pg_dsn)
    ingest_dsn = await login_role(pg_dsn, "das_ingest", secrets.token_hex(8))
    stream = new_stream()
    opts = options(stream, count=800, shards=2, instances=2)
    await produce(opts)
    # Records under another cluster's data keys: the worker must be able to dead-letter them.
    foreign = options(
        stream, count=100, seed=9, shards=2, instances=2, create_stream=False, resource_id="x-1"
    )
    foreign_report = await produce(foreign)
    worker = await fleet.start(
        "least", stream, ingest_dsn, "--processes", "0", "--stop-when-idle", "1.5"
    )
    assert await worker.wait(90) == 0
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    owner = await asyncpg.connect(pg_dsn)
    try:
        letters = await owner.fetchval("SELECT count(*) FROM das.dead_letters WHERE stage = 'kms'")
    finally:
        await owner.close()
    assert letters == foreign_report.records
    same_login = await asyncpg.connect(ingest_dsn)
    try:
        for statement in (
            "UPDATE das.activity_events SET command_text = 'rewritten'",
            "UPDATE das.activity_events SET db_user_name = 'nobody' WHERE event_index = 0",
            "DELETE FROM das.activity_events",
            "DELETE FROM das.activity_events WHERE event_index = 0",
            "TRUNCATE das.activity_events",
            "DELETE FROM das.dead_letters",
            "ALTER TABLE das.activity_events DISABLE TRIGGER ALL",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await same_login.execute(statement)
        # It can see that it wrote them, but not change them.
        assert await same_login.fetchval("SELECT current_user") != "postgres"
    finally:
        await same_login.close()
    assert await committed_events(pg_dsn) == opts.count
