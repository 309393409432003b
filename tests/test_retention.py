"""Retention's counts in das.retention_log: exact per stream and day (what verify and the
archive check hold them to), including an event that arrives while the day is being removed."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import asyncpg
import orjson

from ingest.warehouse.retention import apply_retention
from tests.warehouse_helpers import batch, hold_lease, inner, migrated_pool, store

DAY1, DAY2 = date(2024, 3, 1), date(2024, 3, 2)
STREAM_A, STREAM_B = "aws-rds-das-cluster-A", "aws-rds-das-cluster-B"
#: events per (stream, day); the default partition gets one more of stream A (year 2001)
HELD = {(STREAM_A, DAY1): 3, (STREAM_B, DAY1): 2, (STREAM_A, DAY2): 1, (STREAM_B, DAY2): 4}
#: well after every day above: retention with a keep of a day may remove all of them
NOW = datetime(2024, 3, 10, tzinfo=UTC)


def _at(day: date, n: int) -> str:
    return datetime(day.year, day.month, day.day, 1 + n, tzinfo=UTC).isoformat()


async def _fill(pool: asyncpg.Pool) -> None:
    """The events of HELD, one record per stream and day in sequence order, from two streams
    whose shard ids are the same (only the stream tells their rows apart). The days have their
    partitions (a warehouse ingesting then created them); the 2001 event lands in the default."""
    for day in (DAY1, DAY2):
        await pool.execute("SELECT das.ensure_partition($1)", day)
    for stream in (STREAM_A, STREAM_B):
        token, _ = await hold_lease(pool, "shardId-0", "w", stream=stream)
        records: list[tuple[str, bytes]] = []
        for day in (DAY1, DAY2):
            events = [
                {"type": "record", "command": "QUERY", "logTime": _at(day, n)}
                for n in range(HELD[stream, day])
            ]
            records.append((str(len(records) + 1), inner(*events)))
        if stream == STREAM_A:
            old = {"type": "record", "command": "OLD", "logTime": "2001-01-01 00:00:00+00"}
            records.append((str(len(records) + 1), inner(old)))
        output = batch("shardId-0", records, stream=stream)
        await store(pool, token, output, "TRIM_HORIZON", str(len(records)))


async def _archived(pool: asyncpg.Pool, rows: dict[tuple[str, date], int]) -> None:
    """das.archived_days as `das-ingest archive` writes them, with these row counts."""
    for (stream, day), n in rows.items():
        await pool.execute(
            "INSERT INTO das.archived_days (stream_name, day, manifest, manifest_sha256, rows, "
            "files, verified_at) VALUES ($1, $2, $3, $4, $5, 1, now())",
            stream, day, f"s3://b/{stream}/{day}/_manifest.json", "0" * 64, n,
        )  # fmt: skip


async def test_logged_counts_are_exact_per_stream_and_day(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    try:
        await _fill(pool)
        # One stream's archive of the second day is one event short: only the first day goes.
        await _archived(pool, {**HELD, (STREAM_B, DAY2): 3, (STREAM_A, date(2001, 1, 1)): 1})
        async with pool.acquire() as conn:
            first = await apply_retention(conn, timedelta(days=1), now=NOW, require_archive=True)
        assert [(a.partition, a.rows, a.refused is not None) for a in first] == [
            ("activity_events_p20240301", 5, False),
            ("activity_events_default", 1, False),
            ("activity_events_p20240302", 5, True),
        ]
        assert first[2].refused is not None
        assert f"{STREAM_B} {DAY2} has 4 events but its verified archive has 3" in (
            first[2].refused
        )
        await pool.execute(
            "UPDATE das.archived_days SET rows = 4 WHERE stream_name = $1 AND day = $2",
            STREAM_B,
            DAY2,
        )
        async with pool.acquire() as conn:
            second = await apply_retention(conn, timedelta(days=1), now=NOW, require_archive=True)
        assert [(a.partition, a.rows, a.refused) for a in second] == [
            ("activity_events_p20240302", 5, None)
        ]
        logged = await pool.fetch(
            "SELECT partition_name, rows_removed, archive::text AS archive "
            "FROM das.retention_log ORDER BY id"
        )
        per_stream = {
            (r["partition_name"], entry["stream"], entry["day"]): entry["rows"]
            for r in logged
            for entry in orjson.loads(r["archive"])
        }
        assert per_stream == {
            ("activity_events_p20240301", STREAM_A, "2024-03-01"): 3,
            ("activity_events_p20240301", STREAM_B, "2024-03-01"): 2,
            ("activity_events_default", STREAM_A, "2001-01-01"): 1,
            ("activity_events_p20240302", STREAM_A, "2024-03-02"): 1,
            ("activity_events_p20240302", STREAM_B, "2024-03-02"): 4,
        }
        assert [(r["partition_name"], r["rows_removed"]) for r in logged] == [
            ("activity_events_p20240301", 5),
            ("activity_events_default", 1),
            ("activity_events_p20240302", 5),
        ]
        assert await pool.fetchval("SELECT count(*) FROM das.activity_events") == 0
    finally:
        await pool.close()


async def test_an_event_arriving_during_retention_is_counted(pg_dsn: str) -> None:
    """A late event of the day, written by a transaction open while retention runs: the logged
    count is what the drop removed (counting before the day is locked would miss it)."""
    pool = await migrated_pool(pg_dsn)
    writer = await asyncpg.connect(pg_dsn)
    try:
        await _fill(pool)
        writing = writer.transaction()
        await writing.start()
        await writer.execute(
            "INSERT INTO das.activity_events (record_version, stream_name, shard_id, "
            "sequence_number, event_index, log_time) VALUES ('1.2', $1, 'shardId-0', 99, 0, $2)",
            STREAM_A,
            datetime(2024, 3, 1, 12, tzinfo=UTC),
        )
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            retention = asyncio.create_task(apply_retention(conn, timedelta(days=1), now=NOW))
            for _ in range(500):  # until retention waits for the writer's lock
                waiting = await pool.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            assert waiting, "retention did not wait for the open write"
            await writing.commit()
            actions = await retention
        assert [(a.partition, a.rows) for a in actions] == [
            ("activity_events_p20240301", 6),
            ("activity_events_p20240302", 5),
            ("activity_events_default", 1),
        ]
        logged = await pool.fetch(
            "SELECT partition_name, rows_removed FROM das.retention_log ORDER BY id"
        )
        assert [(r["partition_name"], r["rows_removed"]) for r in logged] == [
            ("activity_events_p20240301", 6),
            ("activity_events_p20240302", 5),
            ("activity_events_default", 1),
        ]
    finally:
        await writer.close()
        await pool.close()
