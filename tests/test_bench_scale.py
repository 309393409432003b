"""The scale bench: its fill stores what the decode path stores (verify finds it clean, links and
dead letters included), and its quick mode prints every table with sane numbers."""

from __future__ import annotations

import argparse
import os
import re
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
from bench.scale import (
    TYPICAL,
    QueryResult,
    _plan_result,
    measure_queries,
    parse_args,
    parse_size,
    readme_queries,
    run_query,
)
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


def test_the_slow_verdict_names_where_the_time_goes() -> None:
    def result(client: float, server: float, rows: int, seq: list[str]) -> QueryResult:
        return QueryResult("q", client, rows, 1, 30, seq, [], server_seconds=server)

    assert result(0.2, 0.1, 10, []).slow == ""
    assert result(1.5, 1.2, 10, []).slow == "server"
    # Fast on the server, slow once 300,000 rows are sent and decoded: the client's time.
    assert result(2.5, 0.4, 300_000, []).slow == "client: 300,000 rows"
    assert result(0.3, 0.2, 5, ["activity_events_p20240301"]).slow == "seq scan"
    assert result(3.0, 2.0, 5, ["activity_events_p20240301"]).slow == "server, seq scan"
    timed_out = QueryResult("q", 60.0, 0, 30, 30, [], [], timed_out=True)
    assert timed_out.slow == "server"
    assert timed_out.server_shown == "-"


def test_an_empty_partition_made_ahead_is_no_seq_scan() -> None:
    def scan(relation: str, cost: float) -> dict[str, object]:
        return {"Node Type": "Seq Scan", "Relation Name": relation, "Total Cost": cost}

    plan = {
        "Node Type": "Append",
        "Plans": [
            scan("activity_events_p20240301", 2951.14),  # a day of events, read whole
            scan("activity_events_p20240305", 0.0),  # tomorrow's, empty and analyzed
            scan("activity_events_default", 0.0),
        ],
    }
    found = _plan_result("q", plan, 0, 0.1, 30)
    assert found.seq_scans == ["activity_events_p20240301"]
    assert found.partitions == 2


async def test_a_query_is_timed_by_the_client_and_by_the_server(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        # The server's share is small beside decoding 200,000 rows in Python; both are told.
        found = await run_query(
            conn, "rows", "SELECT g, md5(g::text) FROM generate_series(1, 200000) g", 3, 0, {}
        )
        # A query whose time is all the server's: one row, a sleep.
        sleeping = await run_query(conn, "sleep", "SELECT pg_sleep(0.3)", 1, 0, {})
    finally:
        await conn.close()
    assert found.rows == 200_000
    assert 0 < found.server_seconds < found.seconds
    assert found.server_shown != "-"
    assert sleeping.rows == 1
    assert 0.3 <= sleeping.server_seconds < 1.0
    assert sleeping.seconds >= 0.3


async def test_a_failing_query_is_reported_and_the_run_goes_on(pg_dsn: str) -> None:
    pool = await migrated_pool(pg_dsn)
    await pool.close()
    args = parse_args(["--queries-only", pg_dsn, "--repeat", "1"])
    # The README is read when the run starts, not again when the queries run (hours later).
    assert args.readme_queries == readme_queries()
    args.readme_queries = [
        ("README: a function this warehouse lacks", "SELECT * FROM das.no_such_function(now())"),
        ("README: a fine one", "SELECT count(*) FROM das.activity_events"),
    ]
    found, _ = await measure_queries(pg_dsn, args)
    names = [n for n, _ in args.readme_queries] + [n for n, _ in TYPICAL]
    assert [q.name for q in found] == names
    broken, fine, *typical = found
    assert "no_such_function" in broken.error
    assert broken.shown.startswith("error: ")
    assert broken.slow == "error"
    assert not fine.error
    assert fine.rows == 1
    assert not any(q.error for q in typical)


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


def _scale(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench.scale ARGS``, which must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _quick_run_then_resume(env: dict[str, str], kept: Path) -> None:
    done = _scale(env, "--quick", "--keep-warehouse", str(kept))
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
    # The server's execution time beside the client's, and a verdict naming which is slow.
    assert all(_number(row["server ms (largest)"]) >= 0 for row in queries)
    verdict = re.compile(
        r"-|server|client: [\d,]+ rows|seq scan|(server|client: [\d,]+ rows), seq scan"
    )
    assert all(verdict.fullmatch(row["slow (largest)"]) for row in queries)
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
    resumed = _scale(env, "--quick", "--resume", str(kept))
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
