"""One shard's consumer: an explicit state machine, one task per held lease (KCL ConsumerStates).

::

    WAITING_ON_PARENTS --parents at SHARD_END--> INITIALIZING --iterator--> PROCESSING <--.
                                                      |                      |  |      |
                                                      | no iterator          |  `------'
                                                      v                      |  page committed
                                                  SHARD_END <----------------'
                                                               last page committed

    from each of the three working states:
        stop requested                                  ------> SHUTTING_DOWN
        lease lost (commit refused, or renewal failed)  ------> LEASE_LOST

Each state has a handler that returns the next state (:data:`TRANSITIONS`); SHARD_END,
SHUTTING_DOWN and LEASE_LOST are final: the worker releases the lease (for good after
SHARD_END, so the children become eligible) or forgets it (LEASE_LOST). Nothing drives a
transition but a handler's return value: a stop request is an event the handlers wait on beside
their work, a refused commit is a :class:`~ingest.consumer.committer.CommitOutcome`.

- WAITING_ON_PARENTS: a child shard (after a split or merge) starts only once every parent's
  checkpoint is SHARD_END, so records of one partition key are read in order across
  resharding. The worker only takes such leases; the consumer checks again, as the KCL does.
- INITIALIZING: an iterator just after the checkpoint; the first page is prefetched.
- PROCESSING, once per page: the page is decoded and committed (never cancelled midway by a
  stop: the batch in hand always commits) while the next one is fetched (ShardFetcher:
  at most one GetRecords call in flight, at most 5 calls per second, expired iterators
  renewed); ShardCommitter commits in chunks, in sequence order, each in one transaction with
  its checkpoint.

Transient faults (throttling, network, database restarts, KMS throttling) are retried with
backoff (ingest.retry) and never dead-lettered; records that cannot be decoded are dead-lettered
with their stage and the shard moves on. Every call to a dependency is reported to the worker's
DependencyHealth while it is outstanding, so a dependency that stays down (or hangs) makes the
worker unready.

Memory: a consumer holds at most two pages -- the one being decoded and committed and the one
prefetched -- each at most --max-records records and at most 10 MB (the GetRecords limit).
Pages are not counted in the decode pool's WorkBudget (its chunks are, while decoded): charging
a page and then its chunks to one budget could deadlock, so the page bound is per shard and
documented in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

from ingest.checkpoint import SHARD_END, is_after
from ingest.consumer.committer import (
    CheckpointSource,
    CommitOutcome,
    CommitSettings,
    CommitSink,
    Decoder,
    KeySource,
    ShardCommitter,
)
from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.fetcher import (
    FetchSettings,
    RecordReader,
    ShardFetcher,
    ShardStatus,
    with_retries,
)
from ingest.kinesis import RecordsPage
from ingest.lease import LeaseToken
from ingest.metrics import Metrics
from ingest.retry import Backoff, RetryStopped

log = logging.getLogger(__name__)

T = TypeVar("T")


#: A shard this close to the tip of its stream (MillisBehindLatest) counts as caught up for
#: the stream health rules.
CAUGHT_UP_MS = 10_000


class State(enum.Enum):
    WAITING_ON_PARENTS = "waiting_on_parents"
    INITIALIZING = "initializing"
    PROCESSING = "processing"
    SHARD_END = "shard_end"
    SHUTTING_DOWN = "shutting_down"
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True)
class ShardSettings:
    fetch: FetchSettings = field(default_factory=FetchSettings)
    commit: CommitSettings = field(default_factory=CommitSettings)
    #: How often a child shard checks whether its parents reached SHARD_END.
    parent_poll: float = 1.0


class _Stopped:
    """What a wait returns when the stop event fired first."""


STOPPED: Final = _Stopped()

Handler = Callable[["ShardConsumer"], Awaitable[State]]


@dataclass(frozen=True)
class Transition:
    handler: Handler | None
    #: the states the handler may return
    next: frozenset[State]


class ShardConsumer:
    def __init__(
        self,
        *,
        lease: LeaseToken,
        checkpoint: str,
        reader: RecordReader,
        keys: KeySource,
        encryption_context: dict[str, str],
        pool: Decoder,
        sink: CommitSink,
        leases: CheckpointSource,
        metrics: Metrics,
        settings: ShardSettings,
        health: DependencyHealth | None = None,
        parents: tuple[str, ...] = (),
    ) -> None:
        self.lease = lease
        self.parents = parents
        self.state = State.WAITING_ON_PARENTS
        self.status = ShardStatus(checkpoint=checkpoint)
        self._leases = leases
        self._settings = settings
        self._health = health or DependencyHealth()
        self._metrics = metrics
        self._stop = asyncio.Event()
        self._lost = False
        self._backoff = Backoff(base=0.1, cap=10.0)
        self.fetcher = ShardFetcher(
            shard_id=lease.shard_id,
            reader=reader,
            settings=settings.fetch,
            status=self.status,
            metrics=metrics,
            transient=self.transient,
        )
        self.committer = ShardCommitter(
            lease=lease,
            keys=keys,
            encryption_context=encryption_context,
            pool=pool,
            sink=sink,
            leases=leases,
            metrics=metrics,
            settings=settings.commit,
            health=self._health,
            status=self.status,
            transient=self.transient,
            backoff=self._backoff,
        )

    @property
    def shard_id(self) -> str:
        return self.lease.shard_id

    def stop(self) -> None:
        """Finish the batch in hand (commit it), then end. Idempotent."""
        self._stop.set()

    def lose(self) -> None:
        """The lease was lost (renewal refused): stop, and end as LEASE_LOST. Idempotent."""
        self._lost = True
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def lost(self) -> bool:
        return self._lost

    @property
    def idle_since(self) -> float | None:
        """Since when the shard is caught up and empty with nothing in hand; None if busy."""
        return None if self.status.busy else self.status.idle_since

    @property
    def caught_up(self) -> bool:
        """Read to the tip (the last page neither full nor more than ``CAUGHT_UP_MS`` behind)
        and everything fetched committed: what the shard carried so far is in the warehouse,
        so the stream health rules may judge the instances whose heartbeats it carries."""
        s = self.status
        return (
            self.state is State.PROCESSING
            and not self._stop.is_set()
            and s.lag_ms is not None
            and s.lag_ms < CAUGHT_UP_MS
            and not s.full
            and (s.fetched is None or not is_after(s.fetched, s.checkpoint))
        )

    # -- the machine ----------------------------------------------------------------------

    async def run(self) -> State:
        """Run the handlers from WAITING_ON_PARENTS to a final state, and return it. The
        worker counts the lease change from it (once: a lease lost at renewal often makes the
        batch in hand fail its commit too). Unexpected errors propagate (a crash: the worker
        releases the lease and logs it)."""
        try:
            while (step := TRANSITIONS[self.state]).handler is not None:
                following = await step.handler(self)
                assert following in step.next, f"{self.state} -> {following}"
                log.debug(
                    "shard state",
                    extra={"shard": self.shard_id, "from": self.state.value, "to": following.value},
                )
                self.state = following
        finally:
            await self.fetcher.cancel()
        return self.state

    def _stopped(self) -> State:
        return State.LEASE_LOST if self._lost else State.SHUTTING_DOWN

    async def wait_on_parents(self) -> State:
        """INITIALIZING once no parent is left unfinished (a parent without a lease row is
        long gone: finished)."""
        while True:
            unfinished = []
            for parent in self.parents:
                checkpoint = await self.until_stopped(
                    self.transient(lambda p=parent: self._leases.checkpoint_of(p), "postgres")  # type: ignore[misc]
                )
                if checkpoint is STOPPED:
                    return self._stopped()
                if checkpoint is not None and checkpoint != SHARD_END:
                    unfinished.append(parent)
            if not unfinished:
                return State.INITIALIZING
            log.info("waiting on parent shards", extra={"shard": self.shard_id})
            stopped = await self.until_stopped(asyncio.sleep(self._settings.parent_poll))
            if stopped is STOPPED:
                return self._stopped()

    async def initialize(self) -> State:
        """PROCESSING with the first page prefetched; SHARD_END when there is nothing to read."""
        iterator = await self.until_stopped(self.fetcher.iterator())
        if isinstance(iterator, _Stopped):
            return self._stopped()
        if iterator is None:
            return State.SHARD_END
        self.fetcher.prefetch(iterator)
        return State.PROCESSING

    async def process(self) -> State:
        """Commit one page while the next is fetched."""
        page: RecordsPage | _Stopped = await self.until_stopped(self.fetcher.next_page())
        if isinstance(page, _Stopped):
            return self._stopped()
        final = page.next_iterator is None
        if page.next_iterator is not None and not self._stop.is_set():
            self.fetcher.prefetch(page.next_iterator)
        outcome = await self.committer.commit_page(page.records, final=final)
        if outcome is CommitOutcome.LEASE_LOST:
            return State.LEASE_LOST
        if final:
            return State.SHARD_END
        if self._stop.is_set():
            return self._stopped()
        return State.PROCESSING

    # -- waiting and retrying -----------------------------------------------------------

    async def until_stopped(self, work: Awaitable[T]) -> T | _Stopped:
        """``work``'s result, or STOPPED (and ``work`` cancelled) if a stop comes first."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            waiting: set[asyncio.Future[object]] = {task, stopper}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task in done and not task.cancelled():
            error = task.exception()
            if not isinstance(error, RetryStopped):
                return task.result()
        return STOPPED

    def transient(self, op: Callable[[], Awaitable[T]], target: str) -> Awaitable[T]:
        """Run ``op`` under the retry policy; retries of Kinesis calls end when stopping (the
        batch in hand still gets its data keys and its commit)."""
        return with_retries(
            op,
            shard_id=self.shard_id,
            target=target,
            backoff=self._backoff,
            health=self._health,
            metrics=self._metrics,
            stop=self._stop if target == "kinesis" else None,
        )


_FINAL: frozenset[State] = frozenset()
_ANY_END = frozenset({State.SHUTTING_DOWN, State.LEASE_LOST})

#: State -> handler -> the states it may return (the diagram above, as data).
TRANSITIONS: Mapping[State, Transition] = {
    State.WAITING_ON_PARENTS: Transition(
        ShardConsumer.wait_on_parents, frozenset({State.INITIALIZING}) | _ANY_END
    ),
    State.INITIALIZING: Transition(
        ShardConsumer.initialize, frozenset({State.PROCESSING, State.SHARD_END}) | _ANY_END
    ),
    State.PROCESSING: Transition(
        ShardConsumer.process, frozenset({State.PROCESSING, State.SHARD_END}) | _ANY_END
    ),
    State.SHARD_END: Transition(None, _FINAL),
    State.SHUTTING_DOWN: Transition(None, _FINAL),
    State.LEASE_LOST: Transition(None, _FINAL),
}

FINAL_STATES = frozenset(s for s, t in TRANSITIONS.items() if t.handler is None)

__all__ = ["FINAL_STATES", "TRANSITIONS", "ShardConsumer", "ShardSettings", "State"]
