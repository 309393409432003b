"""The lease renewer: heartbeats the worker and renews the leases it holds.

It runs on its own (every ``lease_seconds / 3``) so that slow calls of the coordinator
(ListShards from a slow Kinesis, partition DDL waiting for a lock) never delay a renewal past
the lease period. A lease it could not renew is lost: its consumer is told so and stops (its
commits would be refused anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from ingest.consumer.dependencies import DependencyHealth

log = logging.getLogger("ingest.consumer.worker")


class RenewalStore(Protocol):
    """The lease store's heartbeat and renewal (warehouse.leases.LeaseStore)."""

    async def heartbeat_worker(self, worker_id: str, *, ready: bool) -> list[str]: ...

    async def renew(self, owner: str, held: dict[str, int]) -> set[str]: ...


class Held(Protocol):
    """A running shard consumer, as the renewer sees it."""

    @property
    def counter(self) -> int: ...

    @property
    def ended(self) -> bool: ...

    @property
    def lost(self) -> bool: ...

    def lose(self) -> None: ...


class LeaseRenewer:
    def __init__(
        self,
        store: RenewalStore,
        *,
        worker_id: str,
        lease_seconds: float,
        health: DependencyHealth,
        held: Callable[[], Mapping[str, Held]],
        ready: Callable[[], bool],
    ) -> None:
        self._store = store
        self._me = worker_id
        self._lease_seconds = lease_seconds
        self._health = health
        self._held = held
        self._ready = ready
        #: the live workers, as of the last heartbeat
        self.live: list[str] = []
        #: set once this worker's heartbeat is on record
        self.heartbeat_done = asyncio.Event()
        #: monotonic time of the last successful renewal
        self.last_renewal = 0.0

    async def renew(self) -> None:
        """Heartbeat, renew what we hold, and tell the consumers whose lease is gone."""
        with self._health.outstanding("postgres"):
            self.live = await self._store.heartbeat_worker(self._me, ready=self._ready())
            self.heartbeat_done.set()
            running = self._held()
            held = {shard_id: run.counter for shard_id, run in running.items() if not run.ended}
            renewed = await self._store.renew(self._me, held)
        # Renewed within the lease period, a lease cannot have expired: another worker stole it
        # to balance the fleet (routine). Otherwise this worker was too slow to keep it.
        expired = time.monotonic() - self.last_renewal >= self._lease_seconds
        self.last_renewal = time.monotonic()
        running = self._held()
        for shard_id, counter in held.items():
            if shard_id in renewed:
                continue
            run = running.get(shard_id)
            if run is None or run.ended or run.counter != counter:
                continue  # ended or released meanwhile: not a loss
            if not run.lost:
                log.log(
                    logging.WARNING if expired else logging.INFO,
                    "lease lost at renewal",
                    extra={
                        "shard": shard_id,
                        "counter": counter,
                        "reason": "expired" if expired else "taken by another worker (balancing)",
                    },
                )
            run.lose()
