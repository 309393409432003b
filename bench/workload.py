"""Benchmark workloads: emulated Aurora records, sealed fast, put into kinesalite once.

Records are the emulator's (``ingest.emulate``: seeded traffic, one instance per record, gzip
level 6, the outer DAS document) under real KMS data keys from the local KMS (moto), rotated
every ``rotate_every`` records as the emulator does, sealed by :class:`bench.encoder.FastEncryptor`
in a process pool. A stream is filled once and then read by every consumer being compared.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from bench.encoder import SUITE_ID, FastEncryptor
from ingest.emulate.encoder import EncodeItem, encode_payload
from ingest.emulate.producer import (
    MAX_BATCH_BYTES,
    MAX_BATCH_RECORDS,
    DataKey,
    EmulateOptions,
    Entry,
    ensure_stream,
    generate_data_key,
)

SHARDS = 4
#: One instance per shard: the emulator spreads instance ids evenly over the hash range.
INSTANCES = 4
ROTATE_EVERY = 100
CHUNK = 50
#: Below this many records, spawning encoder processes costs more than it saves.
PARALLEL_FROM = 400

_encryptors: dict[int, FastEncryptor] = {}


def _encode_chunk(items: Sequence[EncodeItem], suite: int = SUITE_ID) -> list[bytes]:
    """Process-pool entry point: one FastEncryptor per process and suite."""
    # one signing key per process, by design
    encryptor = _encryptors.get(suite)
    if encryptor is None:
        encryptor = _encryptors[suite] = FastEncryptor(suite=suite)
    return [
        encode_payload(i.inner_json, i.version, i.data_key_plaintext, i.data_key_blob, encryptor)
        for i in items
    ]


@dataclass
class Workload:
    stream: str
    resource_id: str
    events_per_record: int
    entries: list[Entry]
    data_keys: int
    build_seconds: float = 0.0
    put_seconds: float = 0.0
    #: (shard id, sequence number) -> time.time() when its PutRecords call was sent.
    put_times: dict[tuple[str, str], float] = field(default_factory=dict)
    #: each entry's plaintext data key (what KMS would return), for the decode-pool ceiling
    plaintext_keys: list[bytes] = field(default_factory=list)
    suite: int = SUITE_ID

    @property
    def records(self) -> int:
        return len(self.entries)

    @property
    def events(self) -> int:
        return sum(e.events for e in self.entries)


def options(stream: str, events_per_record: int, events: int, seed: int) -> EmulateOptions:
    return EmulateOptions(
        stream=stream,
        create_stream=True,
        shards=SHARDS,
        instances=INSTANCES,
        events_per_record=events_per_record,
        count=events,
        seed=seed,
        rotate_every=ROTATE_EVERY,
    )


async def build(
    kms: object,
    key_id: str,
    stream: str,
    events_per_record: int,
    events: int,
    *,
    seed: int = 1,
    processes: int = 2,
    suite: int = SUITE_ID,
) -> Workload:
    """Generate and seal the records of ``events`` record events (heartbeat records extra)."""
    started = time.perf_counter()
    opts = options(stream, events_per_record, events, seed)
    inner = list(opts.inner_records())
    keys: list[DataKey] = [
        await generate_data_key(kms, key_id, opts.resource_id)
        for _ in range(0, len(inner), opts.rotate_every)
    ]
    items = [
        EncodeItem(
            orjson.dumps(r.doc),
            r.version,
            keys[i // opts.rotate_every].plaintext,
            keys[i // opts.rotate_every].blob,
        )
        for i, r in enumerate(inner)
    ]
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    loop = asyncio.get_running_loop()
    if processes > 1 and len(items) >= PARALLEL_FROM:
        with concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            sealed = await asyncio.gather(
                *(loop.run_in_executor(pool, _encode_chunk, c, suite) for c in chunks)
            )
    else:
        sealed = [_encode_chunk(c, suite) for c in chunks]
    entries = [
        Entry(data, r.partition_key, r.record_events, r.heartbeats)
        for data, r in zip((d for chunk in sealed for d in chunk), inner, strict=True)
    ]
    return Workload(
        stream=stream,
        resource_id=opts.resource_id,
        events_per_record=events_per_record,
        entries=entries,
        data_keys=len(keys),
        build_seconds=time.perf_counter() - started,
        plaintext_keys=[keys[i // opts.rotate_every].plaintext for i in range(len(inner))],
        suite=suite,
    )


async def create_stream(kinesis: object, stream: str) -> None:
    await ensure_stream(kinesis, options(stream, 1, 1, 1))


async def put(
    kinesis: object,
    workload: Workload,
    entries: Sequence[Entry] | None = None,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """PutRecords in production order (one call in flight), recording when each was sent."""
    started = time.perf_counter()
    batch: list[Entry] = []
    size = 0
    for entry in workload.entries if entries is None else entries:
        if batch and (len(batch) >= MAX_BATCH_RECORDS or size + entry.size > MAX_BATCH_BYTES):
            await put_batch(kinesis, workload, batch)
            if on_batch is not None:
                on_batch(len(batch))
            batch, size = [], 0
        batch.append(entry)
        size += entry.size
    if batch:
        await put_batch(kinesis, workload, batch)
        if on_batch is not None:
            on_batch(len(batch))
    workload.put_seconds += time.perf_counter() - started


async def put_batch(kinesis: object, workload: Workload, batch: Sequence[Entry]) -> None:
    pending = list(batch)
    for _attempt in range(30):
        sent = time.time()
        response = await kinesis.put_records(  # type: ignore[attr-defined]
            StreamName=workload.stream,
            Records=[{"Data": e.data, "PartitionKey": e.partition_key} for e in pending],
        )
        failed = []
        for entry, result in zip(pending, response["Records"], strict=True):
            if result.get("ErrorCode"):
                failed.append(entry)
            else:
                workload.put_times[(result["ShardId"], result["SequenceNumber"])] = sent
        if not failed:
            return
        pending = failed
        await asyncio.sleep(0.1)
    raise RuntimeError(f"kinesalite refused {len(pending)} records 30 times")
