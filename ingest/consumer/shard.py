"""One shard's consumer: an explicit state machine, one task per held lease.

    INITIALIZING --iterator from checkpoint--> PROCESSING --NextShardIterator is null--> SHARD_END
         |                                         |  \\
         |                                         |   `--stop requested--> SHUTTING_DOWN
         `--------------- lease lost (commit refused or renewal failed) ---> LEASE_LOST

PROCESSING keeps at most one GetRecords call in flight, at most 5 calls per second, and
prefetches the next page while the current one is decoded and committed (aiokafka keeps one
unconsumed result per partition the same way: backpressure without a scheduler). Commits run
strictly in sequence order, each in one transaction with the new checkpoint (see Sink).

Transient faults (throttling, network, database restarts, KMS throttling) are retried with
backoff and never dead-lettered; records that cannot be decoded are dead-lettered with their
stage and the shard moves on.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

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
    max_records: int = 10_000
    #: Kinesis allows 5 GetRecords calls per second per shard.
    min_call_interval: float = 0.2
    idle_sleep: float = 1.0
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
        self._stop = asyncio.Event()
        self._last_call = 0.0
        self._backoff = Backoff(base=0.1, cap=10.0)

    @property
    def shard_id(self) -> str:
        return self.lease.shard_id

    def stop(self) -> None:
        """Finish the batch in hand (commit it), then end. Idempotent."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- main loop -----------------------------------------------------------------------

    async def run(self) -> State:
        try:
            await self._run()
        except _Stopped:
            self.status.state = State.SHUTTING_DOWN
        except LeaseLostError:
            self.status.state = State.LEASE_LOST
            self._metrics.lease_changes.labels("lost").inc()
            log.info("lease lost", extra={"shard": self.shard_id})
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

    async def _fetch(self, iterator: str) -> RecordsPage:
        while True:
            wait = self._last_call + self._settings.min_call_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_call = time.monotonic()
            try:
                page = await self._transient(
                    partial(self._reader.get_records, iterator, self._settings.max_records),
                    "kinesis",
                )
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
            self._metrics.lag_ms.labels(self.shard_id).set(page.millis_behind_latest)
        caught_up = not page.records and (page.millis_behind_latest or 0) == 0
        if caught_up and page.next_iterator is not None:
            if self.status.idle_since is None:
                self.status.idle_since = time.monotonic()
        else:
            self.status.idle_since = None

    # -- decode and commit ---------------------------------------------------------------

    async def _process(self, page: RecordsPage) -> None:
        records = [r for r in page.records if _after(r.sequence_number, self.status.checkpoint)]
        new_checkpoint = (
            SHARD_END
            if page.next_iterator is None
            else (records[-1].sequence_number if records else self.status.checkpoint)
        )
        if new_checkpoint == self.status.checkpoint:
            return
        letters: list[DeadLetter] = []
        ready: list[tuple[int, str, bytes, bytes]] = []
        for index, record in enumerate(records):
            try:
                blob = read_envelope(record.data).key_blob()
                data_key = await self._transient(
                    partial(self._keys.get, blob, self._context), "kms"
                )
            except DecodeError as exc:
                letters.append(_letter(record, exc.stage.value, str(exc)))
                continue
            ready.append((index, record.sequence_number, record.data, data_key))
        batch = BatchInput(self.shard_id, ready, self._settings.decoder)
        size = sum(len(r.data) for r in records)
        units: list[CopyUnit] = []
        heartbeats: list[HeartbeatRow] = []
        outputs: list[BatchOutput] = []
        if ready:
            try:
                outputs = [await self._pool.decode(batch, size)]
            except DecoderCrashedError:
                outputs = await self._decode_apart(ready, records, letters)
        for output in outputs:
            letters.extend(_letter(records[f.index], f.stage, f.error) for f in output.failures)
            await self._transient(partial(self._sink.ensure_partitions, output.days), "postgres")
            units.append(CopyUnit(output.events, output.statements))
            heartbeats.extend(output.heartbeats)
        await self._commit(new_checkpoint, units, letters, heartbeats, ready, records)
        for output in outputs:
            self._metrics.events.inc(output.event_count)
            self._metrics.heartbeats.inc(len(output.heartbeats))
        self._metrics.records.inc(len(records))
        self._metrics.batches.labels(self.shard_id).inc()
        for letter in letters:
            self._metrics.dead_letters.labels(letter.stage).inc()

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
                BatchInput(self.shard_id, [item], self._settings.decoder)
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
                        extra={"shard": self.shard_id, "error": type(exc).__name__, "delay": delay},
                    )
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                if per_record or not ready:
                    raise
                # A row PostgreSQL refused despite sanitizing: isolate it, store the rest.
                log.warning(
                    "batch refused by the database; retrying record by record",
                    extra={"shard": self.shard_id, "error": type(exc).__name__},
                )
                units = self._per_record_units(ready, records)
                per_record = True
                attempt += 1
                continue
            else:
                for failed in result.store_failures:
                    self._metrics.dead_letters.labels("store").inc()
                    del failed
                break
            finally:
                self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self.status.checkpoint = new_checkpoint

    async def _commit_landed(self, new_checkpoint: str) -> bool:
        current = await self._leases.checkpoint_of(self.shard_id)
        return current == new_checkpoint

    def _per_record_units(
        self, ready: list[tuple[int, str, bytes, bytes]], records: list[KinesisRecord]
    ) -> list[CopyUnit]:
        units = []
        for item in ready:
            out = decode_batch(BatchInput(self.shard_id, [item], self._settings.decoder))
            if out.failures:
                continue  # already dead-lettered by the batch run
            units.append(
                CopyUnit(
                    out.events,
                    out.statements,
                    on_store_error=_letter(records[item[0]], "store", "store"),
                )
            )
        return units

    # -- retries ------------------------------------------------------------------------

    async def _transient(self, op: Callable[[], Awaitable[T]], target: str) -> T:
        """Run ``op``, retrying transient faults with backoff until it works or we stop."""
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
                    "error": str(error)[:200],
                    "delay": round(delay, 3),
                },
            )
            if self._stop.is_set() and target == "kinesis":
                raise _Stopped from None
            await asyncio.sleep(delay)


def _after(sequence_number: str, checkpoint: str) -> bool:
    """Whether a record lies after the checkpoint (sentinels: everything does)."""
    if not is_sequence_number(checkpoint):
        return True
    return int(sequence_number) > int(checkpoint)


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
