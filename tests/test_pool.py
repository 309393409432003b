"""The decode pool with real processes: a record that kills its process is isolated, the pool
recovers; the work budget bounds batches and bytes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ingest.consumer.budget import WorkBudget
from ingest.consumer.pool import DecodePool, DecoderCrashedError
from ingest.decode.batch import BatchInput, BatchOutput, DecoderConfig, KeyedRecord, decode_batch
from tests.sealing import seal
from tests.warehouse_helpers import KEY, inner

CONFIG = DecoderConfig(decryptor="esdk")


def crashing_decode(batch: BatchInput) -> BatchOutput:
    """decode_batch, except that a record containing POISON kills the process."""
    if any(isinstance(raw, bytes) and b"POISON" in raw for _, _, raw, _ in batch.records):
        os._exit(3)
    return decode_batch(batch)


def record(index: int, text: str) -> KeyedRecord:
    payload = inner({"type": "record", "command": "SELECT", "commandText": text})
    return KeyedRecord(index, str(index + 1), seal(payload, KEY), KEY)


POISON = KeyedRecord(9, "10", b'{"POISON": true}', KEY)


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


def warm_logging_decode(batch: BatchInput) -> BatchOutput:
    """decode_batch, noting each warm-up call (an empty batch) in $DAS_TEST_WARM_LOG."""
    if batch.shard_id == "warm":
        with open(os.environ["DAS_TEST_WARM_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {len(batch.records)}\n")
    return decode_batch(batch)


def test_prestart_warms_the_processes_before_any_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run starts its pool before its event loop; warm() then waits for that warm-up instead
    of running another."""
    log = tmp_path / "warm.log"
    monkeypatch.setenv("DAS_TEST_WARM_LOG", str(log))
    pool = DecodePool(2, WorkBudget(max_batches=2, max_bytes=1 << 20), decode=warm_logging_decode)
    try:
        lean = DecoderConfig()
        pool.prestart(lean)  # no event loop in this thread

        async def use() -> BatchOutput:
            await pool.warm(lean)
            assert len(log.read_text().splitlines()) == 2  # both warm-ups are done
            batch = BatchInput("s", [record(0, "a")], lean, stream_name="s")
            return await pool.decode(batch, 10)

        assert asyncio.run(use()).event_count == 1
        assert [line.split()[1] for line in log.read_text().splitlines()] == ["0", "0"]
    finally:
        pool.close()


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


async def test_the_batch_count_is_what_blocks_when_batches_are_small() -> None:
    budget = WorkBudget(max_batches=2, max_bytes=1 << 20)
    release = asyncio.Event()
    admitted: list[str] = []

    async def hold(name: str) -> None:
        async with budget.hold(10):
            admitted.append(name)
            await release.wait()

    tasks = [asyncio.ensure_future(hold(name)) for name in "abc"]
    await asyncio.sleep(0.05)
    # 30 bytes of a megabyte: only the count of batches keeps c out.
    assert admitted == ["a", "b"]
    assert (budget.batches, budget.bytes, budget.waiting) == (2, 20, 1)
    release.set()
    await asyncio.gather(*tasks)
    assert admitted == ["a", "b", "c"]
    assert (budget.batches, budget.bytes, budget.waiting) == (0, 0, 0)


async def test_a_big_batch_is_not_starved_by_small_ones() -> None:
    """First come, first served: small batches asking after a big one that does not fit yet
    wait behind it, instead of keeping the budget busy so that it never fits."""
    budget = WorkBudget(max_batches=8, max_bytes=100)
    order: list[str] = []
    gates: dict[str, asyncio.Event] = {}

    async def hold(name: str, size: int) -> None:
        gates[name] = asyncio.Event()
        async with budget.hold(size):
            order.append(name)
            await gates[name].wait()

    small = asyncio.ensure_future(hold("small-1", 30))
    await asyncio.sleep(0.01)
    big = asyncio.ensure_future(hold("big", 150))  # more than the budget: admitted alone
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(hold(f"small-{n}", 30)) for n in (2, 3)]
    await asyncio.sleep(0.05)
    assert order == ["small-1"]  # small-2 and small-3 would fit, but big asked first
    assert budget.waiting == 3
    gates["small-1"].set()
    await asyncio.sleep(0.05)
    assert order == ["small-1", "big"]
    gates["big"].set()
    await asyncio.sleep(0.05)
    assert order == ["small-1", "big", "small-2", "small-3"]
    for name in ("small-2", "small-3"):
        gates[name].set()
    await asyncio.gather(small, big, *later)
    assert (budget.batches, budget.bytes, budget.waiting) == (0, 0, 0)


async def test_a_batch_cancelled_while_waiting_leaves_the_line() -> None:
    budget = WorkBudget(max_batches=1, max_bytes=100)
    admitted: list[str] = []
    done = asyncio.Event()

    async def hold(name: str) -> None:
        async with budget.hold(10):
            admitted.append(name)
            await done.wait()

    first = asyncio.ensure_future(hold("first"))
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(hold("cancelled"))
    behind = asyncio.ensure_future(hold("behind"))
    await asyncio.sleep(0.01)
    assert budget.waiting == 2
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert budget.waiting == 1
    done.set()
    await asyncio.wait_for(asyncio.gather(first, behind), 1)  # the one behind got in
    assert admitted == ["first", "behind"]
    assert (budget.batches, budget.bytes, budget.waiting) == (0, 0, 0)
