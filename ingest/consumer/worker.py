"""The worker: a lease renewer, a lease coordinator and a supervisor of shard consumers.

Three routines run side by side (consumer.loops: one shape, supervised together, so one that
crashes ends the worker, after a graceful shutdown, instead of leaving it half alive):

- the **renewer** (consumer.renewer), every ``lease_seconds / 3``: records that this worker is
  alive and renews the leases it holds; a lease it could not renew is lost, and its consumer is
  told so;
- the **coordinator**, every ``lease_seconds / 3``:
  1. reaps consumers that ended: SHARD_END releases the lease for good (children become
     eligible), a crash or a stop releases it so it is retried, LEASE_LOST just forgets it;
  2. refreshes the shard list (periodically, and at once after a SHARD_END);
  3. balances (consumer.balance, a pure plan): takes expired or free eligible leases up to its
     fair share ceil(eligible / live workers), and when none is free steals one from the most
     loaded worker above that share;
  4. starts a consumer per newly held lease: the supervisor keeps ``dict[shard_id, Task]``
     reconciled with the leases held, and one shard failing never touches the others;
- the **health watch**, four times a second, publishes readiness (consumer.readiness).

Shutdown has two phases (arq's shape): stop taking work and let every consumer commit the batch
in hand, up to a deadline, while the renewer keeps the leases; then cancel what is left, release
the leases, deregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest.alerts.health import check_heartbeats
from ingest.alerts.notifiers import parse_notifier
from ingest.alerts.outbox import Deliverer, DeliveryMetrics
from ingest.alerts.store import PolicyRecorder, prune_counters
from ingest.consumer.balance import plan_balance
from ingest.consumer.budget import WorkBudget
from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.failures import describe
from ingest.consumer.loops import run_loop, supervise
from ingest.consumer.pool import DecodePool
from ingest.consumer.readiness import Readiness
from ingest.consumer.renewer import LeaseRenewer
from ingest.consumer.shard import ShardConsumer, ShardSettings, State
from ingest.errors import ConfigError
from ingest.integrity.anchor import AnchorError, AnchorKey, anchor_alert_head, anchor_heads
from ingest.kinesis import KinesisReader
from ingest.kms import DataKeyCache, encryption_context
from ingest.lease import Lease, LeaseToken
from ingest.metrics import Metrics
from ingest.policy.rules import load_rules
from ingest.retry import Backoff
from ingest.warehouse.leases import LeaseStore
from ingest.warehouse.sink import Sink

log = logging.getLogger(__name__)

#: How often readiness is re-evaluated (and das_ready updated).
WATCH_SECONDS = 0.25

#: Seconds between two prunings of the threshold counters no window reads any more.
PRUNE_SECONDS = 600.0


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
    #: a dependency whose call has been failing or hanging this long makes the worker unready
    unready_after: float = 5.0
    shard: ShardSettings = field(default_factory=ShardSettings)
    #: alert notifiers, KIND=TARGET (ingest.alerts.notifiers); delivered in the background
    notify: tuple[str, ...] = ()
    syslog_cafile: str | None = None
    #: seconds between two rounds of stream health checks and alert delivery
    alerts_seconds: float = 5.0


@dataclass
class _Running:
    consumer: ShardConsumer
    task: asyncio.Task[State]

    @property
    def counter(self) -> int:
        return self.consumer.lease.lease_counter

    @property
    def ended(self) -> bool:
        return self.task.done()

    @property
    def lost(self) -> bool:
        return self.consumer.lost

    def lose(self) -> None:
        self.consumer.lose()


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        db: asyncpg.Pool,
        kinesis_client: Any,
        kms_client: Any,
        records_client: Any | None = None,
        metrics: Metrics | None = None,
        pool: DecodePool | None = None,
    ) -> None:
        """``records_client`` is the Kinesis client of the shard consumers (GetShardIterator,
        GetRecords): it should make no retries of its own, so that every GetRecords attempt is
        paced (see ShardConsumer); by default ``kinesis_client``. ``pool``: the decode pool,
        started early (DecodePool.prestart) with ``settings.processes`` processes and its own
        budget; by default the worker makes one."""
        self.settings = settings
        self.metrics = metrics or Metrics(settings.stream_name)
        self.leases = LeaseStore(db, settings.stream_name, lease_seconds=settings.lease_seconds)
        decoder = settings.shard.commit.decoder
        #: the policy rules, compiled here too: the sink records what the decode processes
        #: found for them in each batch's transaction (alerts commit with their events)
        self.rules = (
            load_rules(decoder.rules, builtins=decoder.builtin_rules) if decoder.policy else None
        )
        self.sink = Sink(
            db,
            chain=settings.chain,
            policy=PolicyRecorder(self.rules) if self.rules is not None else None,
        )
        self.deliverer = Deliverer(
            db,
            [parse_notifier(n, syslog_cafile=settings.syslog_cafile) for n in settings.notify],
            metrics=DeliveryMetrics(self.metrics.registry),
        )
        self._db = db
        self.anchor_key = (
            AnchorKey(kms_client, settings.anchor_key_id) if settings.anchor_key_id else None
        )
        self._anchored_at = time.monotonic()
        self.reader = KinesisReader(kinesis_client, settings.stream_name)
        self.records = KinesisReader(records_client or kinesis_client, settings.stream_name)
        self.keys = DataKeyCache(kms_client)
        if pool is None:
            budget = WorkBudget(max_batches=settings.queue_batches, max_bytes=settings.queue_bytes)
            pool = DecodePool(settings.processes, budget)
        self.budget = pool.budget
        self.pool = pool
        self.health = DependencyHealth(unready_after=settings.unready_after)
        self.readiness = Readiness(self.health, self.metrics, unready_after=settings.unready_after)
        # das_ready is /readyz, computed when scraped, so the two never disagree.
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        self.running: dict[str, _Running] = {}
        self.renewer = LeaseRenewer(
            self.leases,
            worker_id=settings.worker_id,
            lease_seconds=settings.lease_seconds,
            health=self.health,
            held=lambda: self.running,
            ready=lambda: self.ready,
        )
        self.last_cycle = 0.0
        #: monotonic time of the coordinator loop's last turn, successful or not (liveness)
        self.last_turn = time.monotonic()
        self._releasing: set[asyncio.Task[bool]] = set()
        self._stop = asyncio.Event()
        self._sync_due = 0.0
        self._partitions_due = 0.0
        self._idle_since: float | None = None
        #: the last cycle found every shard held by a live worker (idleness needs it)
        self._everything_owned = False
        self._kms_seen = (0, 0)
        self._refused_seen = (0, 0)
        self.exit_reason = ""
        self._prune_due = 0.0

    # -- public -------------------------------------------------------------------------

    def request_stop(self, reason: str = "signal") -> None:
        if not self._stop.is_set():
            log.info("stop requested", extra={"reason": reason})
            self.exit_reason = reason
            self._stop.set()

    @property
    def held(self) -> list[str]:
        return sorted(self.running)

    @property
    def ready(self) -> bool:
        """Coordinator cycles work, no dependency is unhealthy, not stopping."""
        return self.readiness.ready

    async def run(self) -> None:
        """Run until stopped (signal or --stop-when-idle); always shuts down gracefully."""
        interval = self.settings.lease_seconds / 3
        warming = asyncio.ensure_future(self.pool.warm(self.settings.shard.commit.decoder))
        renewer = asyncio.ensure_future(
            run_loop("renewer", self.renewer.renew, every=interval, on_error=self._renewal_failed)
        )
        watch = asyncio.ensure_future(run_loop("health watch", self._watch, every=WATCH_SECONDS))
        alerts = asyncio.ensure_future(
            run_loop("alerts", self._alerts, every=self.settings.alerts_seconds)
        )
        coordinator = asyncio.ensure_future(self._coordinate())
        try:
            await supervise(
                ("coordinator", coordinator),
                {"renewer": renewer, "health watch": watch, "alerts": alerts},
            )
        finally:
            for task in (coordinator, warming, watch, alerts):
                if not task.done():
                    task.cancel()
            await asyncio.gather(coordinator, warming, watch, alerts, return_exceptions=True)
            for notifier in self.deliverer.notifiers.values():
                await notifier.close()
            await self._shutdown(renewer)

    # -- the coordinator ----------------------------------------------------------------

    async def _coordinate(self) -> None:
        interval = self.settings.lease_seconds / 3
        # Balance with this worker's own heartbeat (and the fleet it sees) on record.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.renewer.heartbeat_done.wait(), interval)
        await run_loop(
            "coordinator",
            self._turn,
            every=interval,
            stop=self._stop,
            backoff=Backoff(base=0.2, cap=interval),
            on_error=self._cycle_failed,
            from_start=False,
        )

    async def _turn(self) -> None:
        self.last_turn = time.monotonic()
        await self._cycle()
        self.readiness.cycle_worked()
        self.readiness.publish()
        self.last_cycle = time.monotonic()
        if self._idle_done():
            self.request_stop("idle")

    def _cycle_failed(self, error: BaseException, delay: float) -> None:
        # Database or Kinesis unreachable: keep trying, no crash loop; not ready if it lasts.
        self.last_turn = time.monotonic()
        self.readiness.cycle_failed()
        self.metrics.retries.labels("coordinator").inc()
        log.warning(
            "coordinator cycle failed; retrying", extra={"error": describe(error), "delay": delay}
        )

    async def _cycle(self) -> None:
        outstanding = self.health.outstanding
        sync_now = self._reap()
        now = time.monotonic()
        if sync_now or now >= self._sync_due:
            with outstanding("kinesis"):
                shards = await self.reader.list_shards()
            with outstanding("postgres"):
                created = await self.leases.sync_shards(shards, self.settings.initial_position)
            if created:
                log.info("new shards", extra={"count": created})
            self._sync_due = now + self.settings.shard_sync_seconds
        if now >= self._partitions_due:
            # Day partitions are created ahead, so commits rarely wait for DDL.
            today = datetime.now(UTC).date()
            with outstanding("postgres"):
                await self.sink.ensure_partitions({today + timedelta(days=d) for d in range(3)})
            self._partitions_due = now + 3600
        live = self.renewer.live
        with outstanding("postgres"):
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
                heads = await anchor_heads(conn, self.anchor_key, self.settings.stream_name, shards)
                made = len(heads)
                # The alert chain is the fleet's, not a shard's: any worker may anchor its head
                # (two at once anchor the same head twice, which verify accepts).
                if await anchor_alert_head(conn, self.anchor_key) is not None:
                    made += 1
        except (AnchorError, ConfigError) as exc:
            # KMS unavailable, or the key refused since startup (disabled, policy changed): the
            # links stay unanchored until a later try succeeds; nothing is lost, ingest goes on.
            self.metrics.retries.labels("anchor").inc()
            log.warning("could not anchor chain heads", extra={"error": describe(exc)})
            return
        if made:
            self.metrics.anchors.inc(made)
            log.info("anchored chain heads", extra={"count": made})

    # -- the renewer and the health watch -----------------------------------------------

    def _renewal_failed(self, error: BaseException, _delay: float) -> None:
        # The commits of the leases it holds are fenced all the same; keep trying.
        self.metrics.retries.labels("renewal").inc()
        log.warning("lease renewal failed; retrying", extra={"error": describe(error)})

    async def _watch(self) -> None:
        self.readiness.publish()
        # Idleness is checked here, every WATCH_SECONDS, not once per coordinator cycle
        # (lease_seconds / 3): --stop-when-idle N then stops within N + WATCH_SECONDS of the
        # last commit, not up to two cycles later.
        if self._idle_done():
            self.request_stop("idle")

    async def _alerts(self) -> None:
        """Stream health rules and alert delivery. Never a reason to stop ingesting: a
        warehouse or notifier fault is logged and the next round tries again."""
        try:
            if self.rules is not None:
                # Only instances carried by shards we have read to the tip are judged (and
                # against the wall clock too): see ingest.alerts.health.
                tip = {
                    (run.consumer.lease.stream_name, sid)
                    for sid, run in self.running.items()
                    if run.consumer.caught_up
                }
                async with self._db.acquire() as conn:
                    if tip:
                        raised = await check_heartbeats(
                            conn, self.rules, now=datetime.now(UTC), caught_up=True, shards=tip
                        )
                        log.debug(
                            "stream health checked",
                            extra={"shards": len(tip), "count": len(raised)},
                        )
                    if time.monotonic() >= self._prune_due:
                        self._prune_due = time.monotonic() + PRUNE_SECONDS
                        await prune_counters(conn)
            await self.deliverer.run_once()
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("alerts round failed; next round retries", extra={"error": describe(exc)})

    # -- consumers ------------------------------------------------------------------------

    def _reap(self) -> bool:
        """Collect ended consumers; True when a shard ended (so children may now exist)."""
        ended_shard = False
        for shard_id, run in list(self.running.items()):
            if not run.task.done():
                continue
            del self.running[shard_id]
            self.metrics.forget_shard(shard_id)  # its lag is no longer ours to report
            finished = not run.task.cancelled() and run.consumer.state is State.SHARD_END
            if self._account(run):
                # A closed shard's chain is complete: anchor its head before letting go
                # (periodic anchoring only covers the shards still held).
                self._spawn_release(run.consumer.lease, anchor=finished)
            ended_shard |= finished
        self.metrics.leases_held.set(len(self.running))
        return ended_shard

    def _account(self, run: _Running) -> bool:
        """Count how a consumer ended (once); True when its lease is still ours to release."""
        shard_id = run.consumer.shard_id
        if run.task.cancelled():
            return True  # cancelled at the shutdown deadline: never committed past its lease
        exc = run.task.exception()
        if exc is not None:
            log.error(
                "shard consumer crashed; releasing its lease",
                extra={"shard": shard_id, "error": describe(exc)},
            )
            self.metrics.lease_changes.labels("crashed").inc()
            return True
        state = run.task.result()
        if state is State.LEASE_LOST:
            self.metrics.lease_changes.labels("lost").inc()
            return False
        if state is State.SHARD_END:
            self.metrics.lease_changes.labels("finished").inc()
        return True

    async def _release(self, lease: LeaseToken) -> bool:
        with self.health.outstanding("postgres"):
            released = await self.leases.release(lease.owner, lease.shard_id, lease.lease_counter)
        if released:
            self.metrics.lease_changes.labels("released").inc()
        return released

    def _spawn_release(self, lease: LeaseToken, *, anchor: bool = False) -> None:
        async def release() -> bool:
            if anchor:
                try:
                    await self._anchor([lease.shard_id])
                except Exception as exc:  # noqa: BLE001 - never keeps the lease from release
                    log.warning(
                        "could not anchor a finished shard",
                        extra={"shard": lease.shard_id, "error": describe(exc)},
                    )
            return await self._release(lease)

        task = asyncio.ensure_future(release())
        self._releasing.add(task)  # a reference, so the task is not collected midway
        task.add_done_callback(self._releasing.discard)
        task.add_done_callback(_log_task_error)

    async def _balance(self, eligible: list[tuple[Lease, bool]], live: list[str]) -> None:
        if self._stop.is_set():
            return
        me = self.settings.worker_id
        plan = plan_balance(
            eligible,
            me=me,
            live=live,
            running=self.running.keys(),
            max_leases=self.settings.max_leases,
        )
        for lease in plan.take:
            got = await self.leases.take(lease, me)
            if got is not None:
                self.metrics.lease_changes.labels("taken").inc()
                self._start(got)
        if plan.steal is not None:
            got = await self.leases.take(plan.steal, me)
            if got is not None:
                log.info("stole lease", extra={"shard": got.shard_id, "from": plan.victim})
                self.metrics.lease_changes.labels("stolen").inc()
                self._start(got)

    def _start(self, lease: Lease) -> None:
        token = LeaseToken(
            lease.stream_name, lease.shard_id, self.settings.worker_id, lease.lease_counter
        )
        consumer = ShardConsumer(
            lease=token,
            checkpoint=lease.checkpoint,
            reader=self.records,
            keys=self.keys,
            encryption_context=encryption_context(self.settings.resource_id),
            pool=self.pool,
            sink=self.sink,
            leases=self.leases,
            metrics=self.metrics,
            settings=self.settings.shard,
            health=self.health,
            parents=lease.parent_shard_ids,
        )
        task = asyncio.ensure_future(consumer.run())
        self.running[lease.shard_id] = _Running(consumer, task)
        self.metrics.leases_held.set(len(self.running))
        log.info(
            "consuming shard",
            extra={
                "shard": lease.shard_id,
                "checkpoint": lease.checkpoint,
                "counter": lease.lease_counter,
            },
        )

    # -- idleness -------------------------------------------------------------------------

    def _update_idle(self, eligible: list[tuple[Lease, bool]], live: list[str]) -> None:
        # Held by a live worker: an unexpired lease whose owner heartbeats in das.workers.
        alive = set(live) | {self.settings.worker_id}
        # ``eligible`` was read before this cycle balanced: a lease it has just taken counts
        # as owned now (else a worker that took every lease would wait a whole cycle more).
        everything_owned = all(
            (not expired and lease.owner in alive) or lease.shard_id in self.running
            for lease, expired in eligible
        )
        self._everything_owned = everything_owned
        if everything_owned and not self.running:
            if self._idle_since is None:
                self._idle_since = time.monotonic()
        else:
            self._idle_since = None

    def _idle_done(self) -> bool:
        """Every shard is owned (as of the last cycle) and each consumer this worker runs has
        been caught up and empty for ``stop_when_idle`` seconds (counted by the consumer from
        its last commit or first empty page); a worker running none, for that long since the
        cycle that found everything owned."""
        wait = self.settings.stop_when_idle
        if wait is None or not self._everything_owned:
            return False
        now = time.monotonic()
        if not self.running:
            return self._idle_since is not None and now - self._idle_since >= wait
        return all(
            (since := r.consumer.idle_since) is not None and now - since >= wait
            for r in self.running.values()
        )

    # -- shutdown -----------------------------------------------------------------------

    async def _shutdown(self, renewer: asyncio.Future[None]) -> None:
        self.readiness.stopping = True
        for run in self.running.values():
            run.consumer.stop()
        tasks = [r.task for r in self.running.values()]
        if tasks:
            # Phase one: the consumers commit the batches in hand; the renewer keeps the leases
            # meanwhile (a drain may take longer than a lease period).
            _done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_deadline)
            for task in pending:
                task.cancel()
            if pending:
                # Phase two. A commit already under way is shielded and completes or rolls
                # back as a whole; nothing else of a cancelled batch was written.
                log.warning(
                    "shutdown deadline passed; cancelled consumers", extra={"count": len(pending)}
                )
                await asyncio.gather(*pending, return_exceptions=True)
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        ours = {shard_id: run for shard_id, run in self.running.items() if self._account(run)}
        self.running.clear()
        # The heads of what we leave behind are anchored before anyone else extends them.
        with contextlib.suppress(Exception):
            await self._anchor(sorted(ours))
        releases: list[Awaitable[bool]] = [self._release(r.consumer.lease) for r in ours.values()]
        results = await asyncio.gather(*releases, *self._releasing, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            log.warning(
                "could not release some leases; they expire by themselves",
                extra={"count": len(errors), "error": describe(errors[0])},
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
        refused, cached = self.keys.stats.refused, self.keys.stats.refused_cached
        self.metrics.kms_refused.labels("kms").inc(refused - self._refused_seen[0])
        self.metrics.kms_refused.labels("cache").inc(cached - self._refused_seen[1])
        self._refused_seen = (refused, cached)
        self.metrics.queue_batches.set(self.budget.batches)
        self.metrics.queue_bytes.set(self.budget.bytes)


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        assert exc is not None
        log.warning("background lease write failed", extra={"error": describe(exc)})
