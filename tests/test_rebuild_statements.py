"""`rebuild-statements` beside live ingestion: it runs in short transactions (a worker's merge
during it is not blocked), and run under a live worker it ends with exactly the table an idle
rebuild gives."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ingest.warehouse.statements import rebuild_statements
from tests.cli_helpers import das_ingest
from tests.fleet import Fleet, committed_events, migrated, new_stream, options, produce, wait_until
from tests.test_warehouse import statements_table


@pytest.mark.usefixtures("aws_env")
async def test_rebuild_under_a_live_worker_equals_an_idle_rebuild(
    pg_dsn: str, fleet: Fleet
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    opts = options(stream, engine="mysql", shards=2, instances=2, count=3000, rate=300)
    producing = asyncio.ensure_future(produce(opts))
    worker = await fleet.start("w1", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "3")

    async def some() -> bool:
        return await committed_events(pg_dsn) >= 300

    await wait_until(some, 120)
    before = await committed_events(pg_dsn)
    rebuilt = await das_ingest(
        "rebuild-statements", "--batch-events", "40", env={"DAS_DSN": pg_dsn}
    )
    during = await committed_events(pg_dsn)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "das.statements rebuilt:" in rebuilt.stdout
    # Not a terminal: plain progress lines on stderr, the last of each phase says done.
    assert "rebuild-statements: events merged:" in rebuilt.stderr
    assert "(done," in rebuilt.stderr
    assert before < opts.count, "the rebuild ran while events were still arriving"
    await producing
    assert await worker.wait(180) == 0, worker.output
    assert await committed_events(pg_dsn) == opts.count
    assert during <= opts.count

    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        live = await statements_table(pool)
        assert live
        async with pool.acquire() as conn:
            await rebuild_statements(conn)
        assert await statements_table(pool) == live
    finally:
        await pool.close()


async def test_a_workers_merge_is_not_blocked_while_the_rebuild_runs(pg_dsn: str) -> None:
    """The merge a worker's commit runs, tried from another connection while the rebuild is
    between batches, with a lock timeout: it must not wait for the rebuild to finish (it did
    when the rebuild held an EXCLUSIVE lock on das.statements for its whole run)."""
    await migrated(pg_dsn)
    rebuilder = await asyncpg.connect(pg_dsn)
    worker = await asyncpg.connect(pg_dsn)
    merged: list[str] = []
    tried = asyncio.Event()

    async def ingest_merge() -> None:
        async with worker.transaction():
            await worker.execute("SET LOCAL lock_timeout = '2s'")
            merged.append(
                await worker.fetchval("SELECT das.merge_statements('s', 'shard', 0, 1e40)::text")
            )

    def progress(phase: str, done: int, total: int | None) -> None:
        if not tried.is_set():
            tried.set()
            pending.append(asyncio.ensure_future(ingest_merge()))

    pending: list[asyncio.Future[None]] = []
    try:
        await rebuilder.execute(
            "INSERT INTO das.statements (cluster_id, instance_id, pid, session_id, statement_id, "
            "has_main, aux) SELECT 'c', 'i', 1, n, 1, false, '[]' FROM generate_series(1, 20) n"
        )
        await rebuild_statements(rebuilder, batch=5, progress=progress)
        await asyncio.gather(*pending)
        assert merged == ["0"]
    finally:
        await rebuilder.close()
        await worker.close()
