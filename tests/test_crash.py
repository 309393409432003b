"""Crashes: workers SIGKILLed at random moments while a stream is written, and started again.

Three workers share four shards; a seeded killer SIGKILLs one of them every one to three and a
half seconds (mid-GetRecords, mid-decode, mid-COPY, mid-commit: wherever it happens to be) and
starts it again, under its old name or a new one. Every event the emulator produced must be
stored exactly once, counted by its unique key. The seed is logged and can be replayed with
DAS_CRASH_SEED=<seed>; `make soak` runs the same thing with hundreds of thousands of events.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from collections import Counter

import pytest

from tests.faults import Killer
from tests.fleet import (
    Fleet,
    WorkerProcess,
    assert_exactly_once,
    committed_events,
    expected,
    migrated,
    options,
    produce,
    stored,
    wait_until,
)
from tests.logscan import assert_no_leaks, stream_needles

log = logging.getLogger(__name__)

pytestmark = [
    pytest.mark.usefixtures("aws_env"),
    # When the producer falls behind its pace (a busy machine), its PutRecords batches grow past
    # 1 MiB and aiohttp warns that sending such a body "might lock the event loop": harmless,
    # but the suite turns warnings into errors, and the emulator would give up.
    pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning"),
]


MIN_KILLS = 8


def crash_seed() -> int:
    chosen = os.environ.get("DAS_CRASH_SEED")
    return int(chosen) if chosen else secrets.randbits(32)


async def test_random_sigkills_lose_nothing_and_duplicate_nothing(
    fleet: Fleet, pg_dsn: str
) -> None:
    seed = crash_seed()
    log.warning("crash test seed: %d (replay with DAS_CRASH_SEED=%d)", seed, seed)
    await migrated(pg_dsn)
    stream = f"aws-rds-das-cluster-{secrets.token_hex(6).upper()}"
    first = options(stream, count=1000, shards=4, instances=4, rate=0)
    await produce(first)
    choices = random.Random(seed + 1)

    async def start(name: str) -> WorkerProcess:
        # Some workers decode in a process pool (whose children must die with them).
        processes = str(choices.choice((0, 1)))
        return await fleet.start(name, stream, pg_dsn, "--processes", processes)

    killer = Killer(start, slots=3, seed=seed, every=(1.5, 4.0))
    await killer.start_all()
    killer.begin()
    second = options(stream, count=19_000, seed=seed % 1000 + 100, create_stream=False, rate=1500)
    started = time.monotonic()

    async def killed_enough() -> bool:
        return killer.kills >= MIN_KILLS

    try:
        await produce(second)
        produced = time.monotonic() - started
        await wait_until(killed_enough, deadline=60)  # more kills while the fleet catches up
    finally:
        await killer.stop()
    want = expected(first) + expected(second)

    async def all_stored() -> bool:
        return await committed_events(pg_dsn) >= len(want)

    await wait_until(all_stored, deadline=120)
    log.warning("produced in %.1f s, all stored after %.1f s", produced, time.monotonic() - started)
    codes = await killer.terminate_all()
    got = await stored(pg_dsn)
    counts = Counter(got)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    lost = len(set(want) - set(counts))
    log.warning(
        "crash test seed %d: %d kills, %d events checked, %d lost, %d duplicated",
        seed,
        killer.kills,
        len(want),
        lost,
        duplicated,
    )
    assert codes == [0, 0, 0], f"seed {seed}: exit codes {codes}"
    assert (lost, duplicated) == (0, 0), f"seed {seed}"
    assert_exactly_once(got, want)
    # Nor did any of the killed, restarted or stopped workers log SQL or key material.
    needles = await stream_needles(stream, [first, second], [stream.removeprefix("aws-rds-das-")])
    assert_no_leaks({f"{w.name} (pid {w.pid})": w.output for w in fleet.workers}, needles)
