"""--stop-when-idle N: the worker exits within N + 1 seconds of its last commit, whatever its
lease period (idleness is watched continuously, not once per coordinator cycle)."""

from __future__ import annotations

import time

import asyncpg
import pytest

from tests.fleet import Fleet, migrated, new_stream, options, produce

pytestmark = pytest.mark.usefixtures("aws_env")


async def test_stop_when_idle_exits_within_n_plus_one_seconds_of_the_last_commit(
    fleet: Fleet, pg_dsn: str
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    report = await produce(options(stream, count=600, engine="both"))
    # The default lease period (its coordinator cycle is a third of it): only the idle watch
    # decides when to stop.
    worker = await fleet.start_args(
        "run", "--stream", stream, "--dsn", pg_dsn, "--worker-id", "idle",
        "--processes", "1", "--stop-when-idle", "2",
    )  # fmt: skip
    assert await worker.wait(120) == 0
    exited = time.time()
    summary = worker.stopped_summary()
    assert summary["reason"] == "idle"
    assert summary["events"] == report.events
    conn = await asyncpg.connect(pg_dsn)
    try:
        # The last link is written in the last commit's transaction, after its COPY.
        last_commit = await conn.fetchval(
            "SELECT extract(epoch FROM max(created_at)) FROM das.chain_links"
        )
    finally:
        await conn.close()
    after = exited - float(last_commit)
    steps = [
        (line["msg"], line["ts"])
        for line in worker.logged("stop requested") + worker.logged("worker stopped")
    ]
    assert 2.0 <= after <= 3.0, f"exited {after:.2f} s after the last commit ({steps})"
