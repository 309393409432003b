"""The worker: a lease coordinator and a supervisor of shard consumers.

Every ``lease_seconds / 3`` the coordinator
  1. records that this worker is alive and renews the leases it holds (a lease it could not
     renew is lost: its consumer is told to stop, and its commits would be refused anyway);
  2. reaps consumers that ended: SHARD_END releases the lease for good (children become
     eligible), a crash releases it so it is retried, LEASE_LOST just forgets it;
  3. refreshes the shard list (periodically, and at once after a SHARD_END);
  4. balances: takes expired or free eligible leases up to its fair share
     ceil(eligible / live workers), and when none is free steals one from the most loaded
     worker above that share;
  5. starts a consumer per newly held lease: the supervisor keeps ``dict[shard_id, Task]``
     reconciled with the leases held, and one shard failing never touches the others.

Shutdown has two phases (arq's shape): stop taking work and let every consumer commit the batch
in hand, up to a deadline; then cancel what is left, release the leases, deregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest.consumer.budget import WorkBudget
from ingest.consumer.pool import DecodePool
from ingest.consumer.shard import ShardConsumer, ShardSettings, State
from ingest.integrity.anchor import AnchorError, AnchorKey, anchor_heads
from ingest.kinesis import KinesisReader, KinesisUnavailableError
from ingest.kms import DataKeyCache, encryption_context
from ingest.metrics import Metrics
from ingest.retry import Backoff
from ingest.warehouse.db import is_transient
from ingest.warehouse.leases import Lease, LeaseStore
from ingest.warehouse.sink import LeaseToken, Sink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    stream_name: str
    resource_id: str
    worker_id: str
    #: checkpoint for shards without one: TRIM_HORIZON, LATEST or AT_TIMESTAMP:<iso>
    initial_position: str = "TRIM_HORIZON"
    lease_seconds: float = 10.0
    shard_sync_seconds: float = 30.0
    stop_when_idle: float | None = None
    shutdown_deadline: float = 20.0
    processes: int = 2
    queue_batches: int = 8
    queue_bytes: int = 64 * 1024 * 1024
    max_leases: int | None = None
    #: KMS key to anchor the chain heads of held shards with (None: no anchoring)
    anchor_key_id: str | None = None
    anchor_seconds: float = 300.0
    #: extend the integrity chain with every batch (off only to measure its cost)
    chain: bool = True
    shard: ShardSettings = field(default_factory=ShardSettings)


@dataclass
class _Running:
    consumer: ShardConsumer
    task: asyncio.Task[State]


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        db: asyncpg.Pool,
        kinesis_client: Any,
        kms_client: Any,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.leases = LeaseStore(db, settings.stream_name, lease_seconds=settings.lease_seconds)
        self.sink = Sink(db, chain=settings.chain)
        self._db = db
        self.anchor_key = (
            AnchorKey(kms_client, settings.anchor_key_id) if settings.anchor_key_id else None
        )
        self._anchored_at = time.monotonic()
        self.reader = KinesisReader(kinesis_client, settings.stream_name)
        self.keys = DataKeyCache(kms_client)
        self.budget = WorkBudget(max_batches=settings.queue_batches, max_bytes=settings.queue_bytes)
        self.pool = DecodePool(settings.processes, self.budget)
        self.running: dict[str, _Running] = {}
        self.ready = False
        self.last_cycle = 0.0
        #: monotonic time of the coordinator loop's last turn, successful or not (liveness)
        self.last_turn = time.monotonic()
        self._stop = asyncio.Event()
        self._sync_due = 0.0
        self._partitions_due = 0.0
        self._idle_since: float | None = None
        self._kms_seen = (0, 0)
        self.exit_reason = ""

    # -- public -------------------------------------------------------------------------

    def request_stop(self, reason: str = "signal") -> None:
        if not self._stop.is_set():
            log.info("stop requested", extra={"reason": reason})
            self.exit_reason = reason
            self._stop.set()

    @property
    def held(self) -> list[str]:
        return sorted(self.running)

    async def run(self) -> None:
        """Run until stopped (signal or --stop-when-idle); always shuts down gracefully."""
        warming = asyncio.ensure_future(self.pool.warm(self.settings.shard.decoder))
        interval = self.settings.lease_seconds / 3
        backoff = Backoff(base=0.2, cap=interval)
        failures = 0
        try:
            while not self._stop.is_set():
                self.last_turn = time.monotonic()
                try:
                    await self._cycle()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not (is_transient(exc) or isinstance(exc, KinesisUnavailableError)):
                        log.exception(
                            "coordinator failed; stopping",
                            extra={"error": f"{type(exc).__name__}: {str(exc)[:300]}"},
                        )
                        raise
                    # Database or Kinesis unreachable: not ready, keep trying, no crash loop.
                    self.ready = False
                    self.metrics.ready.set(0)
                    self.metrics.retries.labels("coordinator").inc()
                    delay = backoff.delay(failures)
                    failures += 1
                    log.warning(
                        "coordinator cycle failed; retrying",
                        extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}", "delay": delay},
                    )
                    await self._sleep(delay)
                    continue
                failures = 0
                self.ready = True
                self.metrics.ready.set(1)
                self.last_cycle = time.monotonic()
                if self._idle_done():
                    self.request_stop("idle")
                    break
                await self._sleep(interval)
        finally:
            if not warming.done():
                warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
            await self._shutdown()

    # -- one coordinator cycle ---------------------------------------------------------

    async def _cycle(self) -> None:
        live = await self.leases.heartbeat_worker(self.settings.worker_id, ready=self.ready)
        await self._renew()
        sync_now = self._reap()
        now = time.monotonic()
        if sync_now or now >= self._sync_due:
            shards = await self.reader.list_shards()
            initial = self.settings.initial_position
            created = await self.leases.sync_shards(shards, initial)
            if created:
                log.info("new shards", extra={"count": created})
            self._sync_due = now + self.settings.shard_sync_seconds
        if now >= self._partitions_due:
            # Day partitions are created ahead, so commits rarely wait for DDL.
            today = datetime.now(UTC).date()
            await self.sink.ensure_partitions({today + timedelta(days=d) for d in range(3)})
            self._partitions_due = now + 3600
        eligible = await self.leases.eligible_leases()
        await self._balance(eligible, live)
        self._update_idle(eligible, live)
        self._sync_kms_metrics()
        if self.anchor_key is not None and now - self._anchored_at >= self.settings.anchor_seconds:
            await self._anchor(self.held)
            self._anchored_at = now

    async def _anchor(self, shards: list[str]) -> None:
        """Anchor the chain heads of ``shards`` (ours: nobody else extends them meanwhile)."""
        if self.anchor_key is None or not shards:
            return
        try:
            async with self._db.acquire() as conn:
                made = await anchor_heads(conn, self.anchor_key, self.settings.stream_name, shards)
        except AnchorError as exc:
            # KMS unavailable: the links stay unanchored until the next try; nothing is lost.
            self.metrics.retries.labels("anchor").inc()
            log.warning("could not anchor chain heads", extra={"error": str(exc)[:200]})
            return
        if made:
            self.metrics.anchors.inc(len(made))
            log.info("anchored chain heads", extra={"count": len(made)})

    async def _renew(self) -> None:
        held = {s: r.consumer.lease.lease_counter for s, r in self.running.items()}
        renewed = await self.leases.renew(self.settings.worker_id, held)
        for shard_id in set(held) - renewed:
            consumer = self.running[shard_id].consumer
            if consumer.stopping:
                continue  # told already; it ends at its next step
            log.warning("lease lost at renewal", extra={"shard": shard_id})
            self.metrics.lease_changes.labels("lost").inc()
            consumer.stop()

    def _reap(self) -> bool:
        """Collect ended consumers; True when a shard ended (so children may now exist)."""
        ended_shard = False
        for shard_id, run in list(self.running.items()):
            if not run.task.done():
                continue
            del self.running[shard_id]
            self.metrics.forget_shard(shard_id)  # its lag is no longer ours to report
            lease = run.consumer.lease
            if run.task.cancelled():
                continue
            exc = run.task.exception()
            if exc is not None:
                log.error(
                    "shard consumer crashed; releasing its lease",
                    extra={"shard": shard_id, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                self.metrics.lease_changes.labels("crashed").inc()
                self._spawn_release(lease)
                continue
            state = run.task.result()
            if state is State.SHARD_END:
                self.metrics.lease_changes.labels("finished").inc()
                ended_shard = True
                # The closed shard's chain is complete: anchor its head before letting go
                # (periodic anchoring only covers the shards still held).
                self._spawn_release(lease, anchor=True)
            elif state is State.SHUTTING_DOWN:
                self._spawn_release(lease)
        self.metrics.leases_held.set(len(self.running))
        return ended_shard

    def _spawn_release(self, lease: LeaseToken, *, anchor: bool = False) -> None:
        async def release() -> None:
            if anchor:
                try:
                    await self._anchor([lease.shard_id])
                except Exception as exc:  # noqa: BLE001 - never keeps the lease from release
                    log.warning(
                        "could not anchor a finished shard",
                        extra={"shard": lease.shard_id, "error": type(exc).__name__},
                    )
            await self.leases.release(lease.owner, lease.shard_id, lease.lease_counter)

        task = asyncio.ensure_future(release())
        task.add_done_callback(_log_task_error)

    async def _balance(self, eligible: list[tuple[Lease, bool]], live: list[str]) -> None:
        if self._stop.is_set():
            return
        me = self.settings.worker_id
        workers = max(1, len(set(live) | {me}))
        target = math.ceil(len(eligible) / workers)
        if self.settings.max_leases is not None:
            target = min(target, self.settings.max_leases)
        mine = [
            lease for lease, _ in eligible if lease.owner == me and lease.shard_id in self.running
        ]
        need = target - len(mine)
        if need <= 0:
            return
        free = [
            lease for lease, expired in eligible if expired and lease.shard_id not in self.running
        ]
        random.shuffle(free)  # workers starting together should not all race for one lease
        taken = 0
        for lease in free[:need]:
            got = await self.leases.take(lease, me)
            if got is not None:
                self.metrics.lease_changes.labels("taken").inc()
                self._start(got)
                taken += 1
        if taken or free:
            return
        counts: dict[str, list[Lease]] = {}
        for lease, expired in eligible:
            if not expired and lease.owner and lease.owner != me:
                counts.setdefault(lease.owner, []).append(lease)
        if not counts:
            return
        victim, theirs = max(counts.items(), key=lambda item: (len(item[1]), item[0]))
        # As in the KCL: steal when the most loaded holds more than the target, or holds the
        # target while we are short by more than one ((2, 2, 0) with target 2 is not balanced).
        if len(theirs) >= (target if need > 1 else target + 1):
            got = await self.leases.take(random.choice(theirs), me)  # noqa: S311
            if got is not None:
                log.info("stole lease", extra={"shard": got.shard_id, "from": victim})
                self.metrics.lease_changes.labels("stolen").inc()
                self._start(got)

    def _start(self, lease: Lease) -> None:
        token = LeaseToken(
            lease.stream_name, lease.shard_id, self.settings.worker_id, lease.lease_counter
        )
        consumer = ShardConsumer(
            lease=token,
            checkpoint=lease.checkpoint,
            reader=self.reader,
            keys=self.keys,
            encryption_context=encryption_context(self.settings.resource_id),
            pool=self.pool,
            sink=self.sink,
            leases=self.leases,
            metrics=self.metrics,
            settings=self.settings.shard,
        )
        task = asyncio.ensure_future(consumer.run())
        self.running[lease.shard_id] = _Running(consumer, task)
        self.metrics.leases_held.set(len(self.running))
        log.info("consuming shard", extra={"shard": lease.shard_id, "checkpoint": lease.checkpoint})

    # -- idleness -------------------------------------------------------------------------

    def _update_idle(self, eligible: list[tuple[Lease, bool]], live: list[str]) -> None:
        # Held by a live worker: an unexpired lease whose owner heartbeats in das.workers.
        alive = set(live) | {self.settings.worker_id}
        everything_owned = all(not expired and lease.owner in alive for lease, expired in eligible)
        held_idle = all(r.consumer.idle_since is not None for r in self.running.values())
        if everything_owned and held_idle:
            if self._idle_since is None:
                self._idle_since = time.monotonic()
        else:
            self._idle_since = None

    def _idle_done(self) -> bool:
        wait = self.settings.stop_when_idle
        if wait is None or self._idle_since is None:
            return False
        now = time.monotonic()
        if now - self._idle_since < wait:
            return False
        return all(
            (since := r.consumer.idle_since) is not None and now - since >= wait
            for r in self.running.values()
        )

    # -- shutdown -----------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for run in self.running.values():
            run.consumer.stop()
        tasks = [r.task for r in self.running.values()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_deadline)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "shutdown deadline passed; cancelled consumers", extra={"count": len(pending)}
                )
                await asyncio.gather(*pending, return_exceptions=True)
        # The heads of what we leave behind are anchored before anyone else extends them.
        with contextlib.suppress(Exception):
            await self._anchor(sorted(self.running))
        releases = []
        for run in self.running.values():
            lease = run.consumer.lease
            releases.append(self.leases.release(lease.owner, lease.shard_id, lease.lease_counter))
        self.running.clear()
        results = await asyncio.gather(*releases, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.warning(
                "could not release some leases; they expire by themselves",
                extra={"count": len(errors)},
            )
        with contextlib.suppress(Exception):
            await self.leases.deregister_worker(self.settings.worker_id)
        await asyncio.get_running_loop().run_in_executor(None, self.pool.close)
        self.metrics.leases_held.set(0)

    def _sync_kms_metrics(self) -> None:
        calls, hits = self.keys.stats.calls, self.keys.stats.hits
        self.metrics.kms_calls.inc(calls - self._kms_seen[0])
        self.metrics.kms_hits.inc(hits - self._kms_seen[1])
        self._kms_seen = (calls, hits)
        self.metrics.queue_batches.set(self.budget.batches)
        self.metrics.queue_bytes.set(self.budget.bytes)


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background lease write failed", extra={"error": str(task.exception())[:200]})
