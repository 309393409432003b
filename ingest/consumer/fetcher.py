"""Reading one shard: paced GetRecords, one page prefetched, iterators renewed when they expire.

At most one GetRecords call is in flight per shard, and a call starts at least
``min_call_interval`` after the previous one returned, retries included: at most 5 calls per
second per shard reach Kinesis. The next page is fetched while the current one is decoded and
committed (aiokafka keeps one unconsumed result per partition the same way: backpressure
without a scheduler). Shard iterators live five minutes: an expired one is replaced by a fresh
iterator from the last checkpoint (the committer drops records at or before it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.failures import describe
from ingest.kinesis import IteratorExpiredError, RecordsPage
from ingest.metrics import Metrics
from ingest.retry import Backoff, retry

log = logging.getLogger("ingest.consumer.shard")

T = TypeVar("T")


class RecordReader(Protocol):
    """The Kinesis calls of a shard consumer (kinesis.KinesisReader)."""

    async def iterator(self, shard_id: str, checkpoint: str) -> str | None: ...

    async def get_records(self, iterator: str, limit: int) -> RecordsPage: ...


@dataclass
class ShardStatus:
    """What the worker reads of a running shard consumer (idleness, lag, checkpoint)."""

    checkpoint: str = ""
    #: monotonic time since which the shard has been caught up and empty, or None.
    idle_since: float | None = None
    lag_ms: int | None = None
    #: a page is being decoded and committed
    busy: bool = False
    #: the sequence number of the last record fetched (None: none yet), and whether the last
    #: page was full (more records wait, whatever MillisBehindLatest says)
    fetched: str | None = None
    full: bool = False


@dataclass(frozen=True)
class FetchSettings:
    max_records: int = 1000
    #: Kinesis allows 5 GetRecords calls per second per shard: a call starts at least this long
    #: after the previous one returned (see ShardFetcher.paced_get_records).
    min_call_interval: float = 0.2
    #: Pause after an empty page when caught up (latency versus GetRecords calls).
    idle_sleep: float = 0.5


class Transient(Protocol):
    """Runs a call to a dependency with the consumer's retry policy (ShardConsumer.transient)."""

    def __call__(self, op: Callable[[], Awaitable[T]], target: str) -> Awaitable[T]: ...


class ShardFetcher:
    def __init__(
        self,
        *,
        shard_id: str,
        reader: RecordReader,
        settings: FetchSettings,
        status: ShardStatus,
        metrics: Metrics,
        transient: Transient,
    ) -> None:
        self.shard_id = shard_id
        self._reader = reader
        self._settings = settings
        self._status = status
        self._metrics = metrics
        self._transient = transient
        self._last_call = 0.0
        self._pending: asyncio.Future[RecordsPage] | None = None

    async def iterator(self) -> str | None:
        """An iterator just after the checkpoint; None when the shard is finished."""
        return await self._transient(
            lambda: self._reader.iterator(self.shard_id, self._status.checkpoint), "kinesis"
        )

    def prefetch(self, iterator: str) -> None:
        """Start fetching the page at ``iterator`` (one in flight at most)."""
        assert self._pending is None or self._pending.done(), "one fetch in flight at most"
        self._pending = asyncio.ensure_future(self.fetch(iterator))

    def next_page(self) -> asyncio.Future[RecordsPage]:
        """The page being prefetched (started by :meth:`prefetch`)."""
        assert self._pending is not None, "nothing prefetched"
        pending, self._pending = self._pending, None
        return pending

    async def cancel(self) -> None:
        """Drop the page being prefetched, if any."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

    async def paced_get_records(self, iterator: str) -> RecordsPage:
        """One GetRecords call, at least ``min_call_interval`` after the previous one returned.

        Spacing the *answers* and the next call, rather than the starts of calls, is what holds
        at the server whatever the network does in between: a call is received before it is
        answered, so the server sees consecutive calls at least the interval apart, even when a
        request spent longer in transit than the one after it. Every attempt comes through
        here, retries of throttled calls included (the client for records has no retries of its
        own), so at most 5 calls per second per shard reach Kinesis in any case.
        """
        due = self._last_call + self._settings.min_call_interval
        # A loop, not one sleep: asyncio may wake a timer up to its clock resolution early.
        while (wait := due - time.monotonic()) > 0:  # noqa: ASYNC110 - a deadline, not an event
            await asyncio.sleep(wait)
        try:
            return await self._reader.get_records(iterator, self._settings.max_records)
        finally:
            self._last_call = time.monotonic()

    async def fetch(self, iterator: str) -> RecordsPage:
        """The next page with records, or the last page of a closed shard. Empty pages are
        skipped (after ``idle_sleep`` when caught up)."""
        while True:
            try:
                page = await self._transient(
                    lambda iterator=iterator: self.paced_get_records(iterator),  # type: ignore[misc]
                    "kinesis",
                )
            except IteratorExpiredError:
                # A fresh iterator from the checkpoint may overlap the page being committed;
                # the committer drops records at or before the checkpoint.
                log.info("shard iterator expired; renewing it", extra={"shard": self.shard_id})
                fresh = await self.iterator()
                if fresh is None:
                    return RecordsPage([], None, None)
                iterator = fresh
                continue
            self._note_progress(page)
            if page.records or page.next_iterator is None:
                return page
            if (page.millis_behind_latest or 0) == 0:
                # Caught up and empty: poll again after a pause.
                await asyncio.sleep(self._settings.idle_sleep)
            iterator = page.next_iterator

    def _note_progress(self, page: RecordsPage) -> None:
        status = self._status
        status.lag_ms = page.millis_behind_latest
        status.full = len(page.records) >= self._settings.max_records
        if page.records:
            status.fetched = page.records[-1].sequence_number
        if page.millis_behind_latest is not None:
            self._metrics.observe_lag(self.shard_id, page.millis_behind_latest)
        caught_up = not page.records and (page.millis_behind_latest or 0) == 0
        if caught_up and page.next_iterator is not None:
            if status.idle_since is None:
                status.idle_since = time.monotonic()
        else:
            status.idle_since = None


def log_retry(shard_id: str, target: str, error: BaseException, delay: float) -> None:
    log.warning(
        "transient fault; retrying",
        extra={
            "shard": shard_id,
            "target": target,
            "error": describe(error),
            "delay": round(delay, 3),
        },
    )


async def with_retries(
    op: Callable[[], Awaitable[T]],
    *,
    shard_id: str,
    target: str,
    backoff: Backoff,
    health: DependencyHealth,
    metrics: Metrics,
    stop: asyncio.Event | None,
) -> T:
    """A shard consumer's call to ``target`` under the retry policy (see ingest.retry)."""

    def on_retry(error: BaseException, _attempt: int, delay: float) -> None:
        metrics.retries.labels(target).inc()
        log_retry(shard_id, target, error, delay)

    return await retry(
        op, backoff=backoff, dependency=target, health=health, stop=stop, on_retry=on_retry
    )
