"""Helpers for warehouse tests: a migrated database, leases, and batches of sealed records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from ingest.decode.batch import BatchInput, BatchOutput, DecoderConfig, KeyedRecord, decode_batch
from ingest.lease import Lease, LeaseToken, ShardInfo
from ingest.warehouse.leases import LeaseStore
from ingest.warehouse.migrate import migrate
from ingest.warehouse.sink import CopyUnit, DeadLetter, Sink, init_connection
from tests.sealing import seal

KEY = os.urandom(32)
ESDK = DecoderConfig(decryptor="esdk")
STREAM = "aws-rds-das-cluster-TEST"


async def migrated_pool(dsn: str) -> asyncpg.Pool:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, init=init_connection)
    assert pool is not None
    return pool


def inner(*events: dict[str, Any], cluster: str = "cluster-TEST", instance: str = "db-1") -> bytes:
    return orjson.dumps(
        {
            "type": "DatabaseActivityMonitoringRecord",
            "clusterId": cluster,
            "instanceId": instance,
            "databaseActivityEventList": list(events),
        }
    )


def batch(
    shard_id: str,
    records: Sequence[tuple[str, bytes]],
    version: str = "1.2",
    stream: str = STREAM,
) -> BatchOutput:
    """Decode (sequence number, inner document) pairs as the process pool would."""
    items = [
        KeyedRecord(i, seq, seal(doc, KEY, version), KEY) for i, (seq, doc) in enumerate(records)
    ]
    return decode_batch(BatchInput(shard_id, items, ESDK, stream_name=stream))


async def hold_lease(
    pool: asyncpg.Pool, shard_id: str, owner: str, stream: str = STREAM
) -> tuple[LeaseToken, Lease]:
    store = LeaseStore(pool, stream, lease_seconds=30)
    await store.sync_shards([ShardInfo(shard_id, ())], "TRIM_HORIZON")
    current = {lease.shard_id: lease for lease in await store.all_leases()}[shard_id]
    taken = await store.take(current, owner)
    assert taken is not None
    return LeaseToken(stream, shard_id, owner, taken.lease_counter), taken


async def store(
    pool: asyncpg.Pool,
    token: LeaseToken,
    output: BatchOutput,
    previous: str,
    new: str,
) -> None:
    sink = Sink(pool)
    await sink.ensure_partitions(output.days)
    await sink.commit(
        token,
        previous_checkpoint=previous,
        new_checkpoint=new,
        units=[CopyUnit(output.events, output.statements, chain=output.chain)],
        heartbeats=output.heartbeats,
    )


async def commit_sealed(
    pool: asyncpg.Pool, token: LeaseToken, records: Sequence[bytes], first: int, previous: str
) -> str:
    """Commit sealed ``records`` (sequence numbers from ``first``) as a worker would: one
    batch, one link, the sequence range recorded; returns the new checkpoint."""
    items = [KeyedRecord(i, str(first + i), raw, KEY) for i, raw in enumerate(records)]
    output = decode_batch(BatchInput(token.shard_id, items, ESDK, stream_name=token.stream_name))
    assert output.failures == []
    sink = Sink(pool)
    await sink.ensure_partitions(output.days)
    last = str(first + len(items) - 1)
    await sink.commit(
        token,
        previous_checkpoint=previous,
        new_checkpoint=last,
        units=[CopyUnit(output.events, output.statements, chain=output.chain)],
        sequence_range=(str(first), last),
    )
    return last


async def dead_lettered(
    pool: asyncpg.Pool, shard_id: str, letters: Sequence[DeadLetter]
) -> dict[str, int]:
    """Commit ``letters`` as a batch of ``shard_id`` with nothing stored (checkpoint: the last
    letter); returns each letter's id in das.dead_letters by its sequence number."""
    token, _ = await hold_lease(pool, shard_id, "w")
    await Sink(pool).commit(
        token,
        previous_checkpoint="TRIM_HORIZON",
        new_checkpoint=letters[-1].sequence_number,
        units=[],
        dead_letters=list(letters),
    )
    rows = await pool.fetch(
        "SELECT id, sequence_number::text AS seq FROM das.dead_letters WHERE shard_id = $1",
        shard_id,
    )
    return {r["seq"]: r["id"] for r in rows}
