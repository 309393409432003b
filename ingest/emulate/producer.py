"""Put emulated Aurora DAS records into a Kinesis stream, encrypted under KMS data keys.

::

    Traffic.records() ──► data key (KMS GenerateDataKey, every rotate_every records)
        │ chunks of inner JSON + key
        ▼
    encoder pool (ESDK encrypt + ECDSA sign, ~2 ms a record: the bottleneck, so it runs in
    worker processes, several chunks in flight, results taken back in submission order)
        │ outer records, in production order
        ▼
    PutRecords (≤ 500 records, ≤ 700 KiB, one call in flight, paced to ``rate`` events/s)

Ordering. Records of one partition key (one instance) must reach their shard in production
order: a MySQL statement's MAIN and AUX events straddle records. With one PutRecords call in
flight, and failed entries re-put (alone, in their original order) before anything newer, order
holds whenever Kinesis fails a shard's entries from some point on, which is what throttling
does. Kinesis does not promise that, though: when an entry fails and a later entry of the same
key in the same call succeeds, the later one is already in the stream. Re-sending "from the
first failure" would then duplicate the records that succeeded, and a duplicate breaks every
exactly-once count downstream, so we never re-send a success: the overtaking is counted in
:attr:`EmulateReport.reordered` (the consumer must cope anyway: Aurora's own AUX events arrive
in any order). Only PutRecord with SequenceNumberForOrdering orders strictly, one record per
call.

A PutRecords call whose response is lost (timeout, reset) may have succeeded; it is retried, so
under network faults this producer, like every Kinesis producer, is at least once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, NamedTuple, TypeVar

import orjson
from botocore.exceptions import BotoCoreError, ClientError

from ingest.aws import aws_client, error_code
from ingest.emulate.encoder import (
    SUITES,
    EncodeItem,
    EsdkEncryptor,
    default_suite,
    encode_batch,
    encode_payload,
    encryptor_for,
)
from ingest.emulate.traffic import (
    ENGINES,
    MAX_INSTANCES,
    PG_VERSIONS,
    Engine,
    InnerRecord,
    Traffic,
    min_instances,
)
from ingest.errors import ConfigError, IngestError
from ingest.kms import encryption_context, resource_id_from_stream
from ingest.retry import Backoff

#: PutRecords limits: records per call, bytes per call (data + partition keys), bytes per record.
MAX_BATCH_RECORDS = 500
# Kinesis takes 5 MiB per PutRecords, but aiohttp warns (and would block the event loop
# copying) for request bodies over 1 MiB; base64 and JSON add a third, so stay well under.
MAX_BATCH_BYTES = 700 * 1024
MAX_RECORD_BYTES = 1024 * 1024
#: Records per encoder job: big enough to amortize the trip to a worker, small enough that the
#: pipeline stays smooth (about 50 ms of work).
CHUNK_RECORDS = 25
#: Consecutive PutRecords rounds without progress before we give up.
MAX_FRUITLESS_ROUNDS = 30
STREAM_ACTIVE_TIMEOUT = 120.0

#: Whole-call errors worth repeating (per-entry failures are retried regardless of their code).
_TRANSIENT_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "KMSThrottlingException",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
    }
)


class EmulateError(IngestError):
    """The emulator cannot go on (stream missing, KMS refusing, Kinesis failing for good)."""


@dataclass(frozen=True, slots=True)
class EmulateOptions:
    """What to produce, and where. ``resource_id`` defaults to the stream name without
    ``aws-rds-das-``, which is what Aurora names the stream after and what KMS binds data keys
    to (encryption context ``{"aws:rds:dbc-id": "cluster-…"}`` for an Aurora cluster,
    ``{"aws:rds:db-id": "db-…"}`` for an RDS DB instance)."""

    stream: str
    resource_id: str = ""
    #: Create the stream with ``shards`` shards if it does not exist (and wait for ACTIVE).
    create_stream: bool = False
    shards: int = 1
    #: None: create a symmetric KMS key first. Meant for local stacks (moto): on AWS that is a
    #: billable key, left behind for the consumer to decrypt with.
    kms_key_id: str | None = None
    engine: Engine = "both"
    instances: int = 2
    pg_version: str = "1.1"
    events_per_record: int = 10
    #: Record events per second; 0 = as fast as possible.
    rate: float = 0.0
    #: Record events to produce (heartbeats are extra).
    count: int = 1000
    seed: int = 1
    #: A new KMS data key every this many records (Aurora reuses data keys too).
    rotate_every: int = 100
    #: A heartbeat-only record after every this many records of an instance; 0 = none.
    heartbeat_every: int = 20
    #: Encoder worker processes; 1 encodes in a thread of this process.
    processes: int = 1
    #: RDS for Oracle / SQL Server: engineNativeAuditFields filled, as with
    #: --engine-native-audit-fields-included (else {}).
    native_fields: bool = False
    #: Encryption SDK algorithm suite; None: as in the wild per engine (PostgreSQL 0x0178,
    #: MySQL 0x0378; see ingest.emulate.encoder.default_suite).
    suite: int | None = None
    #: An incident with known ground truth (ingest/emulate/scenarios.py) injected into paced
    #: normal Aurora PostgreSQL traffic of ``count`` events; None: the plain traffic.
    #: Several incidents join with commas ("brute-force,mass-export"): all injected at once.
    scenario: str | None = None
    #: The scenario traffic's first log time; None: Monday 2026-11-23 09:00 UTC.
    #: A library option (for tests of stream health, whose gaps are measured against "now").
    start: datetime | None = None

    def __post_init__(self) -> None:
        if not self.stream:
            raise ConfigError("a stream name is required")
        if not self.resource_id:
            object.__setattr__(self, "resource_id", resource_id_from_stream(self.stream))
        problems = [
            (self.shards < 1, "shards must be >= 1"),
            (self.events_per_record < 1, "events per record must be >= 1"),
            (self.rate < 0, "rate must be >= 0 (0: as fast as possible)"),
            (self.count < 0, "count must be >= 0"),
            (self.rotate_every < 1, "rotate-every must be >= 1"),
            (self.heartbeat_every < 0, "heartbeat-every must be >= 0"),
            (self.processes < 1, "processes must be >= 1"),
            (
                self.scenario is not None and not _known_scenario(self.scenario),
                f"scenario must be one of {', '.join(_scenario_names())} (or several, "
                "joined by commas, each once)",
            ),
            (
                self.suite is not None and self.suite not in SUITES,
                f"suite must be one of {', '.join(f'0x{s:04x}' for s in SUITES)}",
            ),
            (self.engine not in ENGINES, f"engine must be one of {', '.join(ENGINES)}"),
            (self.pg_version not in PG_VERSIONS, "PostgreSQL record version must be 1.0 or 1.1"),
            (
                not min_instances(self.engine) <= self.instances <= MAX_INSTANCES,
                f"instances must be 1..{MAX_INSTANCES} (at least 2 for engine 'both', 4 for 'all')",
            ),
        ]
        for failed, message in problems:
            if failed:
                raise ConfigError(message)

    def traffic(self) -> Traffic:
        """The traffic these options produce (clusterId is the resource id, as in Aurora)."""
        return Traffic(
            self.seed,
            self.engine,
            cluster_id=self.resource_id,
            instances=self.instances,
            pg_version=self.pg_version,
            heartbeat_every=self.heartbeat_every,
            native_fields=self.native_fields,
        )

    def inner_records(self) -> Iterator[InnerRecord]:
        if self.scenario is not None:
            from ingest.emulate.scenarios import NORMAL_START, scenario

            records, _ = scenario(
                self.scenario, self.seed, count=self.count,
                events_per_record=self.events_per_record, cluster_id=self.resource_id,
                start=self.start or NORMAL_START,
            )  # fmt: skip
            return iter(records)
        return self.traffic().records(self.events_per_record, self.count)

    def suite_for(self, record_version: str) -> int:
        """The algorithm suite of a record of ``record_version``."""
        return self.suite if self.suite is not None else default_suite(record_version)


def _scenario_names() -> tuple[str, ...]:
    from ingest.emulate.scenarios import SCENARIOS

    return SCENARIOS


def _known_scenario(name: str) -> bool:
    from ingest.emulate.scenarios import scenario_names

    try:
        scenario_names(name)
    except ValueError:
        return False
    return True


class DataKey(NamedTuple):
    """A KMS data key: the plaintext that encrypts, the blob that travels in the record."""

    plaintext: bytes
    blob: bytes


@dataclass(frozen=True, slots=True)
class Progress:
    records: int
    events: int
    heartbeats: int
    target_events: int
    elapsed: float


@dataclass(frozen=True, slots=True)
class EmulateReport:
    stream: str
    resource_id: str
    kms_key_id: str
    shards: int
    records: int
    events: int
    heartbeats: int
    data_keys: int
    #: Entries re-put after a per-entry failure, and entries that overtook a failed earlier
    #: entry of their partition key (see the module docstring).
    retried: int
    reordered: int
    elapsed: float

    @property
    def records_per_second(self) -> float:
        return self.records / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One encoded Kinesis record and what went into it (for tests of the decode layer)."""

    data: bytes
    partition_key: str
    inner: InnerRecord
    data_key: DataKey


def build_records(options: EmulateOptions, data_keys: Callable[[int], DataKey]) -> list[RawRecord]:
    """The records :func:`emulate` would put, without Kinesis or KMS, encoded in-process.

    ``data_keys(n)`` supplies the n-th data key (0, 1, ...), asked for at the same records as
    :func:`emulate` asks KMS: the first, then every ``rotate_every``.
    """
    encryptors: dict[int, EsdkEncryptor] = {}
    out: list[RawRecord] = []
    key: DataKey | None = None
    for index, inner in enumerate(options.inner_records()):
        if index % options.rotate_every == 0:
            key = data_keys(index // options.rotate_every)
        assert key is not None
        encryptor = encryptor_for(options.suite_for(inner.version), encryptors)
        data = encode_payload(
            orjson.dumps(inner.doc), inner.version, key.plaintext, key.blob, encryptor
        )
        out.append(RawRecord(data, inner.partition_key, inner, key))
    return out


# --- PutRecords results --------------------------------------------------------------------------

E = TypeVar("E", bound="Entry")


class Entry(NamedTuple):
    data: bytes
    partition_key: str
    events: int
    heartbeats: int

    @property
    def size(self) -> int:
        return len(self.data) + len(self.partition_key.encode())


class PutOutcome(NamedTuple, Generic[E]):
    succeeded: list[E]
    failed: list[E]
    #: Entries that succeeded after an earlier entry of their partition key failed.
    overtaken: int


def split_results(entries: Sequence[E], results: Sequence[Mapping[str, Any]]) -> PutOutcome[E]:
    """Sort the entries of a PutRecords call by the response's ``Records`` (aligned with them).

    Failed entries are to be put again, in order. An entry that succeeded after an earlier
    entry of its partition key failed is already in the stream ahead of it: it is counted in
    ``overtaken``, never re-sent (that would duplicate it).
    """
    if len(results) != len(entries):
        raise EmulateError(f"PutRecords answered {len(results)} results for {len(entries)} records")
    succeeded: list[E] = []
    failed: list[E] = []
    failed_keys: set[str] = set()
    overtaken = 0
    for entry, result in zip(entries, results, strict=True):
        if result.get("ErrorCode"):
            failed.append(entry)
            failed_keys.add(entry.partition_key)
        else:
            succeeded.append(entry)
            overtaken += entry.partition_key in failed_keys
    return PutOutcome(succeeded, failed, overtaken)


# --- the producer --------------------------------------------------------------------------------


async def emulate(
    options: EmulateOptions, *, progress: Callable[[Progress], None] | None = None
) -> EmulateReport:
    """Produce ``options.count`` record events into ``options.stream``; see the module doc."""
    started = time.monotonic()
    try:
        async with aws_client("kinesis") as kinesis, aws_client("kms") as kms:
            shards = await ensure_stream(kinesis, options)
            key_id = options.kms_key_id or await create_kms_key(kms)
            with _encoder_pool(options.processes) as pool:
                run = _Run(options, kinesis, kms, key_id, pool, progress, started)
                await run.produce()
    except (ClientError, BotoCoreError) as exc:  # anything the steps above did not name
        raise _aws_error("AWS", exc) from None
    return EmulateReport(
        stream=options.stream,
        resource_id=options.resource_id,
        kms_key_id=key_id,
        shards=shards,
        records=run.records,
        events=run.events,
        heartbeats=run.heartbeats,
        data_keys=run.data_keys,
        retried=run.retried,
        reordered=run.reordered,
        elapsed=time.monotonic() - started,
    )


async def ensure_stream(kinesis: Any, options: EmulateOptions) -> int:
    """The stream's open shard count, once it is ACTIVE; creates it if asked to."""
    try:
        summary = await _stream_summary(kinesis, options.stream)
    except _StreamMissing:
        if not options.create_stream:
            raise EmulateError(
                f"Kinesis stream {options.stream!r} does not exist "
                "(pass --create-stream to create it)"
            ) from None
        try:
            await kinesis.create_stream(StreamName=options.stream, ShardCount=options.shards)
        except (ClientError, BotoCoreError) as exc:
            if error_code(exc) != "ResourceInUseException":  # created meanwhile: fine
                raise _aws_error("Kinesis CreateStream", exc) from None
        summary = None
    deadline = time.monotonic() + STREAM_ACTIVE_TIMEOUT
    while summary is None or summary["StreamStatus"] != "ACTIVE":
        if time.monotonic() > deadline:
            raise EmulateError(f"stream {options.stream!r} did not become ACTIVE in time")
        await asyncio.sleep(0.05 if summary is None else 0.2)
        try:
            summary = await _stream_summary(kinesis, options.stream)
        except _StreamMissing:
            summary = None
    return int(summary["OpenShardCount"])


class _StreamMissing(Exception):
    pass


async def _stream_summary(kinesis: Any, stream: str) -> dict[str, Any]:
    try:
        response = await kinesis.describe_stream_summary(StreamName=stream)
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            raise _StreamMissing from None
        raise _aws_error("Kinesis DescribeStreamSummary", exc) from None
    except BotoCoreError as exc:
        raise _aws_error("Kinesis", exc) from None
    summary: dict[str, Any] = response["StreamDescriptionSummary"]
    return summary


async def create_kms_key(kms: Any) -> str:
    """A fresh symmetric KMS key. For local stacks: on AWS it is billable and stays."""
    try:
        response = await kms.create_key(
            Description="das-ingest emulate: encrypts emulated DAS data keys",
            KeySpec="SYMMETRIC_DEFAULT",
            KeyUsage="ENCRYPT_DECRYPT",
        )
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error("KMS CreateKey", exc) from None
    return str(response["KeyMetadata"]["KeyId"])


async def generate_data_key(kms: Any, key_id: str, resource_id: str) -> DataKey:
    """A data key bound to the resource as RDS binds it: context {"aws:rds:dbc-id": id} for a
    cluster, {"aws:rds:db-id": id} for a DB instance (``db-…``)."""
    try:
        response = await kms.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=encryption_context(resource_id)
        )
    except (ClientError, BotoCoreError) as exc:
        raise _aws_error("KMS GenerateDataKey", exc) from None
    return DataKey(bytes(response["Plaintext"]), bytes(response["CiphertextBlob"]))


def _is_transient(exc: BaseException) -> bool:
    """No answer at all (network), throttling, or a server error: worth another try."""
    code = error_code(exc)
    if code is None or code in _TRANSIENT_CODES:
        return True
    response: Any = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return isinstance(status, int) and status >= 500


def _aws_error(what: str, exc: BaseException) -> EmulateError:
    code = error_code(exc)
    if code is not None:
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        return EmulateError(f"{what} failed: {code} {message}".rstrip())
    return EmulateError(f"{what} unreachable: {exc}")


@contextlib.contextmanager
def _encoder_pool(processes: int) -> Iterator[concurrent.futures.Executor]:
    """A process pool for ``processes`` > 1, else one thread (encoding then overlaps puts)."""
    executor: concurrent.futures.Executor
    if processes > 1:
        # spawn, not fork: the parent runs an event loop and botocore threads.
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=processes, mp_context=multiprocessing.get_context("spawn")
        )
    else:
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="das-emulate-encoder"
        )
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Run:
    options: EmulateOptions
    kinesis: Any
    kms: Any
    key_id: str
    pool: concurrent.futures.Executor
    progress: Callable[[Progress], None] | None
    started: float
    records: int = 0
    events: int = 0
    heartbeats: int = 0
    data_keys: int = 0
    retried: int = 0
    reordered: int = 0
    _batch: list[Entry] = field(default_factory=list)
    _batch_bytes: int = 0
    _paced_events: int = 0
    _pace_start: float = 0.0
    _backoff: Backoff = field(default_factory=lambda: Backoff(base=0.05, cap=2.0))

    async def produce(self) -> None:
        loop = asyncio.get_running_loop()
        max_inflight = 3 * max(1, self.options.processes)
        inflight: deque[tuple[asyncio.Future[list[bytes]], list[InnerRecord]]] = deque()
        key: DataKey | None = None
        index = 0
        self._pace_start = time.monotonic()
        try:
            for chunk in _chunks(self.options.inner_records(), CHUNK_RECORDS):
                items: list[EncodeItem] = []
                for inner in chunk:
                    if index % self.options.rotate_every == 0:
                        key = await generate_data_key(
                            self.kms, self.key_id, self.options.resource_id
                        )
                        self.data_keys += 1
                    assert key is not None
                    index += 1
                    items.append(
                        EncodeItem(
                            orjson.dumps(inner.doc),
                            inner.version,
                            key.plaintext,
                            key.blob,
                            self.options.suite_for(inner.version),
                        )
                    )
                inflight.append((loop.run_in_executor(self.pool, encode_batch, items), chunk))
                while len(inflight) >= max_inflight:
                    await self._drain(*inflight.popleft())
            while inflight:
                await self._drain(*inflight.popleft())
            await self._flush()
        finally:
            for future, _chunk in inflight:
                future.cancel()

    async def _drain(self, future: asyncio.Future[list[bytes]], chunk: list[InnerRecord]) -> None:
        try:
            encoded = await future
        except concurrent.futures.BrokenExecutor:
            raise EmulateError(
                "an encoder worker process died (out of memory? killed?); scripts that use "
                "processes > 1 need the `if __name__ == '__main__':` guard"
            ) from None
        for data, inner in zip(encoded, chunk, strict=True):
            entry = Entry(data, inner.partition_key, inner.record_events, inner.heartbeats)
            if entry.size > MAX_RECORD_BYTES:
                raise EmulateError(
                    f"a record of {entry.size} bytes exceeds Kinesis' 1 MiB limit: "
                    "lower --events-per-record"
                )
            await self._pace(entry.events)
            if self._batch and (
                len(self._batch) >= MAX_BATCH_RECORDS
                or self._batch_bytes + entry.size > MAX_BATCH_BYTES
            ):
                await self._flush()
            self._batch.append(entry)
            self._batch_bytes += entry.size

    async def _pace(self, events: int) -> None:
        """Hold a record back until ``rate`` allows its events; send what is due first."""
        if self.options.rate <= 0:
            return
        due = self._pace_start + self._paced_events / self.options.rate
        self._paced_events += events
        if due > time.monotonic():
            await self._flush()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _flush(self) -> None:
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        if batch:
            await self._put(batch)

    async def _put(self, batch: list[Entry]) -> None:
        pending = batch
        fruitless = 0
        while pending:
            try:
                response = await self.kinesis.put_records(
                    StreamName=self.options.stream,
                    Records=[{"Data": e.data, "PartitionKey": e.partition_key} for e in pending],
                )
            except (ClientError, BotoCoreError) as exc:
                if not _is_transient(exc):
                    raise _aws_error("Kinesis PutRecords", exc) from None
                outcome = PutOutcome([], pending, 0)
            else:
                outcome = split_results(pending, response["Records"])
            failed = outcome.failed
            self.reordered += outcome.overtaken
            self._count(outcome.succeeded)
            if not failed:
                return
            fruitless = fruitless + 1 if len(failed) == len(pending) else 0
            if fruitless >= MAX_FRUITLESS_ROUNDS:
                raise EmulateError(
                    f"Kinesis PutRecords made no progress in {fruitless} attempts; giving up"
                )
            self.retried += len(failed)
            pending = failed
            await asyncio.sleep(self._backoff.delay(fruitless))

    def _count(self, done: Iterable[Entry]) -> None:
        for entry in done:
            self.records += 1
            self.events += entry.events
            self.heartbeats += entry.heartbeats
        if self.progress is not None:
            self.progress(
                Progress(
                    records=self.records,
                    events=self.events,
                    heartbeats=self.heartbeats,
                    target_events=self.options.count,
                    elapsed=time.monotonic() - self.started,
                )
            )


def _chunks(records: Iterable[InnerRecord], size: int) -> Iterator[list[InnerRecord]]:
    chunk: list[InnerRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
