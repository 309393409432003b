"""One shard's consumer: an explicit state machine, one task per held lease.

    INITIALIZING --iterator from checkpoint--> PROCESSING --NextShardIterator is null--> SHARD_END
         |                                         |  \\
         |                                         |   `--stop requested--> SHUTTING_DOWN
         `--------------- lease lost (commit refused or renewal failed) ---> LEASE_LOST

PROCESSING keeps at most one GetRecords call in flight, at most 5 calls per second (retries
included), and prefetches the next page while the current one is decoded and committed (aiokafka
keeps one unconsumed result per partition the same way: backpressure without a scheduler).
Commits run strictly in sequence order, each in one transaction with the new checkpoint (see
Sink).

Transient faults (throttling, network, database restarts, KMS throttling) are retried with
backoff and never dead-lettered; records that cannot be decoded are dead-lettered with their
stage and the shard moves on. Every call to a dependency is reported to the worker's
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
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.failures import describe
from ingest.consumer.pool import DecodePool, DecoderCrashedError
from ingest.decode.batch import (
    BatchInput,
    BatchOutput,
    DecoderConfig,
    Failure,
    HeartbeatRow,
    decode_batch,
)
from ingest.decode.envelope import read_envelope
from ingest.errors import DecodeError, IngestError, KmsUnavailableError
from ingest.kinesis import (
    IteratorExpiredError,
    KinesisReader,
    KinesisRecord,
    KinesisUnavailableError,
    RecordsPage,
)
from ingest.kms import DataKeyCache
from ingest.metrics import Metrics
from ingest.retry import Backoff
from ingest.warehouse.db import is_transient as is_transient_db
from ingest.warehouse.leases import SHARD_END, LeaseStore, is_sequence_number
from ingest.warehouse.sink import CopyUnit, DeadLetter, LeaseLostError, LeaseToken, Sink

log = logging.getLogger(__name__)

T = TypeVar("T")


class State(enum.Enum):
    INITIALIZING = "initializing"
    PROCESSING = "processing"
    SHARD_END = "shard_end"
    SHUTTING_DOWN = "shutting_down"
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True)
class ShardSettings:
    max_records: int = 1000
    #: Kinesis allows 5 GetRecords calls per second per shard: a call starts at least this long
    #: after the previous one returned (see _paced_get_records).
    min_call_interval: float = 0.2
    #: Pause after an empty page when caught up (latency versus GetRecords calls).
    idle_sleep: float = 0.5
    #: Pages are decoded and committed in chunks of at most this many bytes and records:
    #: memory stays bounded, several decode processes share a big page, commits start early.
    chunk_bytes: int = 256 * 1024
    chunk_records: int = 200
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


class _Stopped(Exception):
    """Internal: the consumer was asked to stop while waiting."""


@dataclass
class ShardStatus:
    state: State = State.INITIALIZING
    checkpoint: str = ""
    #: monotonic time since which the shard has been caught up and empty, or None.
    idle_since: float | None = None
    lag_ms: int | None = None


class ShardConsumer:
    def __init__(
        self,
        *,
        lease: LeaseToken,
        checkpoint: str,
        reader: KinesisReader,
        keys: DataKeyCache,
        encryption_context: dict[str, str],
        pool: DecodePool,
        sink: Sink,
        leases: LeaseStore,
        metrics: Metrics,
        settings: ShardSettings,
        health: DependencyHealth | None = None,
    ) -> None:
        self.lease = lease
        self.status = ShardStatus(checkpoint=checkpoint)
        self._reader = reader
        self._keys = keys
        self._context = encryption_context
        self._pool = pool
        self._sink = sink
        self._leases = leases
        self._metrics = metrics
        self._settings = settings
        self._health = health or DependencyHealth()
        self._stop = asyncio.Event()
        self._lost = False
        self._last_call = 0.0
        self._busy = False
        self._backoff = Backoff(base=0.1, cap=10.0)

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
        return None if self._busy else self.status.idle_since

    # -- main loop -----------------------------------------------------------------------

    async def run(self) -> State:
        """Consume until SHARD_END, a stop, or the loss of the lease; returns the final state.
        The worker counts the lease change from it (once: a lease lost at renewal often makes
        the batch in hand fail its commit too)."""
        try:
            await self._run()
        except _Stopped:
            self.status.state = State.LEASE_LOST if self._lost else State.SHUTTING_DOWN
        except LeaseLostError:
            self.status.state = State.LEASE_LOST
            log.info("lease lost at commit", extra={"shard": self.shard_id})
        return self.status.state

    async def _run(self) -> None:
        iterator = await self._until_stopped(asyncio.ensure_future(self._get_iterator()))
        if iterator is None:
            self.status.state = State.SHARD_END
            return
        self.status.state = State.PROCESSING
        pending = asyncio.ensure_future(self._fetch(iterator))
        try:
            while True:
                page = await self._until_stopped(pending)
                if page.next_iterator is not None and not self._stop.is_set():
                    pending = asyncio.ensure_future(self._fetch(page.next_iterator))
                await self._process(page)  # commits; never cancelled midway by stop()
                if page.next_iterator is None:
                    self.status.state = State.SHARD_END
                    return
                if self._stop.is_set():
                    raise _Stopped
        finally:
            if not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    async def _until_stopped(self, task: asyncio.Future[T]) -> T:
        stopper: asyncio.Future[object] = asyncio.ensure_future(self._stop.wait())
        try:
            waiting: set[asyncio.Future[object]] = {task, stopper}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Stopped

    # -- Kinesis ------------------------------------------------------------------------

    async def _get_iterator(self) -> str | None:
        return await self._transient(
            lambda: self._reader.iterator(self.shard_id, self.status.checkpoint), "kinesis"
        )

    async def _paced_get_records(self, iterator: str) -> RecordsPage:
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

    async def _fetch(self, iterator: str) -> RecordsPage:
        while True:
            try:
                page = await self._transient(partial(self._paced_get_records, iterator), "kinesis")
            except IteratorExpiredError:
                # A fresh iterator from the checkpoint may overlap the page being committed;
                # _process drops records at or before the checkpoint.
                fresh = await self._get_iterator()
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
        self.status.lag_ms = page.millis_behind_latest
        if page.millis_behind_latest is not None:
            self._metrics.observe_lag(self.shard_id, page.millis_behind_latest)
        caught_up = not page.records and (page.millis_behind_latest or 0) == 0
        if caught_up and page.next_iterator is not None:
            if self.status.idle_since is None:
                self.status.idle_since = time.monotonic()
        else:
            self.status.idle_since = None

    # -- decode and commit ---------------------------------------------------------------

    async def _process(self, page: RecordsPage) -> None:
        """Decode and commit a page in chunks of bounded size: up to one chunk per decode
        process is decoded ahead while the previous one commits, and commits stay in sequence
        order, each advancing the checkpoint to its last record."""
        records = [r for r in page.records if _after(r.sequence_number, self.status.checkpoint)]
        final = page.next_iterator is None
        if not records:
            if final and self.status.checkpoint != SHARD_END:
                await self._commit_chunk(_Chunk([], [], [], [], []), SHARD_END)
            return
        self._busy = True
        chunks = iter(_chunks(records, self._settings.chunk_bytes, self._settings.chunk_records))
        ahead: deque[asyncio.Future[_Chunk]] = deque()
        window = max(1, self._pool.processes)
        try:
            for chunk in itertools.islice(chunks, window):
                ahead.append(asyncio.ensure_future(self._prepare(chunk)))
            while ahead:
                prepared = await ahead.popleft()
                following = next(chunks, None)
                if following is not None:
                    ahead.append(asyncio.ensure_future(self._prepare(following)))
                last = prepared.records[-1].sequence_number
                await self._commit_chunk(prepared, SHARD_END if final and not ahead else last)
        finally:
            for task in ahead:
                task.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)
            self._busy = False
            if self.status.idle_since is not None:
                # An empty page may have arrived while we were busy: idle counts from now.
                self.status.idle_since = time.monotonic()

    async def _prepare(self, records: list[KinesisRecord]) -> _Chunk:
        """Data keys (KMS, cached) and decoding (the pool) for one chunk."""
        chunk = _Chunk(records, [], [], [], [])
        for index, record in enumerate(records):
            try:
                blob = read_envelope(record.data).key_blob()
                data_key = await self._transient(
                    partial(self._keys.get, blob, self._context), "kms"
                )
            except DecodeError as exc:
                chunk.letters.append(_letter(record, exc.stage.value, str(exc)))
                continue
            chunk.ready.append((index, record.sequence_number, record.data, data_key))
        if chunk.ready:
            batch = BatchInput(
                self.shard_id,
                chunk.ready,
                self._settings.decoder,
                stream_name=self.lease.stream_name,
            )
            size = sum(len(r.data) for r in records)
            try:
                chunk.outputs = [await self._pool.decode(batch, size)]
            except DecoderCrashedError:
                chunk.outputs = await self._decode_apart(chunk.ready, records, chunk.letters)
        for output in chunk.outputs:
            chunk.letters.extend(
                _letter(records[f.index], f.stage, f.error) for f in output.failures
            )
            chunk.units.append(CopyUnit(output.events, output.statements, chain=output.chain))
        return chunk

    async def _commit_chunk(self, chunk: _Chunk, new_checkpoint: str) -> None:
        heartbeats: list[HeartbeatRow] = []
        for output in chunk.outputs:
            await self._transient(partial(self._sink.ensure_partitions, output.days), "postgres")
            heartbeats.extend(output.heartbeats)
        await self._commit(
            new_checkpoint, chunk.units, chunk.letters, heartbeats, chunk.ready, chunk.records
        )
        for output in chunk.outputs:
            self._metrics.events.inc(output.event_count)
            self._metrics.heartbeats.inc(len(output.heartbeats))
        self._metrics.records.inc(len(chunk.records))
        self._metrics.count_batch(self.shard_id)
        for letter in chunk.letters:
            self._metrics.dead_letters.labels(letter.stage).inc()
            _log_dead_letter(self.shard_id, letter)

    async def _decode_apart(
        self,
        ready: list[tuple[int, str, bytes, bytes]],
        records: list[KinesisRecord],
        letters: list[DeadLetter],
    ) -> list[BatchOutput]:
        """The batch keeps killing decode processes: decode each record alone, in quarantine,
        and dead-letter the ones that kill it, so one poison record never blocks its shard."""
        log.warning("decoding a batch record by record", extra={"shard": self.shard_id})
        outputs = []
        for item in ready:
            out = await self._pool.decode_alone(
                BatchInput(
                    self.shard_id,
                    [item],
                    self._settings.decoder,
                    stream_name=self.lease.stream_name,
                )
            )
            if out is None:
                letters.append(
                    _letter(
                        records[item[0]], "crash", "crash: the decoder process died on this record"
                    )
                )
            else:
                outputs.append(out)
        return outputs

    async def _commit(
        self,
        new_checkpoint: str,
        units: list[CopyUnit],
        letters: list[DeadLetter],
        heartbeats: list[HeartbeatRow],
        ready: list[tuple[int, str, bytes, bytes]],
        records: list[KinesisRecord],
    ) -> None:
        with self._health.outstanding("postgres"):
            await self._commit_until_done(
                new_checkpoint, units, letters, heartbeats, ready, records
            )
        self.status.checkpoint = new_checkpoint

    async def _commit_until_done(
        self,
        new_checkpoint: str,
        units: list[CopyUnit],
        letters: list[DeadLetter],
        heartbeats: list[HeartbeatRow],
        ready: list[tuple[int, str, bytes, bytes]],
        records: list[KinesisRecord],
    ) -> None:
        previous = self.status.checkpoint
        per_record = False
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                result = await asyncio.shield(
                    self._sink.commit(
                        self.lease,
                        previous_checkpoint=previous,
                        new_checkpoint=new_checkpoint,
                        units=units,
                        dead_letters=letters,
                        heartbeats=heartbeats,
                        per_record=per_record,
                        sequence_range=(
                            (records[0].sequence_number, records[-1].sequence_number)
                            if records
                            else None
                        ),
                    )
                )
            except LeaseLostError:
                if attempt > 0 and await self._commit_landed(new_checkpoint):
                    break  # the previous attempt committed; only its answer was lost
                raise
            except Exception as exc:
                if is_transient_db(exc):
                    self._metrics.retries.labels("postgres").inc()
                    delay = self._backoff.delay(attempt)
                    log.warning(
                        "transient database error; retrying",
                        extra={"shard": self.shard_id, "error": describe(exc), "delay": delay},
                    )
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                if per_record or not ready:
                    # Not the rows (those are dead-lettered one by one in per-record mode): the
                    # checkpoint, dead letter or chain statements failed. The worker logs it by
                    # class and SQLSTATE (never the message, which can quote row values) and
                    # retries the shard.
                    raise
                # A row PostgreSQL refused despite sanitizing: isolate it, store the rest.
                log.warning(
                    "batch refused by the database; retrying record by record",
                    extra={"shard": self.shard_id, "error": describe(exc)},
                )
                units = self._per_record_units(ready, records)
                per_record = True
                attempt += 1
                continue
            else:
                for failed in result.store_failures:
                    self._metrics.dead_letters.labels("store").inc()
                    _log_dead_letter(self.shard_id, failed)
                break
            finally:
                self._metrics.commit_seconds.observe(time.perf_counter() - started)

    async def _commit_landed(self, new_checkpoint: str) -> bool:
        current = await self._leases.checkpoint_of(self.shard_id)
        return current == new_checkpoint

    def _per_record_units(
        self, ready: list[tuple[int, str, bytes, bytes]], records: list[KinesisRecord]
    ) -> list[CopyUnit]:
        units = []
        for item in ready:
            out = decode_batch(
                BatchInput(
                    self.shard_id,
                    [item],
                    self._settings.decoder,
                    stream_name=self.lease.stream_name,
                )
            )
            if out.failures:
                continue  # already dead-lettered by the batch run
            units.append(
                CopyUnit(
                    out.events,
                    out.statements,
                    on_store_error=_letter(records[item[0]], "store", "store"),
                    chain=out.chain,
                )
            )
        return units

    # -- retries ------------------------------------------------------------------------

    async def _transient(self, op: Callable[[], Awaitable[T]], target: str) -> T:
        """Run ``op``, retrying transient faults with backoff until it works or we stop.
        The call is outstanding for DependencyHealth from the first attempt to the last."""
        with self._health.outstanding(target):
            return await self._retry(op, target)

    async def _retry(self, op: Callable[[], Awaitable[T]], target: str) -> T:
        attempt = 0
        while True:
            try:
                return await op()
            except (KinesisUnavailableError, KmsUnavailableError) as exc:
                error: BaseException = exc
            except IngestError:
                raise
            except Exception as exc:
                if not is_transient_db(exc):
                    raise
                error = exc
            self._metrics.retries.labels(target).inc()
            delay = self._backoff.delay(attempt)
            attempt += 1
            log.warning(
                "transient fault; retrying",
                extra={
                    "shard": self.shard_id,
                    "target": target,
                    "error": describe(error),
                    "delay": round(delay, 3),
                },
            )
            if self._stop.is_set() and target == "kinesis":
                raise _Stopped from None
            await asyncio.sleep(delay)


@dataclass
class _Chunk:
    """A run of consecutive records, decoded and ready to commit."""

    records: list[KinesisRecord]
    ready: list[tuple[int, str, bytes, bytes]]
    letters: list[DeadLetter]
    outputs: list[BatchOutput]
    units: list[CopyUnit]


def _chunks(
    records: list[KinesisRecord], max_bytes: int, max_records: int
) -> Iterator[list[KinesisRecord]]:
    """Consecutive runs of at most ``max_records`` records and about ``max_bytes`` bytes."""
    chunk: list[KinesisRecord] = []
    size = 0
    for record in records:
        if chunk and (len(chunk) >= max_records or size + len(record.data) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(record)
        size += len(record.data)
    if chunk:
        yield chunk


def _after(sequence_number: str, checkpoint: str) -> bool:
    """Whether a record lies after the checkpoint (sentinels: everything does)."""
    if not is_sequence_number(checkpoint):
        return True
    return int(sequence_number) > int(checkpoint)


def _log_dead_letter(shard_id: str, letter: DeadLetter) -> None:
    # The reason is ours (a DecodeError names fields, types, sizes and stages, never values;
    # a store failure names the class and SQLSTATE), so it is safe to log.
    log.warning(
        "record dead-lettered",
        extra={
            "shard": shard_id,
            "sequence": letter.sequence_number,
            "stage": letter.stage,
            "error": letter.error[:300],
        },
    )


def _letter(record: KinesisRecord, stage: str, error: str) -> DeadLetter:
    return DeadLetter(
        sequence_number=record.sequence_number,
        partition_key=record.partition_key,
        arrival_time=record.arrival_time,
        stage=stage,
        error=error,
        raw=record.data,
    )


__all__ = ["Failure", "ShardConsumer", "ShardSettings", "State"]
