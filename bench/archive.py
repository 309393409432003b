"""The archive's bench (opt-in: ``python -m bench --archive-events 1000000``).

A fresh warehouse is filled with the emulator's Aurora PostgreSQL traffic (100 events per
record, all of one UTC day, two shards), decoded and committed the way workers do (so the
chain is real) and anchored; then ``das-ingest archive`` runs as a process against the stack's
S3 (moto) while its RSS is sampled, and ``das-ingest verify --archive`` after it.

Measured: archive throughput (rows/s, writing plus the read-back verification the command does
before it records a day), verify --archive throughput, bytes per event in Parquet against the
day partition in PostgreSQL (table, TOAST and indexes), and the archive process's peak RSS.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg
import boto3
import orjson

from bench import procs
from bench.e2e import drop_database, fresh_database
from bench.encoder import FastEncryptor
from bench.report import Table, num
from das_dev.devstack import LocalStack
from ingest.aws import aws_client
from ingest.decode.batch import BatchInput, DecoderConfig, KeyedRecord, decode_batch
from ingest.emulate.encoder import encode_payload
from ingest.emulate.traffic import Traffic
from ingest.integrity.anchor import AnchorKey, anchor_heads
from ingest.lease import LeaseToken, ShardInfo
from ingest.warehouse.leases import LeaseStore
from ingest.warehouse.sink import CopyUnit, Sink, init_connection

STREAM = "aws-rds-das-cluster-BENCHARCHIVE"
SHARDS = ("shardId-000000000000", "shardId-000000000001")
#: Records per committed batch (one chain link each).
BATCH_RECORDS = 50
#: The archive's peak RSS must stay under this, whatever the day's size.
RSS_LIMIT = 400 * 1024 * 1024


@dataclass
class ArchiveBench:
    table: Table
    checks: list[str]
    ok: bool


async def _fill(dsn: str, events: int) -> tuple[date, int]:
    """``events`` record events of one UTC day, committed as workers would; (day, events)."""
    traffic = Traffic(seed=14, engine="postgres", instances=2)
    key = os.urandom(32)
    encryptor = FastEncryptor()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    assert pool is not None
    day: date | None = None
    stored = 0
    try:
        sink = Sink(pool)
        tokens, checkpoints, sequence = [], [], []
        for shard in SHARDS:
            store = LeaseStore(pool, STREAM, lease_seconds=3600)
            await store.sync_shards([ShardInfo(shard, ())], "TRIM_HORIZON")
            lease = {x.shard_id: x for x in await store.all_leases()}[shard]
            taken = await store.take(lease, "bench")
            assert taken is not None
            tokens.append(LeaseToken(STREAM, shard, "bench", taken.lease_counter))
            checkpoints.append("TRIM_HORIZON")
            sequence.append(10**20)
        config = DecoderConfig(decryptor="lean", verify_signatures=False)
        pending: list[bytes] = []
        batch_no = 0

        async def commit(records: list[bytes]) -> int:
            nonlocal day, batch_no
            i = batch_no % len(SHARDS)
            batch_no += 1
            first = sequence[i]
            items = [KeyedRecord(n, str(first + n), raw, key) for n, raw in enumerate(records)]
            sequence[i] += len(records)
            output = decode_batch(BatchInput(SHARDS[i], items, config, stream_name=STREAM))
            if output.failures:
                raise RuntimeError(f"bench records failed to decode: {output.failures[0]}")
            async with pool.acquire() as conn:
                for d in output.days:
                    await conn.execute("SELECT das.ensure_partition($1)", d)
            day = day or min(output.days)
            last = str(first + len(records) - 1)
            await sink.commit(
                tokens[i],
                previous_checkpoint=checkpoints[i],
                new_checkpoint=last,
                units=[CopyUnit(output.events, output.statements, chain=output.chain)],
                sequence_range=(str(first), last),
            )
            checkpoints[i] = last
            return output.event_count

        for record in traffic.records(100, events):
            if record.record_events == 0:
                continue  # heartbeats only: nothing to archive
            raw = encode_payload(orjson.dumps(record.doc), record.version, key, b"k", encryptor)
            pending.append(raw)
            if len(pending) == BATCH_RECORDS:
                stored += await commit(pending)
                pending = []
        if pending:
            stored += await commit(pending)
    finally:
        await pool.close()
    assert day is not None
    return day, stored


async def _run(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``das-ingest *argv``; (seconds, peak RSS of its process tree, stdout)."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingest", *argv, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    peak = 0
    communicate = asyncio.ensure_future(process.communicate())
    while not communicate.done():
        peak = max(peak, procs.tree_rss_bytes(process.pid))
        await asyncio.wait({communicate}, timeout=0.1)
    out, err = communicate.result()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"das-ingest {argv[0]} exited {process.returncode}: {err.decode()}")
    return seconds, peak, out.decode()


async def run_archive_bench(stack: LocalStack, events: int) -> ArchiveBench:
    table = Table(
        f"Archive: one UTC day of {events:,} events (100/record, 2 shards) to Parquet on S3 (moto)",
        ["step", "events", "seconds", "events/s", "peak RSS MB"],
    )
    checks: list[str] = []
    dsn = await fresh_database(stack)
    try:
        began = time.perf_counter()
        day, stored = await _fill(dsn, events)
        table.add("fill the warehouse (decode + COPY + chain)", num(stored),
                  f"{time.perf_counter() - began:.1f}", "-", "-")  # fmt: skip
        kms = boto3.client("kms", endpoint_url=stack.kms_endpoint)
        key_id = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"][
            "KeyId"
        ]
        conn = await asyncpg.connect(dsn)
        try:
            async with aws_client("kms") as client:
                await anchor_heads(conn, AnchorKey(client, key_id), STREAM)
            pg_bytes = int(
                await conn.fetchval(
                    "SELECT pg_total_relation_size($1::regclass)",
                    f"das.activity_events_p{day:%Y%m%d}",
                )
            )
            day_rows = int(
                await conn.fetchval(f"SELECT count(*) FROM das.activity_events_p{day:%Y%m%d}")
            )
        finally:
            await conn.close()
        s3 = boto3.client("s3", endpoint_url=stack.env()["AWS_ENDPOINT_URL_S3"])
        bucket = f"bench-archive-{secrets.token_hex(4)}"
        s3.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/das"
        env = {"DAS_DSN": dsn}
        before = (day + timedelta(days=1)).isoformat()
        seconds, peak, _ = await _run(
            ["archive", "--to", url, "--before", before, "--anchor-key-id", key_id], env
        )
        rows = day_rows
        table.add("das-ingest archive (write, read back, verify)", num(rows), f"{seconds:.1f}",
                  num(rows / seconds), num(peak / 2**20))  # fmt: skip
        v_seconds, v_peak, _ = await _run(
            ["verify", "--archive", url, "--anchor-key-id", key_id], env
        )
        table.add("das-ingest verify --archive", num(rows), f"{v_seconds:.1f}",
                  num(rows / v_seconds), num(v_peak / 2**20))  # fmt: skip
        parquet = files = sidecars = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", ()):
                if item["Key"].endswith(".parquet"):
                    parquet += int(item["Size"])
                    files += 1
                elif item["Key"].endswith(".digests"):
                    sidecars += int(item["Size"])
        per_pg, per_parquet = pg_bytes / day_rows, parquet / rows
        table.notes.append(
            f"Bytes per event: Parquet {per_parquet:.1f} ({files} file(s), "
            f"{parquet / 2**20:.1f} MB, zstd) against PostgreSQL {per_pg:.1f} (the day "
            f"partition with its TOAST and indexes, {pg_bytes / 2**20:.1f} MB): "
            f"{per_pg / max(per_parquet, 1e-9):.1f}x smaller. The row digests that place a "
            f"change at its row add {sidecars / rows:.1f} bytes per event."
        )
        good = peak < RSS_LIMIT
        checks.append(
            f"- Archive of a day of {rows:,} events: {rows / seconds:,.0f} events/s, peak RSS "
            f"{peak / 2**20:.0f} MB, limit {RSS_LIMIT // 2**20} MB: {'ok' if good else 'FAILED'}"
        )
        return ArchiveBench(table, checks, good)
    finally:
        await drop_database(stack, dsn)
