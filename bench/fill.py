"""Filling a warehouse fast, honestly: events as the decode path stores them, with their links.

The emulator's traffic (PostgreSQL and MySQL instances: users, sessions, objects, failed logins
and statements, DDL, MAIN/AUX statements) is generated per UTC day over ``days`` day partitions,
normalized and COPY-encoded by the decode layer's own functions (``decode_payload``,
``copyfmt.encode_events``; the same calls ``decode_batch`` makes after decrypting and gunzipping),
its digests filed per day as ``decode_batch`` does, and committed through the :class:`Sink`:
COPY, the statements merge and a chain link per batch, under a lease, in one transaction each.
Only the Encryption SDK and gzip are skipped (they cost ~1 ms a record and change nothing
stored). ``verify`` finds such a warehouse clean (``tests/test_bench_scale.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from hashlib import sha256

import asyncpg
import orjson

from ingest.decode import copyfmt
from ingest.decode.correlate import StatementRange, StatementRangeBuilder
from ingest.decode.normalize import decode_payload
from ingest.emulate import traffic
from ingest.integrity.canonical import DayDigests, utc_date
from ingest.lease import LeaseToken, ShardInfo
from ingest.warehouse.leases import LeaseStore
from ingest.warehouse.sink import CopyUnit, DeadLetter, Sink, init_connection

STREAM = "aws-rds-das-cluster-SCALEFILL"
SHARDS = tuple(f"shardId-{i:012d}" for i in range(4))
#: Kinesis-like sequence numbers: 56 digits, increasing per shard.
SEQUENCE_BASE = 49590338271490256608559692538361571095921575989136588898
#: Records per chain link (one Kinesis batch), and events per record.
RECORDS_PER_BATCH = 100
EVENTS_PER_RECORD = 10
#: One record in this many is dead-lettered (kept raw, listed by its link).
DEAD_LETTER_EVERY = 20_000


@dataclass(frozen=True)
class Task:
    """One day's share of a fill step: ``events`` record events on ``day`` (seeded)."""

    day: date
    seed: int
    events: int
    #: per shard, the first sequence number this task may use (a block of its own)
    first_sequence: int
    #: records per chain link (one Kinesis batch)
    records_per_batch: int = RECORDS_PER_BATCH


@dataclass
class Batch:
    shard_id: str
    first: str
    last: str
    events: bytes
    count: int
    chain: dict[str, bytes]
    days: set[date]
    statements: StatementRange | None
    dead_letters: list[tuple[str, bytes]] = field(default_factory=list)


def encode_task(task: Task) -> list[Batch]:
    """Process-pool entry point: the day's traffic as COPY-ready batches, per shard."""
    # The emulator's traffic starts on its base day; each day's share starts on its own day.
    traffic._BASE_EPOCH_US = int(
        datetime(task.day.year, task.day.month, task.day.day, tzinfo=UTC).timestamp() * 1e6
    )
    flow = traffic.Traffic(task.seed, "both", cluster_id="cluster-SCALEFILL", instances=4)
    records = flow.records(EVENTS_PER_RECORD, task.events)
    per_shard: dict[str, list[tuple[str, bytes, str]]] = {s: [] for s in SHARDS}
    sequence = dict.fromkeys(SHARDS, task.first_sequence)
    for n, inner in enumerate(records):
        shard = SHARDS[flow.instance_ids.index(inner.instance_id) % len(SHARDS)]
        seq = sequence[shard]
        sequence[shard] += 1
        per_shard[shard].append((str(seq), orjson.dumps(inner.doc), inner.version))
        if n % DEAD_LETTER_EVERY == DEAD_LETTER_EVERY - 1:
            per_shard[shard].append((str(seq + 1), b"not a record", ""))
            sequence[shard] += 1
    batches: list[Batch] = []
    ingested_at = datetime.now(UTC)
    for shard, items in per_shard.items():
        batches.extend(
            _encode(shard, items[i : i + task.records_per_batch], ingested_at)
            for i in range(0, len(items), task.records_per_batch)
        )
    return batches


def _encode(shard: str, items: list[tuple[str, bytes, str]], ingested_at: datetime) -> Batch:
    """What decode_batch does after decrypt and gunzip (see ingest/decode/batch.py)."""
    chunks: list[bytes] = []
    digests = DayDigests()
    statements = StatementRangeBuilder(shard)
    days: set[date] = set()
    count = 0
    letters: list[tuple[str, bytes]] = []
    for sequence_number, doc, version in items:
        if not version:
            letters.append((sequence_number, doc))
            continue
        record = decode_payload(doc, version)
        if not record.events:
            continue
        data, n = copyfmt.encode_events(((record, shard, sequence_number),), ingested_at, STREAM)
        chunks.append(data)
        count += n
        statements.add(record, sequence_number)
        lines = data.split(b"\n")
        for k, event in enumerate(record.events):
            if event.log_time is None:
                day = "none"
            else:
                days.add(utc_date(event.log_time))
                day = utc_date(event.log_time).isoformat()
            line = lines[k]
            if line.endswith(copyfmt.NULL_FINGERPRINT):
                # no fingerprint (no policy): not part of the encoding, as in decode_batch
                line = line[: -len(copyfmt.NULL_FINGERPRINT)]
            digests.add(day, sha256(line).digest())
    return Batch(
        shard,
        items[0][0],
        items[-1][0],
        b"".join(chunks),
        count,
        digests.packed(),
        days,
        statements.build(),
        letters,
    )


@dataclass
class FillStats:
    events: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: commit time (COPY + statements merge + link) of the last step's batches, seconds
    commit_seconds: list[float] = field(default_factory=list)


class Filler:
    """Grows one warehouse step by step to the sizes asked for."""

    def __init__(
        self,
        dsn: str,
        *,
        days: int,
        last_day: date,
        processes: int,
        records_per_batch: int = RECORDS_PER_BATCH,
    ) -> None:
        self.dsn = dsn
        self.records_per_batch = records_per_batch
        self.days = [last_day - timedelta(days=days - 1 - i) for i in range(days)]
        self.processes = processes
        self.stats = FillStats()
        self._step = 0
        self._next_sequence = SEQUENCE_BASE
        self._checkpoints = dict.fromkeys(SHARDS, "TRIM_HORIZON")
        self._pool: asyncpg.Pool | None = None
        self._tokens: dict[str, LeaseToken] = {}

    async def _start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=2, init=init_connection
        )
        assert self._pool is not None
        store = LeaseStore(self._pool, STREAM, lease_seconds=86_400)
        await store.sync_shards([ShardInfo(s, ()) for s in SHARDS], "TRIM_HORIZON")
        for lease in await store.all_leases():
            taken = await store.take(lease, "filler")
            assert taken is not None
            self._tokens[lease.shard_id] = LeaseToken(
                STREAM, lease.shard_id, "filler", taken.lease_counter
            )

    def drop_day(self, day: date) -> None:
        """Retention removed ``day``: fill no more events into it."""
        self.days = [d for d in self.days if d != day]

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def fill_to(
        self, total: int, progress: bool = True, records_per_batch: int | None = None
    ) -> None:
        """Add events until the warehouse holds about ``total`` of this filler's events, in
        links of ``records_per_batch`` records (default: the filler's)."""
        per_batch = records_per_batch or self.records_per_batch
        missing = total - self.stats.events
        if missing <= 0:
            return
        if self._pool is None:
            await self._start()
        assert self._pool is not None
        self._step += 1
        per_day = max(1, missing // len(self.days))
        tasks = []
        for i, day in enumerate(self.days):
            tasks.append(Task(day, self._step * 1000 + i, per_day, self._next_sequence, per_batch))
            self._next_sequence += per_day * 2 + 10  # room for every record and dead letter
        # A warehouse filled over time created each day's partition on that day.
        sink = Sink(self._pool, partition_window=(len(self.days) + 2, 2))
        started = time.perf_counter()
        commits: list[float] = []
        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(
            self.processes, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            # A few days encoded ahead, no more: a day's batches are ~0.5 GB at 20M events, and
            # holding every day's (all submitted at once, each kept by its future) grew this
            # process to 11.8 GB at 19M events, until the kernel's OOM killer ended the run.
            waiting = iter(tasks)
            ahead: deque[asyncio.Future[list[Batch]]] = deque(
                loop.run_in_executor(pool, encode_task, t)
                for t in itertools.islice(waiting, self.processes + 1)
            )
            n = -1
            while ahead:
                n += 1
                batches = await ahead.popleft()
                for task in itertools.islice(waiting, 1):
                    ahead.append(loop.run_in_executor(pool, encode_task, task))
                while batches:
                    batch = batches.pop(0)
                    began = time.perf_counter()
                    await self._commit(sink, batch)
                    commits.append(time.perf_counter() - began)
                    self.stats.events += batch.count
                    self.stats.batches += 1
                if progress:
                    print(
                        f"  fill: day {n + 1}/{len(tasks)}, {self.stats.events:,} events",
                        end="\r",
                        flush=True,
                    )
        if progress:
            print()
        self.stats.seconds += time.perf_counter() - started
        self.stats.commit_seconds = commits

    async def _commit(self, sink: Sink, batch: Batch) -> None:
        await sink.ensure_partitions(batch.days)
        letters = [
            DeadLetter(seq, None, None, "json", "bench: not a DAS record", raw)
            for seq, raw in batch.dead_letters
        ]
        await sink.commit(
            self._tokens[batch.shard_id],
            previous_checkpoint=self._checkpoints[batch.shard_id],
            new_checkpoint=batch.last,
            units=[CopyUnit(batch.events, batch.statements, chain=batch.chain)],
            dead_letters=letters,
            sequence_range=(batch.first, batch.last),
        )
        self._checkpoints[batch.shard_id] = batch.last
