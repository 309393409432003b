"""Committing one shard's pages: chunked decode and commit, per-record fallback, dead letters.

A page is decoded and committed in chunks of bounded size: up to one chunk per decode process
is prepared ahead (data keys from KMS, decoding in the pool) while the previous one commits;
commits stay in sequence order, each in one transaction with the checkpoint of its last record
(see Sink), the last chunk of a closed shard's last page with SHARD_END.

Records that cannot be decoded are dead-lettered with their stage. A chunk that keeps killing
decode processes is decoded record by record in quarantine, and a record that kills it is
dead-lettered (stage ``crash``). When the warehouse refuses a chunk (a row PostgreSQL will not
take despite sanitizing), it is stored again record by record from the per-record spans of the
decode output -- nothing is decoded again -- and the records it refuses are dead-lettered
(stage ``store``). Transient faults are retried (see ingest.retry); a commit refused because
the lease moved is :attr:`CommitOutcome.LEASE_LOST`, not an exception.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol

from ingest.checkpoint import SHARD_END, is_after
from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.failures import describe
from ingest.consumer.fetcher import ShardStatus, Transient
from ingest.consumer.pool import DecoderCrashedError
from ingest.decode.batch import (
    BatchInput,
    BatchOutput,
    DecoderConfig,
    HeartbeatRow,
    KeyedRecord,
)
from ingest.decode.envelope import Envelope, read_envelope
from ingest.errors import DecodeError
from ingest.kinesis import KinesisRecord
from ingest.lease import LeaseToken
from ingest.metrics import Metrics
from ingest.retry import Backoff, retry
from ingest.warehouse.sink import CommitResult, CopyUnit, DeadLetter, LeaseLostError

log = logging.getLogger("ingest.consumer.shard")


@dataclass(frozen=True)
class CommitSettings:
    #: Pages are decoded and committed in chunks of at most this many bytes and records:
    #: memory stays bounded, several decode processes share a big page, commits start early.
    #: 512 KiB rather than 256 KiB: less CPU per event in every party (fewer batches, pickles
    #: and transactions) for ~40 MB more at the peak of a backlog (README "Performance").
    chunk_bytes: int = 512 * 1024
    chunk_records: int = 400
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


class CommitOutcome(enum.Enum):
    COMMITTED = "committed"
    #: the sink refused the commit: the lease changed hands (nothing was written)
    LEASE_LOST = "lease_lost"


class Decoder(Protocol):
    """The decode pool (consumer.pool.DecodePool)."""

    processes: int

    async def decode(self, batch: BatchInput, size: int) -> BatchOutput: ...

    async def decode_alone(self, batch: BatchInput) -> BatchOutput | None: ...


class KeySource(Protocol):
    """Plaintext data keys (kms.DataKeyCache). ``uses``: how many records need the key (one
    lookup serves all of a chunk's records under one data key; the cache counts each)."""

    async def get(self, blob: bytes, context: Mapping[str, str], *, uses: int = 1) -> bytes: ...


class CommitSink(Protocol):
    """The warehouse side of a commit (warehouse.sink.Sink)."""

    async def ensure_partitions(self, days: set[date] | Sequence[date]) -> None: ...

    async def commit(
        self,
        lease: LeaseToken,
        *,
        previous_checkpoint: str,
        new_checkpoint: str,
        units: Sequence[CopyUnit],
        dead_letters: Sequence[DeadLetter] = (),
        heartbeats: Sequence[HeartbeatRow] = (),
        per_record: bool = False,
        sequence_range: tuple[str, str] | None = None,
        policy_outputs: Sequence[Any] = (),
    ) -> CommitResult: ...


class CheckpointSource(Protocol):
    """Where a shard's stored checkpoint is read (warehouse.leases.LeaseStore)."""

    async def checkpoint_of(self, shard_id: str) -> str | None: ...


@dataclass
class Chunk:
    """A run of consecutive records, decoded and ready to commit."""

    records: list[KinesisRecord]
    ready: list[KeyedRecord] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    outputs: list[BatchOutput] = field(default_factory=list)
    units: list[CopyUnit] = field(default_factory=list)


class ChunkPreparer:
    """Data keys (KMS, cached) and decoding (the pool) for runs of records of one shard: what
    the consumer commits and what a dead-letter re-drive stores."""

    def __init__(
        self,
        *,
        shard_id: str,
        stream_name: str,
        keys: KeySource,
        encryption_context: Mapping[str, str],
        pool: Decoder,
        decoder: DecoderConfig,
        transient: Transient,
    ) -> None:
        self.shard_id = shard_id
        self.stream_name = stream_name
        self._keys = keys
        self._context = encryption_context
        self._pool = pool
        self._decoder = decoder
        self._transient = transient

    async def prepare(self, records: list[KinesisRecord]) -> Chunk:
        """Data keys (KMS, cached) and decoding (the pool) for one chunk. The envelope is
        parsed here, once: the pool gets it parsed. The data key of each distinct key blob is
        looked up once for the chunk (Aurora reuses a data key across many records), the
        lookups of different blobs concurrently."""
        chunk = Chunk(records)
        parsed: list[tuple[Envelope, bytes] | DecodeError] = []
        uses: dict[bytes, int] = {}
        for record in records:
            try:
                envelope = read_envelope(record.data)
                blob = envelope.key_blob()
            except DecodeError as exc:
                parsed.append(exc)
                continue
            parsed.append((envelope, blob))
            uses[blob] = uses.get(blob, 0) + 1
        if len(uses) == 1:
            ((blob, count),) = uses.items()
            found = {blob: await self._data_key(blob, count)}
        else:
            keys = await asyncio.gather(*(self._data_key(b, n) for b, n in uses.items()))
            found = dict(zip(uses, keys, strict=True))
        ready = chunk.ready
        for index, (record, item) in enumerate(zip(records, parsed, strict=True)):
            if isinstance(item, DecodeError):
                chunk.letters.append(letter(record, item.stage.value, str(item)))
                continue
            data_key = found[item[1]]
            if isinstance(data_key, DecodeError):
                chunk.letters.append(letter(record, data_key.stage.value, str(data_key)))
                continue
            ready.append(KeyedRecord(index, record.sequence_number, item[0], data_key))
        if chunk.ready:
            size = sum(len(r.data) for r in records)
            try:
                chunk.outputs = [await self._pool.decode(self._batch(chunk.ready), size)]
            except DecoderCrashedError:
                chunk.outputs = await self._decode_apart(chunk)
        for output in chunk.outputs:
            chunk.letters.extend(
                letter(records[f.index], f.stage, f.error) for f in output.failures
            )
            chunk.units.append(CopyUnit(output.events, output.statements, chain=output.chain))
        return chunk

    async def _data_key(self, blob: bytes, uses: int) -> bytes | DecodeError:
        """The plaintext key for ``uses`` records under ``blob``, or why KMS refused it (each
        of those records is dead-lettered with it). Transient faults are retried."""
        try:
            return await self._transient(
                lambda: self._keys.get(blob, self._context, uses=uses), "kms"
            )
        except DecodeError as exc:
            return exc

    def _batch(self, ready: list[KeyedRecord]) -> BatchInput:
        return BatchInput(self.shard_id, ready, self._decoder, stream_name=self.stream_name)

    async def _decode_apart(self, chunk: Chunk) -> list[BatchOutput]:
        """The chunk keeps killing decode processes: decode each record alone, in quarantine,
        and dead-letter the ones that kill it, so one poison record never blocks its shard."""
        log.warning("decoding a batch record by record", extra={"shard": self.shard_id})
        outputs = []
        for item in chunk.ready:
            out = await self._pool.decode_alone(self._batch([item]))
            if out is None:
                chunk.letters.append(
                    letter(
                        chunk.records[item.position],
                        "crash",
                        "crash: the decoder process died on this record",
                    )
                )
            else:
                outputs.append(out)
        return outputs


class ShardCommitter:
    def __init__(
        self,
        *,
        lease: LeaseToken,
        keys: KeySource,
        encryption_context: dict[str, str],
        pool: Decoder,
        sink: CommitSink,
        leases: CheckpointSource,
        metrics: Metrics,
        settings: CommitSettings,
        health: DependencyHealth,
        status: ShardStatus,
        transient: Transient,
        backoff: Backoff,
    ) -> None:
        self.lease = lease
        self._window = max(1, pool.processes)
        self._sink = sink
        self._leases = leases
        self._metrics = metrics
        self._settings = settings
        self._health = health
        self._status = status
        self._transient = transient
        self._backoff = backoff
        self.preparer = ChunkPreparer(
            shard_id=lease.shard_id,
            stream_name=lease.stream_name,
            keys=keys,
            encryption_context=encryption_context,
            pool=pool,
            decoder=settings.decoder,
            transient=transient,
        )

    @property
    def shard_id(self) -> str:
        return self.lease.shard_id

    async def commit_page(self, records: list[KinesisRecord], *, final: bool) -> CommitOutcome:
        """Decode and commit a page (``final``: the last page of a closed shard, which ends
        with the checkpoint SHARD_END). Records at or before the checkpoint are dropped (a
        renewed iterator may repeat them)."""
        fresh = [r for r in records if is_after(r.sequence_number, self._status.checkpoint)]
        if not fresh:
            if final and self._status.checkpoint != SHARD_END:
                return await self.commit_chunk(Chunk([]), SHARD_END)
            return CommitOutcome.COMMITTED
        self._status.busy = True
        settings = self._settings
        chunks = iter(_chunks(fresh, settings.chunk_bytes, settings.chunk_records))
        ahead: deque[asyncio.Future[Chunk]] = deque()
        window = self._window
        try:
            for chunk in itertools.islice(chunks, window):
                ahead.append(asyncio.ensure_future(self.preparer.prepare(chunk)))
            while ahead:
                prepared = await ahead.popleft()
                following = next(chunks, None)
                if following is not None:
                    ahead.append(asyncio.ensure_future(self.preparer.prepare(following)))
                last = prepared.records[-1].sequence_number
                checkpoint = SHARD_END if final and not ahead else last
                if await self.commit_chunk(prepared, checkpoint) is CommitOutcome.LEASE_LOST:
                    return CommitOutcome.LEASE_LOST
            return CommitOutcome.COMMITTED
        finally:
            for task in ahead:
                task.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)
            self._status.busy = False
            if self._status.idle_since is not None:
                # An empty page may have arrived while we were busy: idle counts from now.
                self._status.idle_since = time.monotonic()

    async def commit_chunk(self, chunk: Chunk, new_checkpoint: str) -> CommitOutcome:
        heartbeats: list[HeartbeatRow] = []
        for output in chunk.outputs:
            days = output.days
            await self._transient(lambda days=days: self._sink.ensure_partitions(days), "postgres")  # type: ignore[misc]
            heartbeats.extend(output.heartbeats)
        with self._health.outstanding("postgres"):
            outcome = await self._commit(new_checkpoint, chunk, heartbeats)
        if outcome is CommitOutcome.LEASE_LOST:
            log.info("lease lost at commit", extra={"shard": self.shard_id})
            return outcome
        self._status.checkpoint = new_checkpoint
        for output in chunk.outputs:
            self._metrics.events.inc(output.event_count)
            self._metrics.heartbeats.inc(len(output.heartbeats))
        self._metrics.records.inc(len(chunk.records))
        self._metrics.count_batch(self.shard_id)
        for dead in chunk.letters:
            self._metrics.dead_letters.labels(dead.stage).inc()
            log_dead_letter(self.shard_id, dead)
        return outcome

    async def _commit(
        self, new_checkpoint: str, chunk: Chunk, heartbeats: list[HeartbeatRow]
    ) -> CommitOutcome:
        """Commit the chunk whole; when the warehouse refuses it, record by record."""
        units = chunk.units
        per_record = False
        while True:
            try:
                result = await self._commit_once(
                    new_checkpoint, chunk, units, heartbeats, per_record=per_record
                )
            except LeaseLostError:
                return CommitOutcome.LEASE_LOST
            except Exception as exc:
                if per_record or not chunk.ready:
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
                units = per_record_units(chunk)
                per_record = True
                continue
            if result is not None:
                for failed in result.store_failures:
                    self._metrics.dead_letters.labels("store").inc()
                    log_dead_letter(self.shard_id, failed)
            return CommitOutcome.COMMITTED

    async def _commit_once(
        self,
        new_checkpoint: str,
        chunk: Chunk,
        units: list[CopyUnit],
        heartbeats: list[HeartbeatRow],
        *,
        per_record: bool,
    ) -> CommitResult | None:
        """One commit, its transient faults retried. None: an earlier attempt whose answer was
        lost had committed it already."""
        previous = self._status.checkpoint
        records = chunk.records
        attempts = 0

        async def attempt() -> CommitResult | None:
            nonlocal attempts
            attempts += 1
            started = time.perf_counter()
            try:
                return await asyncio.shield(
                    self._sink.commit(
                        self.lease,
                        previous_checkpoint=previous,
                        new_checkpoint=new_checkpoint,
                        units=units,
                        dead_letters=chunk.letters,
                        heartbeats=heartbeats,
                        per_record=per_record,
                        sequence_range=(
                            (records[0].sequence_number, records[-1].sequence_number)
                            if records
                            else None
                        ),
                        # what every decoded event means for the policy rules, also in
                        # per-record mode (detection sees a record the warehouse refused)
                        policy_outputs=[o.policy for o in chunk.outputs if o.policy is not None],
                    )
                )
            except LeaseLostError:
                if attempts > 1 and await self._leases.checkpoint_of(self.shard_id) == (
                    new_checkpoint
                ):
                    return None  # the previous attempt committed; only its answer was lost
                raise
            finally:
                self._metrics.commit_seconds.observe(time.perf_counter() - started)

        def on_retry(error: BaseException, _attempt: int, delay: float) -> None:
            self._metrics.retries.labels("postgres").inc()
            log.warning(
                "transient database error; retrying",
                extra={"shard": self.shard_id, "error": describe(error), "delay": delay},
            )

        return await retry(attempt, backoff=self._backoff, on_retry=on_retry)


def per_record_units(chunk: Chunk) -> list[CopyUnit]:
    """The chunk's decoded records one unit each, sliced from the decode outputs; each unit
    names the dead letter to write if the warehouse refuses it."""
    return [
        CopyUnit(
            rows.events,
            rows.statements,
            on_store_error=letter(chunk.records[rows.position], "store", "store"),
            chain=rows.chain,
        )
        for output in chunk.outputs
        for rows in output.record_rows()
    ]


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


def log_dead_letter(shard_id: str, dead: DeadLetter) -> None:
    # The reason is ours (a DecodeError names fields, types, sizes and stages, never values;
    # a store failure names the class and SQLSTATE), so it is safe to log.
    log.warning(
        "record dead-lettered",
        extra={
            "shard": shard_id,
            "sequence": dead.sequence_number,
            "stage": dead.stage,
            "error": dead.error[:300],
        },
    )


def letter(record: KinesisRecord, stage: str, error: str) -> DeadLetter:
    return DeadLetter(
        sequence_number=record.sequence_number,
        partition_key=record.partition_key,
        arrival_time=record.arrival_time,
        stage=stage,
        error=error,
        raw=record.data,
    )
