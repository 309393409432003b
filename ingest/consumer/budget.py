"""A work budget bounded by batches AND bytes: backpressure from the process pool to the readers.

A shard reader acquires budget for a batch before handing it to the pool and releases it when
the batch is decoded; when the pool falls behind, readers wait here instead of piling batches up
in memory. Admission is first come, first served: a batch waits until every batch that asked
before it was admitted, so a big batch cannot be starved by a stream of small ones slipping
into the room it waits for. A single batch larger than the byte bound is admitted alone (when
nothing else is held), so nothing deadlocks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class WorkBudget:
    def __init__(self, *, max_batches: int, max_bytes: int) -> None:
        if max_batches < 1 or max_bytes < 1:
            raise ValueError("budget bounds must be positive")
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self.batches = 0
        self.bytes = 0
        self._changed = asyncio.Condition()
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()

    @property
    def waiting(self) -> int:
        """Batches waiting for admission."""
        return len(self._queue)

    def _fits(self, size: int) -> bool:
        if self.batches == 0:
            return True
        return self.batches < self.max_batches and self.bytes + size <= self.max_bytes

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        ticket = next(self._tickets)
        async with self._changed:
            self._queue.append(ticket)
            try:
                await self._changed.wait_for(lambda: self._queue[0] == ticket and self._fits(size))
            finally:
                # Admitted, or cancelled while waiting: either way no longer in line, and the
                # next in line may fit now.
                self._queue.remove(ticket)
                self._changed.notify_all()
            self.batches += 1
            self.bytes += size
        try:
            yield
        finally:
            async with self._changed:
                self.batches -= 1
                self.bytes -= size
                self._changed.notify_all()
