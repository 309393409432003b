"""``make soak``: a fleet of workers under a continuous producer, random kills and faults.

    python -m bench.soak --minutes 10

A local stack (kinesalite, moto KMS, PostgreSQL) on 127.0.0.1; the workers reach every server
through the fault proxies of ``tests/faults.py``: latency, connection resets at random moments,
Kinesis ``ProvisionedThroughputExceededException`` / ``ExpiredIteratorException`` and KMS
``ThrottlingException`` answers, and outages of Kinesis, KMS and PostgreSQL in turn, each
``--outage-seconds`` long (30 s by default: longer than a lease, the botocore retries and the
consumers' backoff). Meanwhile a seeded killer SIGKILLs a random worker every few seconds and
starts it again. The emulator writes straight to Kinesis, in chunks of a few thousand events
with their own seeds, for ``--minutes``. Every worker serves ``/readyz`` (``--metrics-port 0``);
the soak polls it on every live worker and reports, for each outage, how long each worker that
lived through it was not ready (it should be most of the outage, and not much more).

At the end the faults stop, the fleet drains, every worker gets SIGTERM (each must exit 0), and
every produced event is looked up by its unique key: produced, stored, duplicated, lost. The
lag is end to end: for each second, how long ago the oldest event not yet stored was produced
(events are counted, not traced, so this is exact for the count and close for the time).
Exit status 0 only when nothing was lost or duplicated and every worker stopped cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import os
import random
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg

from das_dev.devstack import LocalStack
from ingest.emulate.producer import EmulateOptions, Progress, emulate
from ingest.emulate.traffic import EventKey
from tests.faults import (
    EXPIRED_ITERATOR,
    KMS_THROTTLING,
    PROVISIONED_THROUGHPUT_EXCEEDED,
    Chaos,
    ErrorRule,
    FaultProxy,
    HttpFaults,
    Killer,
    describe,
    http_get,
    spawn_worker,
)
from tests.fleet import Fleet, WorkerProcess, expected, migrated, options, stored, wait_until

#: How long after an outage its unreadiness is still counted (the recovery).
READY_AGAIN_WINDOW = 30.0


@dataclass
class Timeline:
    """When how many events had been produced, to turn a stored count into a lag."""

    times: list[float] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    done_before: int = 0

    def note(self, chunk_events: int) -> None:
        self.times.append(time.monotonic())
        self.totals.append(self.done_before + chunk_events)

    def lag(self, stored_events: int, now: float) -> float:
        """Seconds since the oldest event not yet stored was produced (0: all stored)."""
        index = bisect.bisect_right(self.totals, stored_events)
        if index >= len(self.totals):
            return 0.0
        return now - self.times[index]


@dataclass
class Soak:
    args: argparse.Namespace
    stack: LocalStack
    dsn: str
    stream: str
    fleet: Fleet = field(default_factory=Fleet)
    timeline: Timeline = field(default_factory=Timeline)
    chunks: list[EmulateOptions] = field(default_factory=list)
    max_lag: float = 0.0
    outages: Counter[str] = field(default_factory=Counter)
    unexpected_exits: list[tuple[str, int]] = field(default_factory=list)
    readiness: Readiness = field(default_factory=lambda: Readiness())

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    async def produce(self, until: float) -> None:
        rng = random.Random(self.args.seed)
        index = 0
        while time.monotonic() < until:
            opts = options(
                self.stream,
                count=self.args.chunk,
                seed=rng.randrange(1, 2**31),
                shards=self.args.shards,
                instances=self.args.shards,
                create_stream=index == 0,
                rate=self.args.rate,
            )
            self.chunks.append(opts)

            def progress(p: Progress) -> None:
                self.timeline.note(p.events)

            report = await emulate(opts, progress=progress)
            self.timeline.done_before += report.events
            index += 1

    async def committed(self, conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM das.activity_events"))

    async def watch_lag(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while True:
                count = await self.committed(conn)
                lag = self.timeline.lag(count, time.monotonic())
                self.max_lag = max(self.max_lag, lag)
                await asyncio.sleep(1.0)
        finally:
            await conn.close()

    async def outages_in_turn(self, proxies: dict[str, FaultProxy]) -> None:
        length = self.args.outage_seconds
        while True:
            for name in ("kinesis", "kms", "postgres"):
                await asyncio.sleep(self.args.outage_every)
                self.say(f"{name} outage for {length:g} s")
                began = time.monotonic()
                async with proxies[name].outage():
                    await asyncio.sleep(length)
                self.readiness.outages.append((name, began, time.monotonic()))
                self.outages[name] += 1
                self.say(f"{name} back")

    async def revive(self, killer: Killer) -> None:
        """A worker that exited by itself (not killed) is a finding: note it, start it again."""
        while True:
            await asyncio.sleep(1.0)
            for slot, worker in list(killer.live.items()):
                code = worker.process.returncode
                if code is not None and code != -9:
                    self.unexpected_exits.append((worker.name, code))
                    self.say(f"worker {worker.name} exited with {code} by itself; restarting")
                    for line in list(getattr(worker, "tail", []))[-15:]:
                        print(f"    {line[:400]}", flush=True)
                    killer.live[slot] = await killer.start(f"{worker.name}-revived")


@dataclass
class Readiness:
    """/readyz of every live worker, polled; and how long each was unready per outage."""

    #: pid -> [(monotonic time, HTTP status)]
    samples: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    #: (dependency, began, ended)
    outages: list[tuple[str, float, float]] = field(default_factory=list)
    every: float = 0.25

    async def poll(self, killer: Killer) -> None:
        while True:
            for worker in list(killer.live.values()):
                if worker.process.returncode is not None:
                    continue
                served = worker.logged("serving /metrics, /healthz, /readyz")
                if not served:
                    continue  # starting up
                status, _ = await http_get(int(served[0]["port"]), "/readyz")
                self.names[worker.pid] = worker.name
                self.samples.setdefault(worker.pid, []).append((time.monotonic(), status))
            await asyncio.sleep(self.every)

    def unready(self, began: float, ended: float, after: float) -> dict[str, float]:
        """Seconds each worker answered /readyz 503 between ``began`` and ``ended + after``,
        for the workers polled all along that window (not killed nor started within it)."""
        window_end = ended + after
        out: dict[str, float] = {}
        for pid, samples in self.samples.items():
            inside = [(t, status) for t, status in samples if began <= t <= window_end]
            if not inside or samples[0][0] > began or samples[-1][0] < window_end:
                continue
            if any(b - a > 5 * self.every + 5 for (a, _), (b, _) in itertools.pairwise(inside)):
                continue  # a gap: the process was not answering (killed, restarting)
            seconds = sum(
                b - a for (a, status), (b, _) in itertools.pairwise(inside) if status != 200
            )
            out[f"{self.names[pid]} (pid {pid})"] = round(seconds, 1)
        return out

    def report(self, after: float) -> list[str]:
        lines = []
        for name, began, ended in self.outages:
            measured = self.unready(began, ended, after)
            shown = ", ".join(f"{w}: {s:g} s" for w, s in measured.items()) or (
                "no worker lived through it"
            )
            lines.append(f"{name} {ended - began:.0f} s outage: not ready {shown}")
        return lines


async def run(args: argparse.Namespace) -> int:
    seed = args.seed
    with LocalStack() as stack:
        os.environ.update(stack.env())  # the producer and the checks talk to the servers directly
        admin = await asyncpg.connect(stack.dsn)
        try:
            await admin.execute("CREATE DATABASE soak")
        finally:
            await admin.close()
        dsn = stack.postgres.dsn_for("soak") if stack.postgres else ""
        await migrated(dsn)
        stream = f"aws-rds-das-cluster-SOAK{secrets.token_hex(4).upper()}"
        soak = Soak(args, stack, dsn, stream)
        soak.say(f"seed {seed}; stack up: {stack.summary()}")
        kinesis_rules = [
            ErrorRule("GetRecords", PROVISIONED_THROUGHPUT_EXCEEDED, probability=0.02, burst=5),
            ErrorRule("GetRecords", EXPIRED_ITERATOR, probability=0.02),
            ErrorRule("GetShardIterator", PROVISIONED_THROUGHPUT_EXCEEDED, probability=0.05),
            ErrorRule("ListShards", PROVISIONED_THROUGHPUT_EXCEEDED, probability=0.05, burst=2),
        ]
        kms_rules = [ErrorRule("Decrypt", KMS_THROTTLING, probability=0.1, burst=5)]
        proxies = {
            "kinesis": FaultProxy.for_url(
                stack.kinesis_endpoint, name="kinesis", http_faults=HttpFaults(kinesis_rules)
            ),
            "kms": FaultProxy.for_url(
                stack.kms_endpoint, name="kms", http_faults=HttpFaults(kms_rules), seed=seed + 1
            ),
            "postgres": FaultProxy.for_url(dsn, name="postgres", seed=seed + 2),
        }
        for proxy in proxies.values():
            await proxy.start()
            proxy.latency, proxy.jitter = 0.001, 0.004
        env = {
            "AWS_ENDPOINT_URL_KINESIS": proxies["kinesis"].url,
            "AWS_ENDPOINT_URL_KMS": proxies["kms"].url,
        }
        choices = random.Random(seed + 3)

        async def start(name: str) -> WorkerProcess:
            processes = str(choices.choice((0, 1)))
            return await spawn_worker(
                soak.fleet,
                name,
                stream,
                proxies["postgres"].dsn(dsn),
                "--processes",
                processes,
                "--metrics-port",
                "0",
                env=env,
            )

        low, high = (float(x) for x in args.kill_every.split(","))
        killer = Killer(start, slots=args.workers, seed=seed + 4, every=(low, high))
        chaos = Chaos(list(proxies.values()), every=(2.0, 6.0), seed=seed + 5)
        started = time.monotonic()
        until = started + args.minutes * 60
        producer = asyncio.ensure_future(soak.produce(until))
        await asyncio.sleep(1.0)  # the stream exists
        await killer.start_all()
        background = [
            asyncio.ensure_future(soak.watch_lag()),
            asyncio.ensure_future(soak.outages_in_turn(proxies)),
            asyncio.ensure_future(soak.revive(killer)),
            asyncio.ensure_future(soak.readiness.poll(killer)),
        ]
        killer.begin()
        chaos.start()
        try:
            await producer
            soak.say("production done; faults stop, the fleet drains")
        finally:
            await killer.stop()
            await chaos.stop()
            for task in background[1:]:
                task.cancel()
            await asyncio.gather(*background[1:], return_exceptions=True)
            for proxy in proxies.values():
                await proxy.accept()
            for rule in [*kinesis_rules, *kms_rules]:
                rule.probability = 0.0
        want: list[EventKey] = [k for opts in soak.chunks for k in expected(opts)]
        conn = await asyncpg.connect(dsn)
        try:

            async def drained() -> bool:
                return await soak.committed(conn) >= len(want)

            with contextlib.suppress(TimeoutError):
                await wait_until(drained, args.drain_seconds, interval=1.0)
        finally:
            await conn.close()
        background[0].cancel()
        await asyncio.gather(background[0], return_exceptions=True)
        codes = await killer.terminate_all()
        got = await stored(dsn)
        counts = Counter(got)
        duplicated = sum(n - 1 for n in counts.values() if n > 1)
        lost = len(set(want) - set(counts))
        unexpected = len(set(counts) - set(want))
        letters = await _dead_letters(dsn)
        faults = {name: proxy.stats for name, proxy in proxies.items()}
        print()
        print(
            f"soak: {args.minutes:g} min, seed {seed}, {args.workers} workers, {args.shards} shards"
        )
        print(f"  events produced   {len(want)}")
        print(f"  events stored     {len(got)}")
        print(f"  duplicated        {duplicated}")
        print(f"  lost              {lost}")
        print(f"  unknown           {unexpected}")
        print(f"  dead letters      {letters}")
        print(f"  max lag           {soak.max_lag:.1f} s (end to end, produced -> stored)")
        print(f"  SIGKILLs          {killer.kills} (restarts {killer.restarts})")
        print(f"  outages           {dict(soak.outages)}")
        print("  readiness during outages (seconds /readyz answered 503, recovery included):")
        recovery = min(READY_AGAIN_WINDOW, args.outage_every)  # not into the next outage
        for line in soak.readiness.report(after=recovery) or ["(no outage)"]:
            print(f"    {line}")
        print(f"  proxies           {describe(list(proxies.values()))}")
        print(f"  injected errors   { {n: dict(s.injected) for n, s in faults.items()} }")
        print(f"  unexpected exits  {soak.unexpected_exits or 'none'}")
        print(f"  SIGTERM exit codes {codes}")
        for proxy in proxies.values():
            await proxy.close()
        await soak.fleet.close()
        ok = lost == duplicated == unexpected == 0 and letters == 0
        ok = ok and all(c == 0 for c in codes) and not soak.unexpected_exits
        print("  result            " + ("OK" if ok else "FAILED"))
        return 0 if ok else 1


async def _dead_letters(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM das.dead_letters"))
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to produce (10)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--shards", type=int, default=4, help="stream shards (4)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (1000)")
    parser.add_argument("--chunk", type=int, default=5000, help="events per producer seed")
    parser.add_argument("--kill-every", default="3,10", help="seconds between kills: low,high")
    parser.add_argument("--outage-every", type=float, default=20.0, help="seconds between outages")
    parser.add_argument(
        "--outage-seconds",
        type=float,
        default=30.0,
        help="length of each outage of Kinesis, KMS and PostgreSQL (30)",
    )
    parser.add_argument("--drain-seconds", type=float, default=300.0, help="drain deadline")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = secrets.randbits(31)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
