"""`rebuild-statements` beside live ingestion: it runs in short transactions (a worker's merge
during it is not blocked), and run under a live worker it ends with exactly the table an idle
rebuild gives."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

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
    # The stream and its first records exist before the worker starts, and the rest keeps
    # arriving while it runs: a worker started beside a producer that was still setting up
    # could find the new stream empty for --stop-when-idle seconds on a loaded machine and stop
    # before the first record (it did in a full CI run).
    first = options(stream, engine="mysql", shards=2, instances=2, count=400, rate=0)
    await produce(first)
    rest = options(
        stream, engine="mysql", shards=2, instances=2, count=2600, rate=300, seed=8,
        create_stream=False,
    )  # fmt: skip
    total = first.count + rest.count
    producing = asyncio.ensure_future(produce(rest))
    worker = await fleet.start("w1", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "5")

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
    assert before < total, "the rebuild ran while events were still arriving"
    await producing
    assert await worker.wait(180) == 0, worker.output
    assert await committed_events(pg_dsn) == total
    assert during <= total

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


async def test_rebuild_of_one_day_rebuilds_that_day_and_reads_only_its_partitions(
    pg_dsn: str,
) -> None:
    """`rebuild-statements --day D` over five days of the scale bench's fill (MySQL MAIN/AUX
    statements every day): D's statements, some deleted, some altered and one that no event
    backs, are exactly what the incremental merges built again; an altered statement of another
    day stays as it was (not rebuilt); and the days two away from D were not read at all."""
    from bench.fill import Filler

    await migrated(pg_dsn)
    today = datetime.now(UTC).date()
    filler = Filler(pg_dsn, days=5, last_day=today, processes=1)
    try:
        await filler.fill_to(6000, progress=False)
    finally:
        await filler.close()
    day = today - timedelta(days=2)
    since = datetime(day.year, day.month, day.day, tzinfo=UTC)
    until = since + timedelta(days=1)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        built = await statements_table(pool)
        of_day = [r for r in built if r[6] is not None and since <= r[6] < until]
        assert len(of_day) > 20, "the fill stored MySQL statements on the day"
        other = next(r for r in built if r[6] is not None and r[6] < since)
        key = (
            "cluster_id = $1 AND instance_id = $2 AND pid = $3 AND session_id = $4 "
            "AND statement_id = $5"
        )
        await pool.execute(
            "DELETE FROM das.statements WHERE ctid IN (SELECT ctid FROM das.statements "
            "WHERE log_time >= $1 AND log_time < $2 ORDER BY log_time LIMIT 10)",
            since,
            until,
        )
        await pool.execute(
            "UPDATE das.statements SET command_text = 'altered', aux = '[]' WHERE ctid IN "
            "(SELECT ctid FROM das.statements WHERE log_time >= $1 AND log_time < $2 "
            "ORDER BY log_time DESC LIMIT 10)",
            since,
            until,
        )
        await pool.execute(
            "INSERT INTO das.statements (cluster_id, instance_id, pid, session_id, statement_id, "
            "has_main, log_time, command_text, aux) "
            "VALUES ('no-such-cluster', 'i', 1, 1, 1, true, $1, 'no event backs this', '[]')",
            since + timedelta(hours=3),
        )
        await pool.execute(
            f"UPDATE das.statements SET command_text = 'altered elsewhere' WHERE {key}", *other[:5]
        )
        assert await statements_table(pool) != built
        far = [today - timedelta(days=4), today]  # two days away from D on each side
        scans = (
            "SELECT coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0) "
            "FROM pg_stat_user_tables WHERE relname = ANY($1::text[])"
        )
        names = [f"activity_events_p{d:%Y%m%d}" for d in far]
        async with pool.acquire() as conn:
            assert await conn.fetchval(
                "SELECT count(*) FROM pg_class WHERE relname = ANY($1::text[])", names
            ) == len(names)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            before = await conn.fetchval(scans, names)

        rebuilt = await das_ingest(
            "rebuild-statements", "--day", day.isoformat(), env={"DAS_DSN": pg_dsn}
        )
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert f"das.statements rebuilt: {len(of_day)} statements of {day}" in rebuilt.stdout

        after = await statements_table(pool)
        expected = [
            (*r[:13], "altered elsewhere", *r[14:]) if r[:5] == other[:5] else r for r in built
        ]
        assert after == expected
        async with pool.acquire() as conn:
            await asyncio.sleep(0.5)  # the command's backend flushed its counters as it ended
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            assert await conn.fetchval(scans, names) == before
    finally:
        await pool.close()
