"""The ceiling of the machine for a workload: the decode pool alone, with as many processes as
``das-ingest run`` uses, no Kinesis and no warehouse.

The pool runs what the worker's pool runs (``decode_with_policy``: ``decode_batch`` with the
default decoder -- the lean decryptor verifying signatures, the chain's digests -- and the
built-in policy pack beside normalize, as ``das-ingest run`` does by default) over the
workload's records with their
plaintext data keys (what the KMS cache hands the pool), and returns each batch's output to
this process, pickled, as the worker's pool does. End-to-end steady rate / this = how much of
the machine the rest (GetRecords, base64, KMS, queues, COPY, commits) leaves to decoding.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time

from bench.workload import Workload
from ingest.decode.batch import BatchInput, BatchOutput, DecoderConfig, KeyedRecord
from ingest.decode.envelope import read_envelope
from ingest.policy.hook import decode_with_policy


def _warm(_: int) -> int:
    """Import the decode layer and compile the policy rules in a worker process (not
    measured), as the worker's pool does while it takes its leases."""
    decode_with_policy(BatchInput("warm", [], DecoderConfig(), stream_name="warm"))
    return len(DecoderConfig().decryptor)


async def decode_pool_rate(work: Workload, processes: int, records_per_batch: int = 100) -> float:
    """Events/s of ``processes`` decode processes over the workload, best of two passes."""
    if not work.plaintext_keys:
        raise ValueError("the workload keeps no plaintext data keys")
    # The worker parses each envelope in its event loop (for the key blob) and hands the pool
    # the parsed envelope: so does this, before the clock starts.
    items = [
        KeyedRecord(i, str(i + 1), read_envelope(entry.data), key)
        for i, (entry, key) in enumerate(zip(work.entries, work.plaintext_keys, strict=True))
    ]
    # Many small batches (a steady worker's pages are small): no process idles at the end
    # while another finishes a big one.
    size = max(1, min(records_per_batch, len(items) // (8 * processes) or 1))
    batches = [
        BatchInput(
            "shardId-000000000000", items[i : i + size], DecoderConfig(), stream_name=work.stream
        )
        for i in range(0, len(items), size)
    ]
    loop = asyncio.get_running_loop()
    best = 0.0
    with concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, _warm, n) for n in range(processes)))
        for _ in range(2):
            began = time.perf_counter()
            outputs: list[BatchOutput] = await asyncio.gather(
                *(loop.run_in_executor(pool, decode_with_policy, b) for b in batches)
            )
            seconds = time.perf_counter() - began
            events = sum(o.event_count for o in outputs)
            if any(o.failures for o in outputs):
                raise RuntimeError(f"the decode pool failed records: {outputs[0].failures[:1]}")
            best = max(best, events / seconds)
    return best
