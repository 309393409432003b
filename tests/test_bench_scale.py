"""The scale bench: its fill stores what the decode path stores (verify finds it clean, links and
dead letters included), and its quick mode prints every table with sane numbers."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from bench.fill import Filler
from bench.scale import TYPICAL, parse_size, readme_queries
from ingest.integrity.verify import verify_warehouse
from tests.test_bench import _number, _table, _tables
from tests.test_readme_queries import readme_queries as all_readme_queries
from tests.warehouse_helpers import migrated_pool

ROOT = Path(__file__).resolve().parent.parent


def test_sizes_parse() -> None:
    assert [parse_size(s) for s in ("0", "500k", "5M", "1.5M", "20000")] == [
        0, 500_000, 5_000_000, 1_500_000, 20_000,
    ]  # fmt: skip
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("5G")


def test_every_readme_query_is_measured() -> None:
    measured = readme_queries()
    assert [sql for _, sql in measured] == all_readme_queries()
    assert len({name for name, _ in measured}) == len(measured)


async def test_the_fill_is_what_the_decode_path_stores(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    await pool.close()
    filler = Filler(pg_dsn, days=3, last_day=datetime.now(UTC).date(), processes=1)
    try:
        await filler.fill_to(3000, progress=False)
        await filler.fill_to(6000, progress=False)  # a second step continues the chains
    finally:
        await filler.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        report = await verify_warehouse(conn, kms=None)
        days = await conn.fetchval("SELECT count(DISTINCT log_time::date) FROM das.activity_events")
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'das.activity_events'::regclass"
        )
        stored = await conn.fetchval("SELECT count(*) FROM das.activity_events")
        statements = await conn.fetchval("SELECT count(*) FROM das.statements")
        users = await conn.fetchval("SELECT count(DISTINCT db_user_name) FROM das.activity_events")
        failed = await conn.fetchval("SELECT count(*) FROM das.failed_statements")
        logins = await conn.fetchval("SELECT count(*) FROM das.failed_logins")
    finally:
        await conn.close()
    assert report.clean, report.findings[:5]
    assert report.chains == 4
    assert report.events == stored == filler.stats.events >= 5900
    assert days >= 3
    assert partitions >= 4  # a day partition each (the default partition besides)
    assert statements > 0  # MySQL MAIN/AUX merged per batch, as the sink does
    assert users >= 5
    assert failed > 0
    assert logins > 0
    assert filler.stats.batches == report.links


@pytest.mark.slow
def test_quick_scale_bench_prints_every_table() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DAS_"))}
    started = time.monotonic()
    # Kept where the cluster's unprivileged user can reach it (pytest's tmp_path is 0700).
    parent = Path(tempfile.mkdtemp(prefix="das-kept-"))
    parent.chmod(0o755)
    kept = parent / "warehouse"
    try:
        _quick_run_then_resume(env, kept)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert time.monotonic() - started < 600


def _quick_run_then_resume(env: dict[str, str], kept: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick", "--keep-warehouse", str(kept)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Machine: " in done.stdout
    tables = _tables(done.stdout)
    main = _table(tables, "Cost against warehouse size")
    assert len(main) == 2
    assert _number(main[1]["events stored"]) >= 20_000
    for row in main:
        assert _number(row["ingest events/s"]) > 0
        assert 0 < _number(row["p50 s"]) <= _number(row["p99 s"])
        assert _number(row["verify --full s"]) > 0
        assert _number(row["retention 1 day s"]) > 0
    # The routine verify after the full one recomputed only the small addition (and a sample).
    assert _number(main[1]["routine events"]) < _number(main[1]["events stored"])
    queries = _table(tables, "Queries")
    assert len(queries) == len(readme_queries()) + len(TYPICAL)
    assert all("partitions" in row["plan (largest)"] for row in queries)
    costs = _table(tables, "COPY of")
    labels = [row["indexes"] for row in costs]
    assert labels[0] == "no index"
    assert labels[-1] == "all indexes"
    assert "activity_events_provenance" in labels
    for row in main:
        assert _number(row["empty DB events/s"]) > 0
        assert _number(row["empty DB steady"]) > 0
    assert (kept / "KEPT.txt").is_file()
    assert not (kept / "postmaster.pid").exists()

    # The kept warehouse resumes: migrated with this checkout's migrations and measured as it
    # is (nothing filled), then shut down cleanly again.
    resumed = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick", "--resume", str(kept)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    again = _tables(resumed.stdout)
    (row,) = _table(again, "Cost against warehouse size")
    assert _number(row["events stored"]) > 0
    assert _number(row["ingest events/s"]) > 0
    assert _number(row["empty DB events/s"]) > 0
    assert _number(row["fill events/s"]) == 0  # nothing was filled
    commands = {r["command"]: r for r in _table(again, "Commands")}
    assert "migrate (this checkout's migrations)" in commands
    assert len(_table(again, "Queries")) == len(readme_queries()) + len(TYPICAL)
    assert not (kept / "postmaster.pid").exists()
