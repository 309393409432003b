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
import os
import time
from dataclasses import dataclass

from bench import procs
from bench.workload import Workload
from ingest.decode.batch import BatchInput, BatchOutput, DecoderConfig, KeyedRecord
from ingest.decode.envelope import read_envelope
from ingest.policy.hook import decode_with_policy


def _warm(_: int) -> int:
    """Import the decode layer and compile the policy rules in a worker process (not
    measured), as the worker's pool does while it takes its leases."""
    decode_with_policy(BatchInput("warm", [], DecoderConfig(), stream_name="warm"))
    return len(DecoderConfig().decryptor)


@dataclass(frozen=True)
class Ceiling:
    """The best pass: its rate, and the CPU its decode processes, this process (submitting,
    unpickling the outputs) and the whole machine used meanwhile."""

    events_per_second: float
    cpu: procs.CpuWindow

    @property
    def decode_share(self) -> float:
        """The decode processes' share of the machine's cores during the pass."""
        return self.cpu.shares().get(DECODE, 0.0)

    @property
    def decode_us_per_event(self) -> float:
        return self.cpu.per_event_us(DECODE)


DECODE = "decode processes"
PARENT = "bench process"
#: this process's other children: the local stack's servers
OTHER = "other children"


#: A pass of the ceiling lasts at least this long (the workload is decoded again until it has).
MIN_PASS_SECONDS = 1.0


async def decode_pool_rate(work: Workload, processes: int, records_per_batch: int = 100) -> Ceiling:
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
    best: Ceiling | None = None
    me = os.getpid()
    with concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, _warm, n) for n in range(processes)))
        for _ in range(2):
            before = _sample(me)
            began = time.perf_counter()
            events = 0
            # The workload again until the pass lasts MIN_PASS_SECONDS: the processes' CPU is
            # read in ticks of 10 ms, which a quick run's pass of a few ticks cannot resolve
            # (its decode share read 0% and 117% of the machine).
            while not events or time.perf_counter() - began < MIN_PASS_SECONDS:
                outputs: list[BatchOutput] = await asyncio.gather(
                    *(loop.run_in_executor(pool, decode_with_policy, b) for b in batches)
                )
                if any(o.failures for o in outputs):
                    failed = next(o for o in outputs if o.failures)
                    raise RuntimeError(f"the decode pool failed records: {failed.failures[:1]}")
                events += sum(o.event_count for o in outputs)
            seconds = time.perf_counter() - began
            after = _sample(me)
            if best is None or events / seconds > best.events_per_second:
                # Shares over the span the CPU was read across (the samples around the pass),
                # not the pass's own clock, which is shorter: CPU of the longer span over the
                # shorter one read 108% of the machine for the decode processes in a quick run.
                cpu = procs.cpu_window([before, after], before.at, after.at, events)
                best = Ceiling(events / seconds, cpu)
    assert best is not None
    return best


def _sample(me: int) -> procs.CpuSample:
    """This process alone (its reaped children are earlier runs), its children (the pool's
    processes) as the decode processes; the local stack's servers, also children of this
    process, apart (they idle here; the machine's total counts them)."""
    snap = procs.snapshot()
    roots = {me: PARENT}
    children = [pid for pid, stat in snap.items() if stat.ppid == me]
    roots.update({pid: DECODE if _is_pool(pid) else OTHER for pid in children})
    return procs.cpu_sample(snap, roots, own_only=(me,), parties=(DECODE, PARENT))


def _is_pool(pid: int) -> bool:
    """A multiprocessing child (spawned: ``python -c 'from multiprocessing.spawn ...'``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"multiprocessing" in cmdline.read()
    except OSError:
        return False
