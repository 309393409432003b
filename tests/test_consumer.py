"""The ingester end to end on the local stack: workers started with the real command line share
a stream, survive SIGKILL and resharding, resume from checkpoints, and store every event exactly
once. Each event is counted by the emulator's unique key."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
import boto3
import pytest

from tests.cli_helpers import das_ingest
from tests.fleet import (
    Fleet,
    WorkerProcess,
    assert_exactly_once,
    assert_order_per_instance,
    committed_events,
    default_worker_id,
    expected,
    lease_owners,
    migrated,
    new_stream,
    options,
    produce,
    stored,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("aws_env")


async def test_one_worker_ingests_a_stream_exactly_once(fleet: Fleet, pg_dsn: str) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    opts = options(stream, count=1500, engine="both")
    report = await produce(opts)
    worker = await fleet.start("solo", stream, pg_dsn, "--processes", "1", "--stop-when-idle", "2")
    assert await worker.wait(120) == 0
    got = await stored(pg_dsn)
    assert_exactly_once(got, expected(opts))
    assert_order_per_instance(got, expected(opts))
    summary = worker.stopped_summary()
    assert summary["reason"] == "idle"
    assert summary["events"] == report.events == 1500
    assert summary["records"] == report.records
    # KMS: one Decrypt per distinct data key, however many records share it.
    assert summary["kms_calls"] == report.data_keys
    assert summary["kms_hits"] == report.records - report.data_keys
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM das.dead_letters") == 0
        leases = await conn.fetch("SELECT owner, checkpoint FROM das.leases")
        assert len(leases) == 4
        assert all(r["owner"] is None for r in leases)  # released on the way out
        assert all(r["checkpoint"].isdigit() for r in leases)
        heartbeats = await conn.fetchval("SELECT count(*) FROM das.heartbeats")
        assert heartbeats == opts.instances
        # Today's partition and the next two days' were created ahead.
        today = datetime.now(UTC).date()
        for day in (today, today + timedelta(days=1), today + timedelta(days=2)):
            assert await conn.fetchval(
                "SELECT to_regclass($1)", f"das.activity_events_p{day:%Y%m%d}"
            )
        # Every complete MySQL statement found its AUX events (the traffic is MySQL on odd
        # instances); MAIN-only statements are those without objects.
        orphans = await conn.fetchval("SELECT count(*) FROM das.statements WHERE NOT has_main")
        assert orphans <= 3  # at most the statements cut off by --count at the end
    finally:
        await conn.close()
    status = await das_ingest("status", "--dsn", pg_dsn, "--stream", stream, "--json")
    assert status.returncode == 0, status.stderr
    assert '"events": 1500' in status.stdout


def assert_leases_accounted(workers: list[WorkerProcess]) -> dict[str, int]:
    """Every lease a worker got (taken or stolen) it lost or released, each change counted
    once (a lease lost at renewal whose batch then failed its commit is one loss); and what
    one worker stole, another lost. The fleet's totals by kind."""
    totals: Counter[str] = Counter()
    for worker in workers:
        changes = Counter(worker.stopped_summary()["lease_changes"])
        assert changes["crashed"] == 0, worker.name
        got = changes["taken"] + changes["stolen"]
        assert got == changes["lost"] + changes["released"], (worker.name, changes)
        assert changes["finished"] <= changes["released"], (worker.name, changes)
        totals += changes
    assert totals["lost"] == totals["stolen"], totals
    return dict(totals)


@pytest.mark.parametrize("workers", [2, 3])
async def test_workers_started_with_the_same_command_share_a_stream_evenly(
    fleet: Fleet, pg_dsn: str, workers: int
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    first = options(stream, count=200, rate=0)
    await produce(first)  # the stream exists before the workers start
    # The exact same command for every worker: no --worker-id, so each is host:pid. Decoding in
    # a pool process keeps the main loop (lease renewal) responsive on a loaded machine: with
    # --processes 0 a renewal could wait behind decoding for longer than --lease-seconds 3, and
    # a lease that expires changes hands without a steal.
    command = (
        "run", "--stream", stream, "--dsn", pg_dsn, "--lease-seconds", "3",
        "--shard-sync-seconds", "2", "--shutdown-deadline", "10", "--processes", "1",
        "--stop-when-idle", "3",
    )  # fmt: skip
    # The traffic must outlast the balancing and the stability check below: once it ends, the
    # workers stop when idle and release their leases (a legitimate change of owners). On a
    # loaded machine (load ~10 on 2 CPUs) a worker process took up to 18 s to start and the
    # fleet settled up to 38 s after the traffic began; 24000 events take 48 s or more.
    more = options(stream, count=24000, seed=8, create_stream=False, rate=500)
    producing = asyncio.ensure_future(produce(more))
    fleet_: dict[str, WorkerProcess] = {}

    async def balanced() -> bool:
        """Every open shard held by one of the workers, each worker within one of the others."""
        owners = await lease_owners(pg_dsn, stream)
        if len(owners) != 4 or any(owner not in fleet_ for owner, _ in owners.values()):
            return False
        held = Counter(owner for owner, _ in owners.values())
        counts = [held[worker_id] for worker_id in fleet_]
        return min(counts) >= 1 and max(counts) - min(counts) <= 1

    try:
        for _ in range(workers - 1):
            worker = await fleet.start_args(*command)
            fleet_[default_worker_id(worker)] = worker
        await wait_until(balanced, deadline=60)
        joiner = await fleet.start_args(*command)
        fleet_[default_worker_id(joiner)] = joiner
        await wait_until(balanced, deadline=60)
        settled = await lease_owners(pg_dsn, stream)
        await asyncio.sleep(2.0)  # two coordinator cycles: it stays as it settled
        assert await lease_owners(pg_dsn, stream) == settled
        await producing
    finally:
        if not producing.done():
            producing.cancel()
    codes = await asyncio.gather(*(w.wait(180) for w in fleet_.values()))
    assert codes == [0] * workers
    assert_exactly_once(await stored(pg_dsn), expected(first) + expected(more))
    assert len({w.stopped_summary()["reason"] for w in fleet_.values()}) == 1  # all idle
    # The newcomer found no free lease and stole its share from the most loaded.
    assert joiner.logged("stole lease"), "the joining worker never stole a lease"
    held = Counter(owner for owner, _ in settled.values())
    assert sorted(held.values()) == ([2, 2] if workers == 2 else [1, 1, 2])
    totals = assert_leases_accounted(list(fleet_.values()))
    assert totals["stolen"] >= 1


async def test_a_killed_worker_loses_nothing_and_duplicates_nothing(
    fleet: Fleet, pg_dsn: str
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    first = options(stream, count=200)
    await produce(first)
    victim = await fleet.start("victim", stream, pg_dsn, "--processes", "1")
    survivor = await fleet.start("survivor", stream, pg_dsn, "--processes", "1")
    producing = asyncio.ensure_future(
        produce(options(stream, count=3000, seed=9, create_stream=False, rate=600))
    )
    # Kill the victim while it is busy: once it has committed some of the new traffic.
    await wait_until(lambda: _has_committed(pg_dsn, 1200), deadline=90)
    victim.kill()
    await victim.wait(10)
    await producing
    # The survivor takes over the victim's shards within a lease period and finishes.
    await wait_until(lambda: _has_committed(pg_dsn, 3200), deadline=120)
    survivor.terminate()
    assert await survivor.wait(30) == 0
    more = options(stream, count=3000, seed=9, create_stream=False, rate=600)
    assert_exactly_once(await stored(pg_dsn), expected(first) + expected(more))
    taken = {entry["shard"] for entry in survivor.logged("consuming shard")}
    assert len(taken) == 4  # it ended up with every shard, the victim's included


async def _has_committed(dsn: str, count: int) -> bool:
    return await committed_events(dsn) >= count


async def test_restart_resumes_from_the_checkpoints(fleet: Fleet, pg_dsn: str) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    first = options(stream, count=600, shards=2, instances=2)
    await produce(first)
    run1 = await fleet.start("a", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "1.5")
    assert await run1.wait(90) == 0
    second = options(stream, count=400, seed=11, create_stream=False, shards=2, instances=2)
    report = await produce(second)
    run2 = await fleet.start("a", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "1.5")
    assert await run2.wait(90) == 0
    assert_exactly_once(await stored(pg_dsn), expected(first) + expected(second))
    # The second run read only what was new.
    assert run2.stopped_summary()["records"] == report.records


async def test_sigterm_drains_commits_and_releases(fleet: Fleet, pg_dsn: str) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    first = options(stream, count=3000, shards=2, instances=2)
    await produce(first)
    worker = await fleet.start("t", stream, pg_dsn, "--processes", "1")
    await wait_until(lambda: _has_committed(pg_dsn, 1), deadline=60)
    worker.terminate()
    assert await worker.wait(30) == 0
    summary = worker.stopped_summary()
    assert summary["reason"] == "SIGTERM"
    assert summary["lease_changes"] == {"taken": 2, "released": 2}  # the graceful releases
    conn = await asyncpg.connect(pg_dsn)
    try:
        owners = await conn.fetch("SELECT owner FROM das.leases")
        assert [r["owner"] for r in owners] == [None, None]
        assert await conn.fetchval("SELECT count(*) FROM das.workers") == 0
    finally:
        await conn.close()
    again = await fleet.start("t2", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "1.5")
    assert await again.wait(90) == 0
    assert_exactly_once(await stored(pg_dsn), expected(first))


async def test_latest_is_pinned_so_a_restart_skips_nothing(fleet: Fleet, pg_dsn: str) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    before = options(stream, count=200, shards=2, instances=2)
    await produce(before)
    first = await fleet.start(
        "l1", stream, pg_dsn, "--processes", "0", "--initial-position", "latest"
    )
    await wait_until(lambda: _leases(pg_dsn, 2), deadline=30)
    # (kinesalite answers an AT_TIMESTAMP iterator request only once a record lies after the
    # timestamp, so this worker waits there; SIGTERM stops it all the same.)
    first.terminate()
    assert await first.wait(30) == 0
    assert await stored(pg_dsn) == []  # nothing from before it started
    # Written while no worker runs: a LATEST taken again at restart would skip it.
    after = options(stream, count=300, seed=31, create_stream=False, shards=2, instances=2)
    await produce(after)
    second = await fleet.start(
        "l2",
        stream,
        pg_dsn,
        "--processes",
        "0",
        "--stop-when-idle",
        "1",
        "--initial-position",
        "latest",
    )
    assert await second.wait(60) == 0
    assert_exactly_once(await stored(pg_dsn), expected(after))


async def _leases(dsn: str, n: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT checkpoint FROM das.leases")
    finally:
        await conn.close()
    return len(rows) == n and all(r["checkpoint"].startswith("AT_TIMESTAMP:") for r in rows)


async def test_at_timestamp_starts_where_asked(fleet: Fleet, pg_dsn: str) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    await produce(options(stream, count=200, shards=2, instances=2))
    await asyncio.sleep(1.1)  # Kinesis arrival times have millisecond resolution
    since = datetime.now(UTC)
    await asyncio.sleep(0.1)
    later = options(stream, count=300, seed=32, create_stream=False, shards=2, instances=2)
    await produce(later)
    worker = await fleet.start(
        "ts",
        stream,
        pg_dsn,
        "--processes",
        "0",
        "--stop-when-idle",
        "1",
        "--initial-position",
        f"at_timestamp:{since.isoformat()}",
    )
    assert await worker.wait(60) == 0
    assert_exactly_once(await stored(pg_dsn), expected(later))


async def test_a_bad_initial_position_is_a_usage_error() -> None:
    result = await das_ingest("run", "--stream", "s", "--initial-position", "yesterday")
    assert result.returncode != 0
    assert "--initial-position must be trim_horizon, latest or at_timestamp" in result.stderr


async def test_stop_when_idle_waits_for_shards_held_by_a_dead_worker(
    fleet: Fleet, pg_dsn: str
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    opts = options(stream, count=300, shards=2, instances=2)
    await produce(opts)
    # A worker that died a moment ago still holds shard 1 for 4 more seconds.
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            "INSERT INTO das.leases (stream_name, shard_id, owner, lease_counter, expires_at) "
            "VALUES ($1, 'shardId-000000000001', 'ghost', 1, now() + interval '4 seconds')",
            stream,
        )
    finally:
        await conn.close()
    started = time.monotonic()
    worker = await fleet.start("heir", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "1")
    assert await worker.wait(90) == 0
    assert time.monotonic() - started >= 4  # it did not leave while the ghost's lease lived
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    taken = {entry["shard"] for entry in worker.logged("consuming shard")}
    assert taken == {"shardId-000000000000", "shardId-000000000001"}


async def test_split_and_merge_while_producing_keeps_order_per_partition_key(
    fleet: Fleet, pg_dsn: str, aws_env: dict[str, str]
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    first = options(stream, count=500, shards=2, instances=4)
    await produce(first)
    readers = [
        await fleet.start(f"r{i}", stream, pg_dsn, "--processes", "0", "--stop-when-idle", "3")
        for i in range(2)
    ]
    kinesis = boto3.client("kinesis", endpoint_url=aws_env["AWS_ENDPOINT_URL_KINESIS"])
    second = options(
        stream, count=1500, seed=21, create_stream=False, shards=2, instances=4, rate=700
    )
    producing = asyncio.ensure_future(produce(second))
    await asyncio.sleep(0.7)
    await asyncio.to_thread(
        kinesis.split_shard,
        StreamName=stream,
        ShardToSplit="shardId-000000000000",
        NewStartingHashKey=str(2**126),
    )
    await _wait_active(kinesis, stream)
    await asyncio.sleep(0.7)
    await asyncio.to_thread(
        kinesis.merge_shards,
        StreamName=stream,
        ShardToMerge="shardId-000000000002",  # the children of the split are 2 and 3
        AdjacentShardToMerge="shardId-000000000003",
    )
    await _wait_active(kinesis, stream)
    await producing
    third = options(stream, count=500, seed=22, create_stream=False, shards=2, instances=4)
    await produce(third)
    codes = await asyncio.gather(*(w.wait(180) for w in readers))
    assert codes == [0, 0]
    want = expected(first) + expected(second) + expected(third)
    got = await stored(pg_dsn)
    assert_exactly_once(got, want)
    assert_order_per_instance(got, want)
    conn = await asyncpg.connect(pg_dsn)
    try:
        leases = {r["shard_id"]: r for r in await conn.fetch("SELECT * FROM das.leases")}
    finally:
        await conn.close()
    assert set(leases) == {f"shardId-00000000000{i}" for i in range(5)}
    for closed in ("shardId-000000000000", "shardId-000000000002", "shardId-000000000003"):
        assert leases[closed]["checkpoint"] == "SHARD_END"
    # Each shard that ended was counted finished, and its lease released, once.
    totals = assert_leases_accounted(readers)
    assert totals["finished"] == 3, totals
    assert sorted(leases["shardId-000000000004"]["parent_shard_ids"]) == [
        "shardId-000000000002",
        "shardId-000000000003",
    ]


async def _wait_active(kinesis: object, stream: str) -> None:
    async def active() -> bool:
        summary = await asyncio.to_thread(kinesis.describe_stream_summary, StreamName=stream)  # type: ignore[attr-defined]
        return bool(summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")

    await wait_until(active, deadline=30, interval=0.05)
