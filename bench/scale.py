"""``make bench-scale`` = ``python -m bench.scale``: what each operation costs as the warehouse
grows. One warehouse is filled step by step (:mod:`bench.fill`: the decode layer's COPY lines
and real chain links over ``--days`` day partitions) to each of ``--sizes``; at each size:

- ingest end to end (``das-ingest run`` from kinesalite into this warehouse, a new stream each
  time): events/s, spawn -> first commit, and p99 put -> commit at a steady rate;
- every README example query and every auditor view on a typical filter (one day, one user,
  one object): median latency and the plan (partitions scanned, indexes, sequential scans);
- ``status``, ``dead-letters list``, ``rebuild-statements`` and the fill's commit per batch
  (COPY + statements merge + link);
- ``verify --full`` (events/s, peak RSS) and a routine ``verify`` after a small addition;
- ``retention`` dropping the oldest day.

    python -m bench.scale --sizes 0,1M,3M          # writes docs/performance.md and its charts
    python -m bench.scale --quick                  # smoke run, tiny sizes, no files written
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench import e2e, procs, workload
from bench.fill import RECORDS_PER_BATCH, Filler, Task, encode_task
from bench.fill import STREAM as FILL_STREAM
from bench.report import Table, num
from das_dev.devstack import LocalStack, install_signal_handlers
from ingest.aws import aws_client
from ingest.emulate import traffic
from ingest.emulate.producer import create_kms_key
from ingest.integrity.anchor import AnchorKey, anchor_heads
from ingest.integrity.canonical import EVENT_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
#: The bench cluster's settings beyond the devstack's (fsync, synchronous_commit and
#: full_page_writes are off there: a throwaway cluster). Fewer checkpoints while filling tens
#: of GB, and memory a warehouse server of this size would be given; each is named in the report.
#: What the devstack's PostgresCluster sets (das_dev/devstack.py), named in the report.
BASE_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
PG_SETTINGS = {
    "shared_buffers": "2GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "512MB",
}


def parse_size(text: str) -> int:
    """'0', '500k', '5M', '1.5M', '20000' -> events."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 0, 500k, 5M)")
    factor = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    return int(float(match.group(1)) * factor)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--sizes",
        default="0,1M,3M",
        help="warehouse sizes in events, increasing (default 0,1M,3M; e.g. 0,5M,20M)",
    )
    parser.add_argument("--days", type=int, default=30, help="day partitions to fill (30)")
    parser.add_argument("--processes", type=int, default=2, help="das-ingest run --processes")
    parser.add_argument(
        "--ingest-events", type=int, default=30_000, help="events of each ingest run (30000)"
    )
    parser.add_argument(
        "--latency-rate", type=float, default=1500.0, help="events/s of the latency run"
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=10.0, help="seconds of paced puts (10)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each query (median)")
    parser.add_argument(
        "--sample", type=int, default=16, help="verify --sample of the routine runs (16)"
    )
    parser.add_argument(
        "--output",
        default=str(ROOT / "docs" / "performance.md"),
        help="the Markdown report (charts beside it, in performance/); '-' for stdout only",
    )
    parser.add_argument(
        "--query-timeout",
        type=float,
        default=60.0,
        help="seconds a query may run (statement_timeout); a query that takes longer is "
        "reported as '> N s (timeout)' with its planned (not executed) plan (60)",
    )
    parser.add_argument(
        "--fill-batch-records",
        type=int,
        default=RECORDS_PER_BATCH,
        help=f"records per chain link while filling ({RECORDS_PER_BATCH}, as a Kinesis batch "
        "of 100 records); the commit per batch is measured on links of "
        f"{RECORDS_PER_BATCH} records whatever this is",
    )
    parser.add_argument(
        "--rebuild-all-up-to",
        type=parse_size,
        default=parse_size("5M"),
        help="measure rebuild-statements of the whole table only up to this size (5M); "
        "rebuild-statements --day is measured at every size",
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the throwaway PostgreSQL cluster, beside the bench's defaults "
        f"({', '.join(f'{k}={v}' for k, v in PG_SETTINGS.items())}); named in the report",
    )
    parser.add_argument(
        "--no-index-costs",
        action="store_true",
        help="skip the per-index COPY measurement (it does not depend on the size)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip verify --full and the routine verify (they take ~1 minute per million "
        "events; for runs that measure something else on a large warehouse)",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="fill nothing: start the warehouse a run kept in DIR (--keep-warehouse), migrate "
        "it with this checkout's migrations (timed) and measure it as the last size: ingest "
        "(interleaved with an empty database), queries, commands, retention; the directory is "
        "shut down cleanly afterwards and can be resumed again (retention drops its oldest day)",
    )
    parser.add_argument(
        "--keep-warehouse",
        metavar="DIR",
        help="after the run, stop the cluster cleanly and move its data directory to DIR "
        "(the filled warehouse, to query again later; how to start it is in DIR/KEPT.txt)",
    )
    parser.add_argument(
        "--render-from",
        metavar="JSON",
        help="run nothing: write the report from a run's results file (the .json beside its "
        "--output, rewritten after each measurement)",
    )
    parser.add_argument(
        "--queries-only",
        metavar="DSN",
        help="run nothing else: measure the queries on the warehouse at DSN (one a run kept "
        "with --keep-warehouse) and print their table",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, no files")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.days, args.ingest_events = "0,20k", 4, 2000
        args.latency_seconds, args.latency_rate, args.repeat = 2.0, 500.0, 1
        args.sample = 2
        args.output = "-"
    try:
        args.size_list = [parse_size(s) for s in str(args.sizes).split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.size_list != sorted(args.size_list) or not args.size_list:
        parser.error("--sizes must be increasing, e.g. 0,5M,20M")
    if args.days < 2:
        parser.error("--days must be at least 2 (retention drops one)")
    try:
        args.pg_settings = {**PG_SETTINGS, **dict(_setting(s) for s in args.pg_setting)}
    except ValueError as exc:
        parser.error(str(exc))
    if args.keep_warehouse and Path(args.keep_warehouse).exists():
        parser.error(f"--keep-warehouse {args.keep_warehouse}: already exists")
    # Read once, at the start: a run lasts up to hours, and the checkout's README may change
    # meanwhile (a merge whose queries need a migration the warehouse does not have).
    args.readme_queries = readme_queries()
    return args


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--pg-setting {text!r}: not NAME=VALUE")
    return name.strip(), value.strip()


# -- queries ----------------------------------------------------------------------------------


def readme_queries() -> list[tuple[str, str]]:
    """The README's SQL examples, named by the sentence above each block."""
    text = (ROOT / "README.md").read_text()
    found = []
    for match in re.finditer(r"([^\n]+)\n\n```sql\n(.*?)```", text, re.S):
        title = match.group(1).strip().rstrip(":")
        for i, query in enumerate(q.strip() for q in match.group(2).split(";")):
            if query:
                found.append((f"README: {title[:48]}{' ' + str(i + 1) if i else ''}", query))
    return found


#: Auditor views and tables on a typical filter: one day, one user, one object.
TYPICAL = [
    (
        "sessions: one day",
        "SELECT * FROM das.sessions WHERE connected_at >= :day AND connected_at < :day_end "
        "ORDER BY connected_at DESC LIMIT 50",
    ),
    (
        "sessions_between: one day",
        "SELECT * FROM das.sessions_between(:day, :day_end) WHERE connected_at IS NOT NULL "
        "ORDER BY connected_at DESC LIMIT 50",
    ),
    (
        "sessions: one user, one day",
        "SELECT * FROM das.sessions WHERE db_user_name = 'alice' AND connected_at >= :day "
        "AND connected_at < :day_end",
    ),
    (
        "failed_logins: one day",
        "SELECT * FROM das.failed_logins WHERE log_time >= :day AND log_time < :day_end",
    ),
    (
        "failed_statements: one user, one day",
        "SELECT * FROM das.failed_statements WHERE db_user_name = 'alice' "
        "AND log_time >= :day AND log_time < :day_end",
    ),
    (
        "failed_statements: newest 100",
        "SELECT * FROM das.failed_statements ORDER BY log_time DESC LIMIT 100",
    ),
    (
        "ddl_changes: one day",
        "SELECT * FROM das.ddl_changes WHERE log_time >= :day AND log_time < :day_end",
    ),
    (
        "privileged_activity: one user, one day",
        "SELECT * FROM das.privileged_activity WHERE db_user_name = 'rdsadmin' "
        "AND log_time >= :day AND log_time < :day_end",
    ),
    (
        "events: one object, one day",
        "SELECT * FROM das.activity_events WHERE object_name = 'orders' "
        "AND log_time >= :day AND log_time < :day_end",
    ),
    (
        "events: one user, one day",
        "SELECT * FROM das.activity_events WHERE db_user_name = 'alice' "
        "AND log_time >= :day AND log_time < :day_end",
    ),
    (
        "events: one session, one day",
        "SELECT * FROM das.activity_events WHERE cluster_id = 'cluster-SCALEFILL' "
        "AND instance_id = :instance AND session_id = :session "
        "AND log_time >= :day AND log_time < :day_end ORDER BY log_time",
    ),
    (
        "statements: one user, one day",
        "SELECT * FROM das.statements WHERE db_user_name = 'alice' "
        "AND log_time >= :day AND log_time < :day_end",
    ),
]


@dataclass
class QueryResult:
    name: str
    seconds: float
    rows: int
    partitions: int
    of_partitions: int
    seq_scans: list[str]
    indexes: list[str]
    #: ran longer than the timeout (``seconds`` is the timeout; the plan is EXPLAIN's)
    timed_out: bool = False
    #: the server's own execution time (EXPLAIN ANALYZE's "Execution Time", without planning,
    #: sending and decoding the rows); ``seconds`` is the client's (all rows fetched and decoded
    #: into Python), the time an auditor waits. 0: not measured (a timeout, an older run).
    server_seconds: float = 0.0
    #: the server's error, when the query failed ('': it ran); the run goes on without it
    error: str = ""

    @property
    def server_shown(self) -> str:
        return num(self.server_seconds * 1000, 1) if self.server_seconds else "-"

    @property
    def slow(self) -> str:
        """Why the query is slow ('': it is not): over 1 s on the server ("server"), or over
        1 s only once its rows reach the client ("client: N rows"); a sequential scan of a day
        partition is named too."""
        if self.error:
            return "error"
        why = []
        if self.timed_out or self.server_seconds > 1.0:
            why.append("server")
        elif self.seconds > 1.0:
            why.append(f"client: {self.rows:,} rows")
        if self.seq_scans:
            why.append("seq scan")
        return ", ".join(why)

    @property
    def shown(self) -> str:
        if self.error:
            return f"error: {self.error}"
        if self.timed_out:
            return f"> {self.seconds:,.0f} s (timeout)"
        return num(self.seconds * 1000, 1)

    @property
    def plan(self) -> str:
        parts = [f"{self.partitions}/{self.of_partitions} partitions"]
        if self.indexes:
            parts.append("index " + ", ".join(sorted(set(self.indexes))[:3]))
        if self.seq_scans:
            parts.append(f"SEQ SCAN x{len(self.seq_scans)}")
        return "; ".join(parts)


def _walk(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_walk(child))
    return nodes


async def run_query(
    conn: asyncpg.Connection,
    name: str,
    sql: str,
    repeat: int,
    partitions: int,
    parents: dict[str, str],
    limit: float = 0.0,
) -> QueryResult:
    """Median of ``repeat`` runs (one when EXPLAIN ANALYZE took over 5 s), under a
    statement_timeout of ``limit`` seconds (0: none)."""
    timeout = limit
    await conn.execute(f"SET statement_timeout = {int(limit * 1000)}")
    began = time.perf_counter()
    # TIMING OFF: no clock read per row and node (its overhead would inflate the server's
    # figure); the plan and the total execution time are what is read.
    try:
        explained = await conn.fetchval(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}")
    except asyncpg.QueryCanceledError:
        explained = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}")
        found = _plan_result(name, json.loads(explained)[0]["Plan"], 0, timeout, partitions)
        found.indexes = [parents.get(i, i) for i in found.indexes]
        found.timed_out = True
        return found
    if time.perf_counter() - began > 5.0:
        repeat = 1
    times, rows = [], 0
    for _ in range(repeat):
        began = time.perf_counter()
        try:
            rows = len(await conn.fetch(sql))
        except asyncpg.QueryCanceledError:
            found = _plan_result(name, json.loads(explained)[0]["Plan"], 0, timeout, partitions)
            found.indexes = [parents.get(i, i) for i in found.indexes]
            found.timed_out = True
            return found
        times.append(time.perf_counter() - began)
    found = _plan_result(
        name, json.loads(explained)[0]["Plan"], rows, statistics.median(times), partitions
    )
    found.indexes = [parents.get(i, i) for i in found.indexes]
    if repeat > 1:
        # The first EXPLAIN ANALYZE ran cold (it warmed the cache for the timed runs): the
        # server's figure is taken warm too, as the client's are.
        explained = await conn.fetchval(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}")
    found.server_seconds = float(json.loads(explained)[0]["Execution Time"]) / 1000
    return found


def _plan_result(
    name: str, plan: dict[str, Any], rows: int, seconds: float, partitions: int
) -> QueryResult:
    nodes = _walk(plan)
    scanned = {
        n["Relation Name"]
        for n in nodes
        if str(n.get("Relation Name", "")).startswith("activity_events_p")
    }
    # A sequential scan of a whole day partition (not of a tiny table, nor a one-row default,
    # nor an empty partition made ahead for days to come: analyzed, it costs nothing to scan).
    seq = [
        n["Relation Name"]
        for n in nodes
        if n.get("Node Type") == "Seq Scan"
        and str(n.get("Relation Name", "")).startswith(("activity_events_p", "statements"))
        and float(n.get("Total Cost", 1.0)) > 0
    ]
    indexes = [n["Index Name"] for n in nodes if "Index Name" in n]
    return QueryResult(name, seconds, rows, len(scanned), partitions, seq, indexes)


async def measure_queries(dsn: str, args: argparse.Namespace) -> tuple[list[QueryResult], datetime]:
    """Every README query and TYPICAL filter on the warehouse at ``dsn``; and the day they
    call 'one day' (the day before the newest fill event's)."""
    found: list[QueryResult] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE das.activity_events")
        newest = await conn.fetchval(
            "SELECT max(log_time) FROM das.activity_events WHERE stream_name = $1", FILL_STREAM
        )
        partitions = int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'das.activity_events'::regclass"
            )
        )
        now = newest or datetime.now(UTC)
        day = datetime.combine(now.date(), datetime.min.time(), tzinfo=UTC) - timedelta(days=1)
        session = await conn.fetchrow(
            "SELECT instance_id, session_id FROM das.activity_events WHERE stream_name = $1 "
            "AND session_id IS NOT NULL AND log_time >= $2 AND log_time < $3 LIMIT 1",
            FILL_STREAM,
            day + timedelta(hours=12),
            day + timedelta(days=1),
        )
        values = {
            ":day_end": f"'{(day + timedelta(days=1)).isoformat()}'::timestamptz",
            ":day": f"'{day.isoformat()}'::timestamptz",
            ":instance": f"'{session['instance_id']}'" if session else "''",
            ":session": f"'{session['session_id']}'" if session else "''",
            "now()": f"'{now.isoformat()}'::timestamptz",
        }
        # Partition indexes by the index of das.activity_events they belong to.
        parents = {
            r["child"]: r["parent"]
            for r in await conn.fetch(
                "SELECT c.relname AS child, p.relname AS parent FROM pg_inherits h "
                "JOIN pg_class c ON c.oid = h.inhrelid JOIN pg_class p ON p.oid = h.inhparent "
                "WHERE p.relkind = 'I'"
            )
        }
        for name, sql in [*args.readme_queries, *TYPICAL]:
            for key, value in values.items():
                sql = sql.replace(key, value)
            try:
                result = await run_query(
                    conn, name, sql, args.repeat, partitions, parents, args.query_timeout
                )
            except asyncpg.PostgresError as exc:
                # One broken query (an older warehouse, a view it lacks) is reported as such;
                # the rest of a run that took an hour to fill is not thrown away.
                result = QueryResult(name, 0.0, 0, 0, partitions, [], [], error=str(exc))
            found.append(result)
            q = found[-1]
            print(
                f"    {name}: {q.shown} ms (server {q.server_shown} ms, {q.rows:,} rows)"
                + (f" SLOW: {q.slow}" if q.slow else ""),
                flush=True,
            )
    finally:
        await conn.close()
    return found, day


# -- one size -------------------------------------------------------------------------------


@dataclass
class SizeResult:
    size: int
    events: int
    table_mb: float
    index_mb: float
    fill_events_per_second: float
    commit_ms: float
    ingest_events_per_second: float = 0.0
    ingest_steady: float = 0.0
    #: The same ingest runs into an empty database of the same cluster, interleaved with the
    #: runs into this warehouse (so both see the same load): events/s and steady events/s.
    empty_events_per_second: float = 0.0
    empty_steady: float = 0.0
    first_commit_seconds: float = 0.0
    p99: float = 0.0
    p50: float = 0.0
    queries: list[QueryResult] = field(default_factory=list)
    commands: dict[str, float] = field(default_factory=dict)
    verify_full_seconds: float = 0.0
    verify_full_events: int = 0
    verify_full_rss_mb: float = 0.0
    verify_routine_seconds: float = 0.0
    verify_routine_events: int = 0
    retention_seconds: float = 0.0


async def _cli(*args: str, env: dict[str, str], check: bool = True) -> tuple[float, int, str, int]:
    """Run das-ingest; (seconds, peak RSS of the process tree, stdout, exit code)."""
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while process.returncode is None:
            peak = max(peak, procs.tree_rss_bytes(process.pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    out, err = await process.communicate()
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    seconds = time.perf_counter() - began
    code = process.returncode or 0
    if check and code not in (0,):
        raise RuntimeError(f"das-ingest {' '.join(args)} exited {code}: {err.decode()[-2000:]}")
    return seconds, peak, out.decode(), code


async def _measure_verify(
    args: argparse.Namespace,
    dsn: str,
    filler: Filler,
    keys: tuple[str, str],
    result: SizeResult,
    results: list[SizeResult],
) -> None:
    """verify --full, then a routine verify after a small addition."""
    anchor_key, verify_key = keys
    env = {"DAS_DSN": dsn}
    async with aws_client("kms") as kms_client:
        conn = await asyncpg.connect(dsn)
        try:
            for (stream,) in await conn.fetch("SELECT DISTINCT stream_name FROM das.chain_links"):
                await anchor_heads(conn, AnchorKey(kms_client, anchor_key), stream)
        finally:
            await conn.close()
    flags = ("--anchor-key-id", anchor_key, "--verify-key-id", verify_key, "--json")
    seconds, peak, out, _ = await _cli("verify", "--full", *flags, env=env, check=False)
    report = json.loads(out)
    if not report["clean"]:
        raise RuntimeError(f"verify --full found something: {report['findings'][:3]}")
    result.verify_full_seconds, result.verify_full_rss_mb = seconds, peak / 2**20
    result.verify_full_events = int(report["events"])
    save_results(args, results)
    await filler.fill_to(filler.stats.events + max(1000, args.ingest_events // 3), progress=False)
    async with aws_client("kms") as kms_client:
        conn = await asyncpg.connect(dsn)
        try:
            await anchor_heads(conn, AnchorKey(kms_client, anchor_key), FILL_STREAM)
        finally:
            await conn.close()
    seconds, _, out, _ = await _cli(
        "verify", "--sample", str(args.sample), *flags, env=env, check=False
    )
    report = json.loads(out)
    if not report["clean"] or report["mode"] != "routine":
        raise RuntimeError(f"routine verify: {report['mode']} {report['findings'][:3]}")
    result.verify_routine_seconds = seconds
    result.verify_routine_events = int(report["events"])
    print(
        f"  verify full {result.verify_full_seconds:.1f}s, routine "
        f"{result.verify_routine_seconds:.1f}s",
        flush=True,
    )


async def measure_size(
    stack: LocalStack,
    args: argparse.Namespace,
    dsn: str,
    filler: Filler | None,
    size: int,
    kinesis: Any,
    kms: Any,
    keys: tuple[str, str],
    work: workload.Workload,
    latency_work: workload.Workload,
    results: list[SizeResult],
) -> SizeResult:
    """Fill to ``size`` and measure; ``results`` gets this size's result at once, and the
    results file (``--output`` beside it, .json) is rewritten after each measurement, so what
    a run that is stopped half way measured is kept."""
    env = {"DAS_DSN": dsn}
    began = time.perf_counter()
    if filler is not None:
        await filler.fill_to(size)
    if size and filler is not None:
        # The commit per batch, on links of a Kinesis batch's 100 records (~1000 events) each
        # whatever the fill's links are: a few per day and shard.
        probe = len(filler.days) * 4 * RECORDS_PER_BATCH * 10
        await filler.fill_to(
            filler.stats.events + probe, progress=False, records_per_batch=RECORDS_PER_BATCH
        )
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE das.activity_events")
        await conn.execute("ANALYZE das.statements")
        sizes = await conn.fetchrow(
            """
            SELECT coalesce(sum(pg_table_size(c.oid)), 0) AS t,
                   coalesce(sum(pg_indexes_size(c.oid)), 0) AS i
            FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
            WHERE h.inhparent = 'das.activity_events'::regclass
            """
        )
        events = int(await conn.fetchval("SELECT count(*) FROM das.activity_events"))
    finally:
        await conn.close()
    assert sizes is not None
    stats = filler.stats if filler is not None else None
    result = SizeResult(
        size=size,
        events=events,
        table_mb=sizes["t"] / 2**20,
        index_mb=sizes["i"] / 2**20,
        fill_events_per_second=stats.events / stats.seconds if stats and stats.seconds else 0.0,
        commit_ms=1000 * statistics.median(stats.commit_seconds)
        if stats and stats.commit_seconds
        else 0.0,
    )
    results.append(result)
    save_results(args, results)
    print(f"  size {size:,}: {events:,} events ({time.perf_counter() - began:.0f}s)", flush=True)

    # Ingest end to end, new streams each size (the same sealed records). Each stream is read
    # twice, into this warehouse and into an empty database of the same cluster, in turns
    # (warehouse first, then empty first), so the ratio of the two is measured under one load.
    suffix = f"S{size}"
    base = work.stream.rsplit("-", 1)[0]
    runs: dict[bool, list[e2e.WorkerRun]] = {True: [], False: []}
    for turn, full_first in enumerate((True, False)):
        work.stream = f"{base}-{suffix}{'ab'[turn]}"
        work.put_times.clear()
        await workload.create_stream(kinesis, work.stream)
        await workload.put(kinesis, work)
        for full in (full_first, not full_first):
            target = dsn if full else await e2e.fresh_database(stack)
            try:
                # The records' data keys name the cluster they were built for, not the stream.
                runs[full].append(
                    await e2e.run_worker(
                        stack,
                        work,
                        worker_args=["--resource-id", work.resource_id],
                        processes=args.processes,
                        dsn=target,
                    )
                )
            finally:
                if not full:
                    await e2e.drop_database(stack, target)
    full_runs, empty_runs = runs[True], runs[False]
    result.ingest_events_per_second = statistics.median(r.events_per_second for r in full_runs)
    result.ingest_steady = statistics.median(r.steady_events_per_second for r in full_runs)
    result.first_commit_seconds = statistics.median(r.first_commit_seconds for r in full_runs)
    result.empty_events_per_second = statistics.median(r.events_per_second for r in empty_runs)
    result.empty_steady = statistics.median(r.steady_events_per_second for r in empty_runs)
    latency_work.stream = f"{latency_work.stream.rsplit('-', 1)[0]}-{suffix}L"
    latency_work.put_times.clear()
    await workload.create_stream(kinesis, latency_work.stream)
    latency = await e2e.run_latency(
        stack,
        kinesis,
        latency_work,
        rate=args.latency_rate,
        worker_args=["--resource-id", latency_work.resource_id],
        processes=args.processes,
        dsn=dsn,
    )
    result.p50, result.p99 = latency.p50, latency.p99
    save_results(args, results)
    print(
        f"  ingest {result.ingest_events_per_second:,.0f} events/s (empty database "
        f"{result.empty_events_per_second:,.0f}), p99 {latency.p99:.3f}s",
        flush=True,
    )

    # Queries.
    result.queries, day = await measure_queries(dsn, args)
    slow = [q for q in result.queries if q.slow]
    print(f"  {len(result.queries)} queries, {len(slow)} slow or scanning", flush=True)
    for q in slow:
        print(f"    {q.name}: {q.slow}", flush=True)
    save_results(args, results)

    # Commands.
    baseline, *_ = await _cli("--version", env=env, check=False)
    result.commands["interpreter start"] = baseline
    commands: list[tuple[str, tuple[str, ...]]] = [
        ("status", ("status", "--json", "--no-lag")),
        ("dead-letters list", ("dead-letters", "list", "--limit", "100")),
        ("rebuild-statements --day (one day)", ("rebuild-statements", "--day", f"{day:%Y-%m-%d}")),
    ]
    if size <= args.rebuild_all_up_to:
        commands.append(("rebuild-statements (all)", ("rebuild-statements",)))
    for label, command in commands:
        seconds, *_ = await _cli(*command, env=env)
        result.commands[label] = seconds
        print(f"    {label}: {seconds:.2f}s", flush=True)
    save_results(args, results)

    # Verify: full, then routine after a small addition.
    if not args.no_verify and filler is not None:
        await _measure_verify(args, dsn, filler, keys, result, results)

    # Retention: drop exactly the oldest day.
    conn = await asyncpg.connect(dsn)
    try:
        oldest = await conn.fetchval(
            "SELECT min(to_date(substr(c.relname, 18), 'YYYYMMDD')) FROM pg_inherits h "
            "JOIN pg_class c ON c.oid = h.inhrelid "
            "WHERE h.inhparent = 'das.activity_events'::regclass "
            "AND c.relname ~ '^activity_events_p'"
        )
        now_db = await conn.fetchval("SELECT now()")
    finally:
        await conn.close()
    cutoff = datetime.combine(oldest + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    keep_hours = max(1, math.floor((now_db - cutoff).total_seconds() / 3600))
    # --no-archive: the archive (and its cost) is not what this measures (see docs/archive.md).
    seconds, *_ = await _cli(
        "retention", "--retention-keep", f"{keep_hours}h", "--no-archive", env=env
    )
    result.retention_seconds = seconds
    if filler is not None:
        filler.drop_day(oldest)
    save_results(args, results)
    return result


def save_results(args: argparse.Namespace, results: list[SizeResult]) -> None:
    """The results so far, as JSON beside the report (``--render-from`` makes the report)."""
    if args.output == "-":
        return
    path = Path(args.output).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"sizes": args.sizes, "days": args.days, "pg_settings": args.pg_settings}
    data = {"meta": meta, "results": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=1, default=str))


def load_results(path: Path) -> tuple[dict[str, Any], list[SizeResult]]:
    data = json.loads(path.read_text())
    results = []
    for found in data["results"]:
        queries = [QueryResult(**q) for q in found.pop("queries")]
        # Sizes from the database are Decimals, saved as text.
        found = {k: float(v) if isinstance(v, str) else v for k, v in found.items()}
        results.append(SizeResult(**found, queries=queries))
    return data["meta"], results


# -- what each index costs the COPY ----------------------------------------------------------


async def index_costs(dsn: str, events: int, repeat: int) -> Table:
    """COPY the same ``events`` events (the fill's COPY lines) into a scratch copy of the events
    table: without indexes, with each index of das.activity_events alone, and with all."""
    day = datetime.now(UTC).date()
    batches = await asyncio.get_running_loop().run_in_executor(
        None, encode_task, Task(day, 424242, events, 10**30)
    )
    payload = b"".join(b.events for b in batches)
    count = sum(b.count for b in batches)
    conn = await asyncpg.connect(dsn)
    try:
        definitions = [
            (r["indexname"], r["indexdef"])
            for r in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = 'das' AND tablename = 'activity_events' ORDER BY indexname"
            )
        ]
        await conn.execute("DROP TABLE IF EXISTS public.bench_copy")
        await conn.execute(
            "CREATE TABLE public.bench_copy (LIKE das.activity_events INCLUDING DEFAULTS)"
        )
        configs = [("no index", []), *((n, [d]) for n, d in definitions)]
        configs.append(("all indexes", [d for _, d in definitions]))
        # Rounds interleave the configurations, so a burst of load on the shared machine hits
        # them alike; each one's best round is the least disturbed.
        times: dict[str, list[float]] = {label: [] for label, _ in configs}
        for _ in range(repeat):
            for label, ddl in configs:
                await conn.execute("DROP TABLE public.bench_copy")
                await conn.execute(
                    "CREATE TABLE public.bench_copy (LIKE das.activity_events INCLUDING DEFAULTS)"
                )
                for i, definition in enumerate(ddl):
                    statement = re.sub(
                        r"^CREATE (UNIQUE )?INDEX \S+ ON (ONLY )?das\.activity_events ",
                        rf"CREATE \1INDEX bench_copy_{i} ON public.bench_copy ",
                        definition,
                    )
                    await conn.execute(statement)
                await conn.execute("CHECKPOINT")
                began = time.perf_counter()
                await conn.copy_to_table(
                    "bench_copy",
                    schema_name="public",
                    source=memoryview(payload),  # type: ignore[arg-type]
                    columns=list(EVENT_COLUMNS),
                    format="text",
                )
                times[label].append(time.perf_counter() - began)
        best = {label: min(found) for label, found in times.items()}
        sizes = {
            r["indexname"]: r["bytes"]
            for r in await conn.fetch(
                "SELECT p.relname AS indexname, sum(pg_relation_size(h.inhrelid)) AS bytes "
                "FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhparent "
                "WHERE p.relkind = 'I' AND p.relnamespace = 'das'::regnamespace "
                "GROUP BY p.relname"
            )
        }
        await conn.execute("DROP TABLE public.bench_copy")
    finally:
        await conn.close()
    base = best["no index"]
    table = Table(
        f"COPY of {count:,} events into an empty table, per index (best of {repeat} "
        "interleaved rounds)",
        ["indexes", "events/s", "ms added per 1000 events", "cost vs no index",
         "size in the warehouse MB"],
    )  # fmt: skip
    for label, seconds in best.items():
        table.add(
            label,
            num(count / seconds),
            "-" if label == "no index" else num((seconds - base) / count * 1e6, 2),
            "-" if label == "no index" else f"{(seconds - base) / base:+.0%}",
            num(sizes.get(label, 0) / 2**20, 1) if label in sizes else "-",
        )
    table.notes.append(
        "The cost of each index alone: the time the COPY takes with it, minus without any. "
        "The provenance index is what makes a stored event unique (exactly once): it stays."
    )
    return table


# -- report ---------------------------------------------------------------------------------


def tables(results: list[SizeResult]) -> list[Table]:
    sizes = [f"{r.events:,}" for r in results]
    main = Table(
        "Cost against warehouse size",
        ["events stored", "table MB", "indexes MB", "fill events/s", "commit ms/batch",
         "ingest events/s", "steady events/s", "empty DB events/s", "empty DB steady",
         "steady vs empty", "spawn -> 1st commit s", "p50 s", "p99 s",
         "verify --full s", "verify events/s", "verify RSS MB", "routine verify s",
         "routine events", "retention 1 day s"],
    )  # fmt: skip
    for r in results:
        main.add(
            f"{r.events:,}",
            num(r.table_mb),
            num(r.index_mb),
            num(r.fill_events_per_second),
            num(r.commit_ms, 1),
            measured(r.ingest_events_per_second),
            measured(r.ingest_steady),
            measured(r.empty_events_per_second),
            measured(r.empty_steady),
            f"{r.ingest_steady / r.empty_steady - 1:+.0%}" if r.empty_steady else "-",
            measured(r.first_commit_seconds, 2),
            measured(r.p50, 3),
            measured(r.p99, 3),
            measured(r.verify_full_seconds, 1),
            measured(r.verify_full_events / r.verify_full_seconds if r.verify_full_seconds else 0),
            measured(r.verify_full_rss_mb),
            measured(r.verify_routine_seconds, 1),
            measured(r.verify_routine_events),
            measured(r.retention_seconds, 2),
        )
    main.notes.append(
        "ingest: median of two runs of the same records into the warehouse, each beside a run "
        "into an empty database of the same cluster (in turns: warehouse first, then empty "
        "first), whose figures are the 'empty DB' columns; 'steady vs empty' compares the two "
        "steady rates, measured under the same load. "
        "CLI times (verify, retention) include starting the interpreter (see the commands "
        "table). commit ms/batch: the fill's Sink.commit of one link (COPY of ~1000 events, the "
        "statements merge, the chain link), median of a step of such links after the fill "
        "(whatever --fill-batch-records the fill used)."
    )
    commands = Table("Commands, seconds (wall, CLI)", ["command", *sizes])
    for label in command_labels(results):
        commands.add(
            label, *(num(r.commands[label], 2) if label in r.commands else "-" for r in results)
        )
    commands.notes.append(
        "rebuild-statements --day: the day before the newest event's. '-': not measured "
        "(rebuild of the whole table above --rebuild-all-up-to; a size the run did not finish)."
    )
    queries = Table(
        "Queries: median ms, and the plan at the largest size",
        ["query", *sizes, "server ms (largest)", "rows", "plan (largest)", "slow (largest)"],
    )
    largest = [r for r in results if r.queries][-1]  # the largest size measured that far
    for i, q in enumerate(largest.queries):
        queries.add(
            q.name,
            *(r.queries[i].shown if i < len(r.queries) else "-" for r in results),
            q.server_shown,
            "-" if q.timed_out else f"{q.rows:,}",
            q.plan + (" (planned)" if q.timed_out else ""),
            q.slow or "-",
        )
    queries.notes.append(
        "now() in the README's queries is the newest fill event's log_time; 'one day' is the "
        "day before it. partitions: day partitions of das.activity_events the plan touched. "
        "A query that ran longer than --query-timeout shows '> N s (timeout)' and the plan "
        "EXPLAIN gives without running it. ms: the client's time, every row fetched and "
        "decoded (what an auditor waits); server ms: EXPLAIN ANALYZE's execution time (the "
        "server's part, TIMING OFF). slow: over 1 s on the server ('server'), or only with "
        "the rows' transfer and decoding ('client: N rows'); 'seq scan': a day partition "
        "read whole."
    )
    return [main, commands, queries]


def measured(value: float, digits: int = 0) -> str:
    """A figure, or '-' for one the run did not get to (they are never exactly 0)."""
    return num(value, digits) if value else "-"


def command_labels(results: list[SizeResult]) -> list[str]:
    labels: list[str] = []
    for r in results:
        labels += [label for label in r.commands if label not in labels]
    return labels


def charts(results: list[SizeResult], directory: Path) -> list[str]:
    import matplotlib  # a dev dependency, only for the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    results = [r for r in results if r.queries]  # sizes measured at least that far
    xs = [r.events / 1e6 for r in results]
    made = []

    def save(name: str, title: str, series: dict[str, list[float]], unit: str) -> None:
        many = len(series) > 6
        fig, ax = plt.subplots(figsize=(12, 6) if many else (7, 4))
        for label, ys in series.items():
            # 0: not measured (a size the run did not finish, no fill at size 0): no point
            ax.plot(xs, [y if y else math.nan for y in ys], marker="o", label=label)
        ax.set_xlabel("events stored (millions)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        if many:  # latencies over orders of magnitude; the legend beside the plot
            ax.set_yscale("log")
            ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        else:
            ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=75 if many else 100)  # under 200 KB each
        plt.close(fig)
        made.append(name)

    save(
        "ingest.png",
        "Ingest end to end",
        {
            "events/s": [r.ingest_events_per_second for r in results],
            "steady events/s": [r.ingest_steady for r in results],
            "fill events/s": [r.fill_events_per_second for r in results],
        },
        "events/s",
    )
    save(
        "latency.png",
        "put -> commit latency and start-up",
        {
            "p50 s": [r.p50 for r in results],
            "p99 s": [r.p99 for r in results],
            "spawn -> first commit s": [r.first_commit_seconds for r in results],
        },
        "seconds",
    )
    save(
        "queries.png",
        "README queries and auditor views (a timeout: its limit)",
        {
            q.name: [r.queries[i].seconds * 1000 for r in results]
            for i, q in enumerate(results[-1].queries)
        },
        "ms (median)",
    )
    save(
        "operations.png",
        "verify, retention, commands",
        {
            "verify --full s": [r.verify_full_seconds for r in results],
            "routine verify s": [r.verify_routine_seconds for r in results],
            "retention 1 day s": [r.retention_seconds for r in results],
            **{
                f"{label} s": [r.commands.get(label, math.nan) for r in results]
                for label in command_labels(results)
            },
        },
        "seconds",
    )
    return made


def _traffic_today() -> date:
    """Today, made the emulated traffic's base day: today is the newest day partition, and the
    ingest runs' traffic is today's too, so their rows land in it (as a live stream's do), not
    in the default partition."""
    today = datetime.now(UTC).date()
    traffic._BASE_EPOCH_US = int(
        datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp() * 1e6
    )
    return today


async def _ingest_workloads(
    kms: Any, key_id: str, args: argparse.Namespace
) -> tuple[workload.Workload, workload.Workload]:
    """The sealed records of each size's ingest runs and of its latency run."""
    work = await workload.build(
        kms, key_id, "aws-rds-das-cluster-SCALEINGEST", 10, args.ingest_events, seed=10
    )
    latency_events = int(args.latency_rate * args.latency_seconds)
    latency_work = await workload.build(
        kms, key_id, "aws-rds-das-cluster-SCALELAT", 10, latency_events, seed=11
    )
    return work, latency_work


async def run_all(
    stack: LocalStack, args: argparse.Namespace
) -> tuple[list[SizeResult], Table | None, str]:
    today = _traffic_today()
    dsn = await e2e.fresh_database(stack)
    filler = Filler(
        dsn,
        days=args.days,
        last_day=today,
        processes=args.processes,
        records_per_batch=args.fill_batch_records,
    )
    results: list[SizeResult] = []
    costs = None
    try:
        async with aws_client("kinesis") as kinesis, aws_client("kms") as kms:
            key_id = await create_kms_key(kms)
            anchor_key = (await kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC"))[
                "KeyMetadata"
            ]["KeyId"]
            verify_key = (await kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC"))[
                "KeyMetadata"
            ]["KeyId"]
            work, latency_work = await _ingest_workloads(kms, key_id, args)
            keys = (anchor_key, verify_key)
            for size in args.size_list:
                await measure_size(
                    stack, args, dsn, filler, size, kinesis, kms, keys, work, latency_work, results
                )
            if not args.no_index_costs:
                costs = await index_costs(dsn, 5_000 if args.quick else 100_000, args.repeat)
    finally:
        await filler.close()
        if not args.keep_warehouse:
            await e2e.drop_database(stack, dsn)
    return results, costs, dsn


def kept_database(directory: Path) -> str:
    """The database a kept warehouse holds (named in its KEPT.txt)."""
    try:
        text = (directory / "KEPT.txt").read_text()
    except OSError as e:
        raise SystemExit(f"--resume: {directory} is no kept warehouse ({e.strerror})") from None
    match = re.search(r"database (\w+)", text)
    if not match:
        raise SystemExit(f"--resume: {directory}/KEPT.txt names no database")
    return match.group(1)


async def run_resumed(
    stack: LocalStack, args: argparse.Namespace, directory: Path
) -> list[SizeResult]:
    """Migrate the kept warehouse with this checkout's migrations, then measure it as one
    size (no fill: its commit per batch and fill rate are not measured)."""
    assert stack.postgres is not None
    dsn = stack.postgres.dsn_for(kept_database(directory))
    _traffic_today()
    seconds, *_ = await _cli("migrate", env={"DAS_DSN": dsn})
    print(f"  migrate {seconds:.1f}s", flush=True)
    conn = await asyncpg.connect(dsn)
    try:
        size = int(await conn.fetchval("SELECT count(*) FROM das.activity_events"))
    finally:
        await conn.close()
    results: list[SizeResult] = []
    async with aws_client("kinesis") as kinesis, aws_client("kms") as kms:
        work, latency_work = await _ingest_workloads(kms, await create_kms_key(kms), args)
        result = await measure_size(
            stack, args, dsn, None, size, kinesis, kms, ("", ""), work, latency_work, results
        )
    result.commands["migrate (this checkout's migrations)"] = seconds
    save_results(args, results)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CHECKPOINT")  # a quick clean shutdown after
    finally:
        await conn.close()
    return results


async def queries_table(dsn: str, args: argparse.Namespace) -> Table:
    conn = await asyncpg.connect(dsn)
    try:
        events = int(await conn.fetchval("SELECT count(*) FROM das.activity_events"))
    finally:
        await conn.close()
    found, day = await measure_queries(dsn, args)
    load = "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    table = Table(
        f"Queries on a kept warehouse of {events:,} events: median ms of {args.repeat} runs",
        ["query", "ms", "server ms", "rows", "plan", "slow"],
    )
    for q in found:
        table.add(
            q.name,
            q.shown,
            q.server_shown,
            "-" if q.timed_out else f"{q.rows:,}",
            q.plan + (" (planned)" if q.timed_out else ""),
            q.slow or "-",
        )
    table.notes.append(
        "ms: the client's time (every row fetched and decoded); server ms: EXPLAIN ANALYZE's "
        "execution time. "
        f"'one day': {day:%Y-%m-%d}; now() is the newest fill event's log_time; measured "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {load}."
    )
    return table


def keep_warehouse(stack: LocalStack, dsn: str, directory: Path, settings: dict[str, str]) -> None:
    """Stop the cluster cleanly (a fast shutdown: SIGINT) and move its data directory to
    ``directory``, with the run's settings in its postgresql.conf and how to start it."""
    cluster = stack.postgres
    assert cluster is not None
    datadir = cluster.datadir
    pid = int((datadir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 600
    while (datadir / "postmaster.pid").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster in {datadir} did not stop in 600 s")
        time.sleep(0.5)
    shutil.move(str(datadir), str(directory))
    with (directory / "postgresql.conf").open("a") as conf:
        conf.write("\n# das-ingest bench.scale run\n")
        for name, value in {**BASE_SETTINGS, **settings}.items():
            conf.write(f"{name} = '{value}'\n")
    database = dsn.rsplit("/", 1)[1]
    (directory / "KEPT.txt").write_text(
        f"das-ingest bench.scale warehouse: database {database}, was at {dsn}\n"
        f"start: su {cluster.user} -c '{cluster.bindir}/pg_ctl -D {directory} -l "
        f'{directory}/log.txt -o "-p PORT -k {directory}" start\'\n'
        f"stop:  su {cluster.user} -c '{cluster.bindir}/pg_ctl -D {directory} stop -m fast'\n"
    )
    print(f"warehouse kept in {directory} (database {database}; see KEPT.txt)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    e2e.drop_stray_aws_variables()
    began = time.monotonic()
    if args.queries_only:
        print(asyncio.run(queries_table(args.queries_only, args)).render())
        return 0
    if args.render_from:
        meta, results = load_results(Path(args.render_from))
        costs = None
        args.sizes, args.days, args.pg_settings = meta["sizes"], meta["days"], meta["pg_settings"]
        finished = "rendered from " + args.render_from
    elif args.resume:
        costs = None
        with LocalStack(pg_settings=args.pg_settings, pg_existing=Path(args.resume)) as stack:
            os.environ.update(stack.env())
            results = asyncio.run(run_resumed(stack, args, Path(args.resume)))
        args.sizes = f"{results[0].events:,} (resumed from {args.resume})"
        finished = f"finished in {time.monotonic() - began:.0f}s"
    else:
        with LocalStack(pg_settings=args.pg_settings) as stack:
            os.environ.update(stack.env())
            results, costs, dsn = asyncio.run(run_all(stack, args))
            if args.keep_warehouse:
                keep_warehouse(stack, dsn, Path(args.keep_warehouse), args.pg_settings)
        finished = f"finished in {time.monotonic() - began:.0f}s"
    load = "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    settings = ", ".join(f"{k}={v}" for k, v in {**BASE_SETTINGS, **args.pg_settings}.items())
    lines = [
        "# Performance as the warehouse grows",
        "",
        f"`python -m bench.scale --sizes {args.sizes} --days {args.days}` "
        f"(`make bench-scale`), {datetime.now(UTC):%Y-%m-%d}.",
        "",
        f"Machine: {procs.machine()}; {finished} ({load}).",
        "",
        f"PostgreSQL (a throwaway cluster): {settings}.",
        "",
    ]
    rendered = [t.render() for t in [*tables(results), *([costs] if costs else [])]]
    if args.output != "-":
        output = Path(args.output)
        names = charts(results, output.parent / "performance")
        lines += [*(f"![{n}](performance/{n})" for n in names), ""]
    text = "\n".join(lines) + "\n" + "\n\n".join(rendered) + "\n"
    print(text)
    if args.output != "-":
        Path(args.output).write_text(text)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
