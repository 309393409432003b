"""End to end on the local stack: `das-ingest run` from a filled stream to committed rows.

Each measured run gets a fresh, migrated database and reads the stream from TRIM_HORIZON, so one
filled stream serves every run (ours with and without signature verification, repeats, and the
reference consumer, which only reads).

Time of a worker run: from just before the ``das-ingest run`` subprocess is spawned (imports,
pool start-up and lease taking included) to the start of the last commit. A commit's time is
the start of its transaction, ``created_at`` of its integrity-chain link (one per committed
batch, written after the batch was decoded; its COPY and commit take a few ms more); a run
without the chain falls back to ``ingested_at``, when each batch was decoded. The worker is
stopped with SIGTERM once every shard's checkpoint reached the last record put; that wait is
not counted.

``steady`` is the rate from the first commit to the last, start-up excluded: the events of the
commits that started in that span, the last one excluded, over the span (start to start). A
pipeline that commits B events every T seconds measures B/T; a last batch of any size does not
change it, and a small first batch (the pipeline filling up) makes it read low, never high.
(The earlier definition counted the last batch's events but timed only up to the start of its
decode, which overstated short runs.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench import procs
from bench.workload import Workload, put_batch
from das_dev.devstack import LocalStack, free_port
from ingest.emulate.producer import Entry
from ingest.warehouse.migrate import migrate

#: Every worker run: what tests/fleet.py uses, so leases are taken within a second or two.
WORKER_ARGS = ("--lease-seconds", "3", "--shard-sync-seconds", "2", "--shutdown-deadline", "10")
RSS_INTERVAL = 0.1


@dataclass
class WorkerRun:
    events: int
    records: int
    seconds: float
    #: from spawning the worker to its first commit (start-up: interpreter, pool, leases)
    first_commit_seconds: float
    steady_events_per_second: float
    peak_rss_bytes: int
    kms_calls: int | None
    exit_code: int
    log_tail: list[str] = field(default_factory=list)
    #: CPU seconds of the worker and its decode processes, from spawn to exit (idle polling
    #: after the last commit included), and of the stack's PostgreSQL meanwhile: less
    #: disturbed by other work on the machine than the rates
    worker_cpu_seconds: float = 0.0
    postgres_cpu_seconds: float = 0.0
    #: CPU of every party (PARTIES) in the steady window: from the first commit to the last,
    #: with the events of ``steady_events_per_second``
    steady_cpu: procs.CpuWindow | None = None
    #: the machine's 1-minute load average when the run ended
    load_average: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


async def fresh_database(stack: LocalStack) -> str:
    assert stack.postgres is not None
    name = f"bench_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = stack.postgres.dsn_for(name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return dsn


async def drop_database(stack: LocalStack, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


#: What a bench removes from its environment before it starts the local stack: a developer's
#: real AWS profile, session or endpoint must not leak into the runs.
STRAY_AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
)


def drop_stray_aws_variables() -> None:
    """Remove STRAY_AWS_VARIABLES from this process's environment (and its children's)."""
    for stray in STRAY_AWS_VARIABLES:
        os.environ.pop(stray, None)


def worker_command(python: str | None, args: Sequence[str]) -> list[str]:
    """``das-ingest ARGS`` as ``python -P -m ingest ARGS`` (default: this interpreter). ``-P``:
    the worker imports ``ingest`` from that interpreter's install, never from the bench's
    working directory (a checkout's own ``ingest`` would shadow another build's)."""
    return [python or sys.executable, "-P", "-m", "ingest", *args]


class _Worker:
    """A `das-ingest run` subprocess with its stderr read, RSS sampled and /metrics scraped
    once, at the end."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        metrics_port: int,
        stream: str = "",
        servers: Mapping[int, str] | None = None,
    ) -> None:
        self.process = process
        self.stream = stream
        self.metrics_port = metrics_port
        self.lines: list[str] = []
        self.peak_rss = 0
        #: the roots of the parties whose CPU is sampled besides the worker (pid -> party)
        self.servers = dict(servers or {})
        self.cpu_samples: list[procs.CpuSample] = []
        self.kms_calls: int | None = None
        # /metrics is scraped once, at the end (run_worker): rendering it costs the worker's
        # event loop a few ms each time, which a scrape every 0.5 s took from the measurement.
        self._tasks = [
            asyncio.ensure_future(self._read()),
            asyncio.ensure_future(self._sample()),
        ]

    @classmethod
    async def start(
        cls,
        stream: str,
        dsn: str,
        extra: Sequence[str],
        processes: int,
        servers: Mapping[int, str] | None = None,
        python: str | None = None,
    ) -> _Worker:
        """``python``: the interpreter to run ``-m ingest`` with (default: this one)."""
        port = free_port()
        args = [
            "run",
            "--stream",
            stream,
            "--dsn",
            dsn,
            "--worker-id",
            "bench",
            "--processes",
            str(processes),
            "--metrics-port",
            str(port),
            *WORKER_ARGS,
            *extra,
        ]
        process = await asyncio.create_subprocess_exec(
            *worker_command(python, args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process, port, stream, servers)

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            if os.environ.get("DAS_BENCH_ECHO"):
                sys.stderr.write(line.decode(errors="replace"))

    async def _sample(self) -> None:
        """Every RSS_INTERVAL: the tree's resident memory, and the CPU seconds of every party
        (see :func:`party_roots`), from a walk of all of /proc (a few ms of the bench's CPU,
        shown as its own party). A process started since the last sample is counted from this
        one on, its CPU so far included (at most one interval's); one that exits moves into its
        parent's reaped children's time. (Reading only the processes a walk found, and walking
        once a second, charged a process started in between with up to a second of CPU it used
        before the window: the quick bench's parties once summed to 256% of the machine.)"""
        page = os.sysconf("SC_PAGE_SIZE")
        me = os.getpid()
        while self.process.returncode is None:
            snap = procs.snapshot()
            snap = {p: snap[p] for p in self._parties_pids(snap, me)}
            pids = procs.tree(snap, self.process.pid)
            self.peak_rss = max(self.peak_rss, sum(snap[p].rss_pages for p in pids) * page)
            roots = party_roots(snap, self.process.pid, me, self.servers)
            self.cpu_samples.append(
                procs.cpu_sample(snap, roots, own_only=(me, self.process.pid), parties=PARTIES)
            )
            await asyncio.sleep(RSS_INTERVAL)

    def _parties_pids(self, snap: Mapping[int, procs.ProcStat], me: int) -> set[int]:
        """The processes of every party in a snapshot of all of them: this one, and the trees
        of the worker and of the servers."""
        found = {me}
        for root in (self.process.pid, *self.servers):
            found.update(procs.tree(snap, root))
        return found

    async def scrape(self, session: aiohttp.ClientSession | None = None) -> None:
        """Read das_kms_calls_total from the worker's /metrics (the coordinator refreshes it
        once per cycle, lease_seconds / 3)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        own = session is None
        session = session or aiohttp.ClientSession()
        try:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    found = _sample_value(await resp.text(), "das_kms_calls_total")
                    if found is not None:
                        self.kms_calls = found
        finally:
            if own:
                await session.close()

    def summary(self) -> dict[str, Any]:
        for line in reversed(self.lines):
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict) and entry.get("msg") == "worker stopped":
                    return entry
        return {}

    async def wait(self, limit_seconds: float) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), limit_seconds)
        except TimeoutError:
            self.kill()
            await self.process.wait()
            raise TimeoutError(
                f"das-ingest run did not finish in {limit_seconds:.0f}s; last log lines:\n"
                + "\n".join(self.lines[-10:])
            ) from None
        finally:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        return code

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)


WORKER_MAIN = "worker main process"
DECODE = "decode processes"
KINESALITE = "kinesalite"
POSTGRES = "PostgreSQL"
MOTO = "moto (KMS)"
BENCH = "bench process"
#: The parties of a worker run's CPU accounting, in the table's order.
PARTIES = (WORKER_MAIN, DECODE, KINESALITE, POSTGRES, MOTO, BENCH)
#: the parties that stand for services (Kinesis, the warehouse, KMS)
SERVERS = (KINESALITE, POSTGRES, MOTO)


def stack_roots(stack: LocalStack) -> dict[int, str]:
    """The local stack's server processes by party (their children follow them)."""
    roots: dict[int, str] = {}
    for server, party in ((stack.kinesis, KINESALITE), (stack.postgres, POSTGRES)):
        if server is not None:
            roots.update(dict.fromkeys(server.pids(), party))
    if stack.kms is not None:
        roots.update(dict.fromkeys(stack.kms.pids(), MOTO))
    return roots


def party_roots(
    snap: Mapping[int, procs.ProcStat], worker: int, bench: int, servers: Mapping[int, str]
) -> dict[int, str]:
    """pid -> party for one snapshot: the worker's process itself, each of its children (the
    decode processes; the pool's resource tracker, idle, with them), the servers, and this
    process (the bench: polling the lease table, sampling)."""
    roots = {bench: BENCH, **servers, worker: WORKER_MAIN}
    roots.update({pid: DECODE for pid, stat in snap.items() if stat.ppid == worker})
    return roots


def _sample_value(text: str, name: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return None


async def run_worker(
    stack: LocalStack,
    workload: Workload,
    *,
    worker_args: Sequence[str] = (),
    processes: int = 2,
    limit_seconds: float = 1800.0,
    dsn: str | None = None,
    python: str | None = None,
) -> WorkerRun:
    """`das-ingest run` over the filled stream into a fresh database, until every shard's
    checkpoint reached the last record put; then SIGTERM.

    ``worker_args`` are extra flags for the worker (``--skip-signature-verification``, or the
    integrity chain's flags once it exists): this is the hook to measure any option with and
    without.

    Not ``--stop-when-idle``: it counts a shard as idle as soon as the prefetched next page
    comes back empty, while the page in hand may still be decoding; on a big backlog the worker
    then stops before it stored everything (see README "Performance").

    ``dsn``: into this (migrated, possibly full) warehouse instead of a fresh database; only
    the workload's stream is counted, and the database is kept.

    ``python``: run the worker with this interpreter, e.g. another checkout's virtualenv (a
    PYTHONPATH does not override an editable install: use the other checkout's own Python).
    """
    last_put = _last_sequence_numbers(workload)
    keep = dsn is not None
    dsn = dsn or await fresh_database(stack)
    postgres_pids = stack.postgres.pids() if stack.postgres is not None else []
    try:
        cpu_before = _children_cpu()
        postgres_before = procs.tree_cpu_seconds(postgres_pids)
        started = time.time()
        worker = await _Worker.start(
            workload.stream, dsn, list(worker_args), processes, stack_roots(stack), python
        )
        try:
            await _until_checkpointed(dsn, worker, last_put, limit_seconds)
            # Let one coordinator cycle (1 s with --lease-seconds 3) publish the KMS counter.
            await asyncio.sleep(1.5)
            await worker.scrape()
        finally:
            worker.terminate()
        code = await worker.wait(60)
        worker_cpu = _children_cpu() - cpu_before
        postgres_cpu = procs.tree_cpu_seconds(postgres_pids) - postgres_before
        conn = await asyncpg.connect(dsn)
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS n FROM das.activity_events WHERE stream_name = $1",
                workload.stream,
            )
            commits = await commit_times(conn, workload.stream)
        finally:
            await conn.close()
    finally:
        if not keep:
            await drop_database(stack, dsn)
    assert row is not None
    events = int(row["n"])
    if code != 0 or events != workload.events or not commits:
        raise RuntimeError(
            f"das-ingest run exited {code} with {events} of {workload.events} events stored; "
            "last log lines:\n" + "\n".join(worker.lines[-10:])
        )
    first, last = commits[0][0], commits[-1][0]
    summary = worker.summary()
    return WorkerRun(
        events=events,
        records=int(summary.get("records", workload.records)),
        seconds=last - started,
        first_commit_seconds=first - started,
        steady_events_per_second=steady_rate(commits),
        peak_rss_bytes=worker.peak_rss,
        kms_calls=worker.kms_calls,
        exit_code=code,
        log_tail=worker.lines[-5:],
        worker_cpu_seconds=worker_cpu,
        postgres_cpu_seconds=postgres_cpu,
        steady_cpu=steady_cpu(worker.cpu_samples, commits),
        load_average=os.getloadavg()[0],
    )


#: The shortest steady window whose CPU is accounted (200 ticks of 2 cores: about 3% for the
#: six parties' rounding together).
MIN_CPU_WINDOW_SECONDS = 1.0


def steady_cpu(
    samples: Sequence[procs.CpuSample], commits: Sequence[tuple[float, int]]
) -> procs.CpuWindow | None:
    """The parties' CPU over the steady window (:func:`steady_rate`'s span and events); None
    when the window is shorter than MIN_CPU_WINDOW_SECONDS: /proc counts CPU in 10 ms ticks,
    and over a window of a few of them six parties' shares are noise (a quick run's windows of
    ~0.0 s summed to 111-256% of the machine)."""
    if len(commits) < 2 or len(samples) < 2:
        return None
    if commits[-1][0] - commits[0][0] < MIN_CPU_WINDOW_SECONDS:
        return None
    events = sum(n for _, n in commits[:-1])
    return procs.cpu_window(samples, commits[0][0], commits[-1][0], events)


async def commit_times(conn: asyncpg.Connection, stream: str) -> list[tuple[float, int]]:
    """(start of the transaction, events) of every commit of ``stream``, in time order: the
    integrity chain's links, or, without the chain, the events grouped by ``ingested_at``."""
    rows = await conn.fetch(
        "SELECT extract(epoch FROM created_at)::float8 AS at, sum(event_count)::bigint AS n "
        "FROM das.chain_links WHERE stream_name = $1 AND kind = 'batch' GROUP BY 1 ORDER BY 1",
        stream,
    )
    if not rows:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM ingested_at)::float8 AS at, count(*) AS n "
            "FROM das.activity_events WHERE stream_name = $1 GROUP BY 1 ORDER BY 1",
            stream,
        )
    return [(float(r["at"]), int(r["n"])) for r in rows]


def steady_rate(commits: Sequence[tuple[float, int]]) -> float:
    """Events per second from the first commit to the last: the events of every commit but the
    last over the time between their starts (see the module's docstring)."""
    if len(commits) < 2:
        return 0.0
    span = commits[-1][0] - commits[0][0]
    return sum(n for _, n in commits[:-1]) / span if span > 0 else 0.0


def _children_cpu() -> float:
    """CPU seconds of this process's exited and reaped children (and theirs: the worker reaps
    its decode processes)."""
    used = os.times()
    return used.children_user + used.children_system


def _last_sequence_numbers(workload: Workload) -> dict[str, int]:
    last: dict[str, int] = {}
    for shard_id, sequence_number in workload.put_times:
        last[shard_id] = max(last.get(shard_id, 0), int(sequence_number))
    return last


async def _until_checkpointed(
    dsn: str, worker: _Worker, last_put: dict[str, int], limit_seconds: float
) -> None:
    """Poll the lease table (cheap, unlike counting rows) until every shard is done."""
    deadline = time.monotonic() + limit_seconds
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT shard_id, checkpoint FROM das.leases WHERE stream_name = $1",
                worker.stream,
            )
            done = {
                r["shard_id"]
                for r in rows
                if r["checkpoint"].isdigit()
                and int(r["checkpoint"]) >= last_put.get(r["shard_id"], 0)
            }
            if set(last_put) <= done:
                # Kinesalite shards that received nothing have no checkpoint to wait for.
                return
            if worker.process.returncode is not None:
                raise RuntimeError("das-ingest run exited early:\n" + "\n".join(worker.lines[-10:]))
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every shard was checkpointed in {limit_seconds:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


@dataclass
class LatencyRun:
    rate: float
    records: int
    events: int
    p50: float
    p99: float
    max: float
    peak_rss_bytes: int


async def run_latency(
    stack: LocalStack,
    kinesis: Any,
    workload: Workload,
    *,
    rate: float,
    worker_args: Sequence[str] = (),
    processes: int = 2,
    limit_seconds: float = 600.0,
    dsn: str | None = None,
) -> LatencyRun:
    """Put ``workload`` at ``rate`` events/s while a worker runs; latency = put -> committed.

    The put time is taken just before the record's PutRecords call is sent; the commit time is
    the ``ingested_at`` of its rows (when the decoder encoded the batch, just before its
    transaction). Records are put in ticks of 50 ms. ``dsn``: as for :func:`run_worker`.
    """
    keep = dsn is not None
    dsn = dsn or await fresh_database(stack)
    worker = await _Worker.start(workload.stream, dsn, list(worker_args), processes)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            deadline = time.monotonic() + 60
            while (
                await conn.fetchval(
                    "SELECT count(*) FROM das.leases WHERE owner = 'bench' AND stream_name = $1",
                    workload.stream,
                )
                < 4
            ):
                if time.monotonic() > deadline or worker.process.returncode is not None:
                    raise RuntimeError(
                        "the worker did not take the leases:\n" + "\n".join(worker.lines[-10:])
                    )
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # consumers get their iterators and start polling
            await _paced_put(kinesis, workload, rate)
            deadline = time.monotonic() + limit_seconds
            while (
                await conn.fetchval(
                    "SELECT count(*) FROM das.activity_events WHERE stream_name = $1",
                    workload.stream,
                )
                < workload.events
            ):
                if time.monotonic() > deadline or worker.process.returncode is not None:
                    raise RuntimeError("latency run did not store every event")
                await asyncio.sleep(0.5)
            rows = await conn.fetch(
                """
                SELECT shard_id, sequence_number::text AS seq,
                       extract(epoch FROM min(ingested_at)) AS at
                FROM das.activity_events WHERE stream_name = $1 GROUP BY 1, 2
                """,
                workload.stream,
            )
        finally:
            await conn.close()
        worker.terminate()
        await worker.wait(60)
    finally:
        worker.kill()
        if not keep:
            await drop_database(stack, dsn)
    latencies = sorted(float(r["at"]) - workload.put_times[(r["shard_id"], r["seq"])] for r in rows)
    return LatencyRun(
        rate=rate,
        records=len(latencies),
        events=workload.events,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        max=latencies[-1] if latencies else 0.0,
        peak_rss_bytes=worker.peak_rss,
    )


async def _paced_put(kinesis: Any, workload: Workload, rate: float) -> None:
    tick = 0.05
    started = time.monotonic()
    sent_events = 0
    pending: list[Entry] = list(workload.entries)
    index = 0
    while index < len(pending):
        due_events = (time.monotonic() - started) * rate
        batch: list[Entry] = []
        while index < len(pending) and sent_events < due_events and len(batch) < 500:
            batch.append(pending[index])
            sent_events += pending[index].events
            index += 1
        if batch:
            await put_batch(kinesis, workload, batch)
        await asyncio.sleep(tick)


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(pct) - 1))]
