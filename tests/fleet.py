"""Test helpers for the consumer: worker processes started with the real command line, streams
filled by the emulator, and exactly-once accounting against the emulator's unique event keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from ingest.emulate.producer import EmulateOptions, EmulateReport, emulate
from ingest.emulate.traffic import EventKey, format_datetime
from ingest.warehouse.migrate import migrate


async def migrated(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


def options(stream: str, **overrides: Any) -> EmulateOptions:
    base: dict[str, Any] = {
        "stream": stream,
        "create_stream": True,
        "shards": 4,
        "instances": 4,
        "events_per_record": 10,
        "count": 1000,
        "seed": 7,
        "rotate_every": 50,
    }
    base.update(overrides)
    return EmulateOptions(**base)


async def produce(opts: EmulateOptions) -> EmulateReport:
    report = await emulate(opts)
    assert report.reordered == 0  # kinesalite never throttles: production order is stream order
    return report


def expected(opts: EmulateOptions) -> list[EventKey]:
    return opts.traffic().expected_keys(opts.events_per_record, opts.count)


async def stored(dsn: str, stream_shards: bool = False) -> list[EventKey]:
    """Keys of the stored events, in commit order (per shard: sequence order)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT instance_id, pid, session_id,
                   coalesce(statement_id::text, statement_id_text) AS statement,
                   statement_id_text IS NULL AS numeric_statement,
                   substatement_id, class, log_time
            FROM das.activity_events ORDER BY ingested_at, sequence_number, event_index
            """
        )
    finally:
        await conn.close()
    return [
        EventKey(
            r["instance_id"],
            r["pid"],
            r["session_id"],
            # SQL Server's hex statementId is text; every other engine's a number
            int(r["statement"]) if r["numeric_statement"] and r["statement"] else r["statement"],
            r["substatement_id"],
            r["class"],
            format_datetime(r["log_time"]),
        )
        for r in rows
    ]


def assert_exactly_once(got: list[EventKey], want: list[EventKey]) -> None:
    counts = Counter(got)
    duplicated = {k: n for k, n in counts.items() if n > 1}
    missing = set(want) - set(counts)
    unexpected = set(counts) - set(want)
    assert not duplicated, f"{len(duplicated)} events stored more than once"
    assert not missing, f"{len(missing)} of {len(want)} events missing"
    assert not unexpected, f"{len(unexpected)} events nobody produced"
    assert len(got) == len(want)


def assert_order_per_instance(got: list[EventKey], want: list[EventKey]) -> None:
    """Events of one partition key (instance) were committed in the order they were produced."""
    for instance in {k.instance_id for k in want}:
        produced = [k for k in want if k.instance_id == instance]
        committed = [k for k in got if k.instance_id == instance]
        assert committed == produced, f"order differs for {instance}"


@dataclass
class WorkerProcess:
    name: str
    process: asyncio.subprocess.Process
    #: the JSON log entries
    lines: list[dict[str, Any]] = field(default_factory=list)
    #: the last lines of stderr as text (tracebacks included)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    #: everything it wrote on stderr, as text (for the scans for SQL and key material)
    raw: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def output(self) -> str:
        return "".join(self.raw)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            text = line.decode("utf-8", "replace")
            self.raw.append(text)
            self.tail.append(text.rstrip())
            with contextlib.suppress(orjson.JSONDecodeError):
                self.lines.append(orjson.loads(line))
            if os.environ.get("DAS_TEST_ECHO"):
                sys.stderr.write(f"[{self.name}] {line.decode()}")

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [entry for entry in self.lines if entry.get("msg") == msg]

    async def wait(self, deadline: float) -> int:
        code = await asyncio.wait_for(self.process.wait(), deadline)
        if self._reader is not None:
            # Children that outlive the worker would hold stderr open: that is a bug too.
            await asyncio.wait_for(self._reader, 10)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGINT)

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)

    def stopped_summary(self) -> dict[str, Any]:
        found = self.logged("worker stopped")
        assert found, f"{self.name} did not log its summary"
        return found[-1]


class Fleet:
    """Worker processes of one test; whatever is still running at teardown is killed."""

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []

    async def start(
        self, name: str, stream: str, dsn: str, *extra: str, env: dict[str, str] | None = None
    ) -> WorkerProcess:
        """``env`` overrides variables for this worker only (e.g. a proxy's endpoint)."""
        worker = await start_worker(name, stream, dsn, *extra, env=env)
        self.workers.append(worker)
        return worker

    async def start_args(self, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        """A worker from a full ``das-ingest`` argument list (e.g. ``run --cluster ...``)."""
        name = args[args.index("--worker-id") + 1] if "--worker-id" in args else "worker"
        worker = await spawn(name, list(args), env)
        self.workers.append(worker)
        return worker

    async def close(self) -> None:
        for worker in self.workers:
            if worker.process.returncode is None:
                worker.kill()
                await worker.process.wait()
            if worker._reader is not None and not worker._reader.done():
                worker._reader.cancel()
                await asyncio.gather(worker._reader, return_exceptions=True)


def new_stream() -> str:
    return f"aws-rds-das-cluster-{secrets.token_hex(6).upper()}"


async def start_worker(
    name: str, stream: str, dsn: str, *extra: str, env: dict[str, str] | None = None
) -> WorkerProcess:
    args = [
        "run",
        "--stream",
        stream,
        "--dsn",
        dsn,
        "--worker-id",
        name,
        "--lease-seconds",
        "3",
        "--shard-sync-seconds",
        "2",
        "--shutdown-deadline",
        "10",
        *extra,
    ]
    return await spawn(name, args, env)


async def spawn(name: str, args: list[str], env: dict[str, str] | None = None) -> WorkerProcess:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    worker = WorkerProcess(name, process)
    worker._reader = asyncio.ensure_future(worker._read())
    return worker


def default_worker_id(worker: WorkerProcess) -> str:
    """The id a worker started without --worker-id has: host:pid."""
    return f"{socket.gethostname()}:{worker.pid}"


async def lease_owners(dsn: str, stream: str) -> dict[str, tuple[str | None, int]]:
    """shard -> (owner of a live lease or None, lease counter), for the open shards."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT shard_id, lease_counter,
                   CASE WHEN expires_at > now() THEN owner END AS owner
            FROM das.leases WHERE stream_name = $1 AND checkpoint <> 'SHARD_END'
            """,
            stream,
        )
    finally:
        await conn.close()
    return {r["shard_id"]: (r["owner"], r["lease_counter"]) for r in rows}


@dataclass
class SteadyProducer:
    """Produces into an existing stream at ``rate`` events per second until stopped, in chunks
    of ``chunk`` events with seeds of their own (each event stays unique)."""

    stream: str
    rate: float
    chunk: int = 1000
    seed: int = 1000
    overrides: dict[str, Any] = field(default_factory=dict)
    chunks: list[EmulateOptions] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            opts = options(
                self.stream,
                count=self.chunk,
                seed=self.seed + len(self.chunks),
                create_stream=False,
                rate=self.rate,
                **self.overrides,
            )
            self.chunks.append(opts)
            await produce(opts)

    async def stop(self) -> None:
        """Stop after the chunk being produced (which is then complete)."""
        self._stop.set()
        if self._task is not None:
            await self._task

    def expected(self) -> list[EventKey]:
        return [key for opts in self.chunks for key in expected(opts)]


async def committed_events(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM das.activity_events"))
    finally:
        await conn.close()


async def wait_until(predicate: Any, deadline: float, interval: float = 0.2) -> None:
    """Poll ``predicate`` (an async callable) until it is true; TimeoutError after ``deadline``."""
    async with asyncio.timeout(deadline):
        while not await predicate():  # noqa: ASYNC110 - polling another process's database
            await asyncio.sleep(interval)
