"""The decode pool with real processes: a record that kills its process is isolated, the pool
recovers; the work budget bounds batches and bytes."""

from __future__ import annotations

import asyncio
import os

import pytest

from ingest.consumer.budget import WorkBudget
from ingest.consumer.pool import DecodePool, DecoderCrashedError
from ingest.decode.batch import BatchInput, BatchOutput, DecoderConfig, decode_batch
from tests.sealing import seal
from tests.warehouse_helpers import KEY, inner

CONFIG = DecoderConfig(decryptor="esdk")


def crashing_decode(batch: BatchInput) -> BatchOutput:
    """decode_batch, except that a record containing POISON kills the process."""
    if any(b"POISON" in raw for _, _, raw, _ in batch.records):
        os._exit(3)
    return decode_batch(batch)


def record(index: int, text: str) -> tuple[int, str, bytes, bytes]:
    payload = inner({"type": "record", "command": "SELECT", "commandText": text})
    return (index, str(index + 1), seal(payload, KEY), KEY)


POISON = (9, "10", b'{"POISON": true}', KEY)


async def test_a_poison_record_is_isolated_and_the_pool_recovers() -> None:
    pool = DecodePool(1, WorkBudget(max_batches=2, max_bytes=1 << 20), decode=crashing_decode)
    try:
        good = BatchInput("s", [record(0, "a"), record(1, "b")], CONFIG, stream_name="s")
        assert (await pool.decode(good, 10)).event_count == 2
        with pytest.raises(DecoderCrashedError):
            await pool.decode(
                BatchInput("s", [record(0, "a"), POISON], CONFIG, stream_name="s"), 10
            )
        assert await pool.decode_alone(BatchInput("s", [POISON], CONFIG, stream_name="s")) is None
        alone = await pool.decode_alone(BatchInput("s", [record(0, "a")], CONFIG, stream_name="s"))
        assert alone is not None
        assert alone.event_count == 1
        # The main pool was rebuilt and works again.
        assert (await pool.decode(good, 10)).event_count == 2
    finally:
        await asyncio.to_thread(pool.close)


async def test_in_process_decoding_when_processes_is_zero() -> None:
    pool = DecodePool(0, WorkBudget(max_batches=1, max_bytes=10))
    out = await pool.decode(BatchInput("s", [record(0, "x")], CONFIG, stream_name="s"), 5)
    assert out.event_count == 1
    assert (
        await pool.decode_alone(BatchInput("s", [record(0, "y")], CONFIG, stream_name="s"))
    ) is not None


async def test_the_budget_bounds_batches_and_bytes() -> None:
    budget = WorkBudget(max_batches=2, max_bytes=100)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str, size: int) -> None:
        async with budget.hold(size):
            order.append(f"+{name}")
            await release.wait()
        order.append(f"-{name}")

    first = asyncio.ensure_future(hold("a", 60))
    second = asyncio.ensure_future(hold("b", 60))  # 120 bytes > 100: waits for a
    await asyncio.sleep(0.05)
    assert order == ["+a"]
    assert (budget.batches, budget.bytes) == (1, 60)
    release.set()
    await asyncio.gather(first, second)
    assert order == ["+a", "-a", "+b", "-b"]
    assert (budget.batches, budget.bytes) == (0, 0)

    # A batch larger than the whole byte budget is admitted alone rather than never.
    async with budget.hold(1000):
        assert budget.bytes == 1000
    with pytest.raises(ValueError, match="positive"):
        WorkBudget(max_batches=0, max_bytes=1)
