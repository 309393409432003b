"""The shard consumer's state machine, one transition at a time (KCL's ConsumerStatesTest).

Fakes stand in for Kinesis (the reader), the decode pool, the data keys, the sink and the lease
store: no servers, the whole file runs in a few seconds. The fakes keep the rules that matter
for exactly-once: the sink's commit is a compare-and-set on (owner, counter, checkpoint), as
the real ADVANCE_CHECKPOINT is.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson
import pytest

from ingest.checkpoint import SHARD_END, TRIM_HORIZON
from ingest.consumer.committer import CommitSettings
from ingest.consumer.fetcher import FetchSettings
from ingest.consumer.pool import DecoderCrashedError
from ingest.consumer.shard import (
    FINAL_STATES,
    TRANSITIONS,
    ShardConsumer,
    ShardSettings,
    State,
)
from ingest.decode.batch import (
    BatchInput,
    BatchOutput,
    Failure,
    HeartbeatRow,
    RecordSpan,
)
from ingest.decode.correlate import StatementRange
from ingest.decode.envelope import Envelope
from ingest.errors import KmsError, KmsUnavailableError
from ingest.kinesis import (
    IteratorExpiredError,
    KinesisRecord,
    KinesisUnavailableError,
    RecordsPage,
)
from ingest.lease import LeaseToken
from ingest.metrics import Metrics
from ingest.warehouse.db import WarehouseUnavailableError
from ingest.warehouse.sink import CommitResult, CopyUnit, DeadLetter, LeaseLostError

STREAM = "aws-rds-das-cluster-TEST"
SHARD = "shardId-000000000001"
OWNER = "worker-a"
DAY = "2026-01-01"

# -- records ------------------------------------------------------------------------------------


def record(seq: int, payload: str = "ok", key: bytes = b"blob") -> KinesisRecord:
    """A DAS-shaped record whose 'ciphertext' the fake pool reads as ``payload``:
    ``ok`` decodes to one event, ``bad`` fails to decode (stage decrypt), ``evil`` decodes to a
    row the fake warehouse refuses, ``crash`` kills decode processes. ``key``: its encrypted
    data key (FakeKeys knows ``blob`` and ``blob2`` and refuses ``refused``)."""
    doc = {
        "type": "DatabaseActivityMonitoringRecords",
        "version": "1.1",
        "databaseActivityEvents": base64.b64encode(f"{payload}:{seq}".encode()).decode(),
        "key": base64.b64encode(key).decode(),
    }
    return KinesisRecord(str(seq), orjson.dumps(doc), f"pk-{seq}", None)


def poison(seq: int) -> KinesisRecord:
    """Not even JSON: dead-lettered at stage json before anything else."""
    return KinesisRecord(str(seq), b"\x00not json", "pk", None)


def page(records: Sequence[KinesisRecord], next_iterator: str | None, lag: int = 0) -> RecordsPage:
    return RecordsPage(list(records), next_iterator, lag)


# -- fakes --------------------------------------------------------------------------------------


@dataclass
class FakeReader:
    """Kinesis: ``pages[iterator]`` is the answer to GetRecords with that iterator (a list is
    answered in turn); an exception in its place is raised."""

    pages: dict[str, Any]
    #: checkpoint -> iterator GetShardIterator returns (default: "it-0")
    iterators: dict[str, str | None] = field(default_factory=dict)
    calls: list[tuple[str, float]] = field(default_factory=list)
    iterator_calls: list[str] = field(default_factory=list)
    #: GetRecords waits on this when set (a fetch in flight)
    hold: asyncio.Event | None = None

    async def iterator(self, shard_id: str, checkpoint: str) -> str | None:
        assert shard_id == SHARD
        self.iterator_calls.append(checkpoint)
        return self.iterators.get(checkpoint, "it-0")

    async def get_records(self, iterator: str, limit: int) -> RecordsPage:
        self.calls.append((iterator, time.monotonic()))
        if self.hold is not None:
            await self.hold.wait()
        answer = self.pages.get(iterator)
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:
            # Nothing scripted: an open shard with nothing new.
            return page([], iterator, 0)
        assert isinstance(answer, RecordsPage)
        return answer


def fake_decode(batch: BatchInput) -> BatchOutput:
    """What decode_batch returns, for the fake ciphertexts of record(): one COPY line and one
    chain digest per ``ok``/``evil`` record, a failure per ``bad`` one, with per-record spans."""
    out = BatchOutput(shard_id=batch.shard_id)
    chunks: list[bytes] = []
    digests = bytearray()
    size = 0
    for position, seq, data, _key in batch.records:
        assert isinstance(data, Envelope), "the consumer hands the pool parsed envelopes"
        kind = data.payload().decode().split(":")[0]
        if kind == "bad":
            out.failures.append(Failure(position, "decrypt", "decrypt: tag mismatch", False))
            continue
        line = f"{seq}\t{kind}\n".encode()
        start_digest = len(digests)
        digests += hashlib.sha256(line).digest()
        chunks.append(line)
        out.spans.append(
            RecordSpan(
                position,
                seq,
                size,
                size + len(line),
                False,
                ((DAY, start_digest, len(digests)),),
            )
        )
        size += len(line)
        out.event_count += 1
        out.records_decoded += 1
        out.heartbeats.append(HeartbeatRow("c", "i", None, seq, {}))
    out.events = b"".join(chunks)
    out.chain = {DAY: bytes(digests)} if digests else {}
    out.days = {date(2026, 1, 1)} if digests else set()
    return out


@dataclass
class FakePool:
    processes: int = 1
    decoded: list[list[str]] = field(default_factory=list)
    alone: list[str] = field(default_factory=list)
    #: decode waits on this when set (a decode in progress)
    hold: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def decode(self, batch: BatchInput, size: int) -> BatchOutput:
        self.decoded.append([r[1] for r in batch.records])
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if any(_kind(r[2]) == "crash" for r in batch.records):
            raise DecoderCrashedError("a batch broke the decode pool 3 times")
        return fake_decode(batch)

    async def decode_alone(self, batch: BatchInput) -> BatchOutput | None:
        (item,) = batch.records
        self.alone.append(item[1])
        return None if _kind(item[2]) == "crash" else fake_decode(batch)


def _kind(data: bytes | Envelope) -> str:
    assert isinstance(data, Envelope)
    return data.payload().decode().split(":")[0]


@dataclass
class FakeKeys:
    unavailable: int = 0
    calls: int = 0
    #: (blob, uses) of every lookup
    lookups: list[tuple[bytes, int]] = field(default_factory=list)

    async def get(self, blob: bytes, context: Mapping[str, str], *, uses: int = 1) -> bytes:
        self.calls += 1
        self.lookups.append((blob, uses))
        assert blob in (b"blob", b"blob2", b"refused")
        assert context == {"aws:rds:dbc-id": "cluster-TEST"}
        if self.unavailable:
            self.unavailable -= 1
            raise KmsUnavailableError("KMS ThrottlingException")
        if blob == b"refused":
            raise KmsError("KMS Decrypt refused: InvalidCiphertextException")
        return (b"k" if blob == b"blob" else b"j") * 32


@dataclass
class FakeLeases:
    """The lease rows: checkpoint, owner and counter per shard."""

    checkpoints: dict[str, str] = field(default_factory=dict)
    owner: str = OWNER
    counter: int = 1
    lookups: list[str] = field(default_factory=list)

    async def checkpoint_of(self, shard_id: str) -> str | None:
        self.lookups.append(shard_id)
        return self.checkpoints.get(shard_id)


class RowRefusedError(Exception):
    """What asyncpg raises for a row PostgreSQL will not take (not retriable)."""


@dataclass
class Committed:
    checkpoint: str
    events: list[bytes]
    letters: list[DeadLetter]
    heartbeats: int
    per_record: bool
    sequence_range: tuple[str, str] | None
    chain: dict[str, bytes]


@dataclass
class FakeSink:
    leases: FakeLeases
    commits: list[Committed] = field(default_factory=list)
    attempts: int = 0
    #: the next N commits fail with a transient fault before touching anything
    unavailable: int = 0
    #: the next commit is written, then its answer is lost (a transient fault)
    lose_answer: bool = False
    #: commit waits on this when set (a commit in progress)
    hold: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    partitions: set[date] = field(default_factory=set)

    async def ensure_partitions(self, days: set[date] | Sequence[date]) -> None:
        self.partitions |= set(days)

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
    ) -> CommitResult:
        self.attempts += 1
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.unavailable:
            self.unavailable -= 1
            raise WarehouseUnavailableError("warehouse unavailable: ConnectionResetError")
        rows = self.leases
        current = rows.checkpoints.get(lease.shard_id, TRIM_HORIZON)
        if (lease.owner, lease.lease_counter) != (rows.owner, rows.counter) or (
            current != previous_checkpoint
        ):
            raise LeaseLostError(f"lease on {lease.shard_id} lost or checkpoint moved")
        result = CommitResult()
        stored: list[bytes] = []
        chain = bytearray()
        for unit in units:
            if b"evil" in unit.events:
                if not per_record or unit.on_store_error is None:
                    raise RowRefusedError("invalid byte sequence")  # the whole batch rolls back
                failed = unit.on_store_error
                result.store_failures.append(
                    DeadLetter(
                        failed.sequence_number,
                        failed.partition_key,
                        failed.arrival_time,
                        "store",
                        "store: CharacterNotInRepertoireError (SQLSTATE 22021)",
                        failed.raw,
                    )
                )
                continue
            stored.append(unit.events)
            chain += unit.chain.get(DAY, b"")
        rows.checkpoints[lease.shard_id] = new_checkpoint
        self.commits.append(
            Committed(
                new_checkpoint,
                stored,
                [*dead_letters, *result.store_failures],
                len(heartbeats),
                per_record,
                sequence_range,
                {DAY: bytes(chain)} if chain else {},
            )
        )
        if self.lose_answer:
            self.lose_answer = False
            raise WarehouseUnavailableError("warehouse unavailable: ConnectionResetError")
        return result

    @property
    def stored_events(self) -> list[bytes]:
        return [e for c in self.commits for e in c.events if e]

    @property
    def letters(self) -> list[DeadLetter]:
        return [d for c in self.commits for d in c.letters]


@dataclass
class Harness:
    reader: FakeReader
    pool: FakePool
    keys: FakeKeys
    leases: FakeLeases
    sink: FakeSink
    metrics: Metrics
    consumer: ShardConsumer
    states: list[State]

    async def run(self) -> State:
        return await asyncio.wait_for(self.consumer.run(), 5.0)

    def retries(self, target: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "das_transient_retries_total", {"target": target}
        )
        return value or 0.0


FAST = ShardSettings(
    fetch=FetchSettings(max_records=100, min_call_interval=0.001, idle_sleep=0.01),
    commit=CommitSettings(chunk_bytes=1 << 20, chunk_records=2),
    parent_poll=0.02,
)


def harness(
    pages: dict[str, Any],
    *,
    checkpoint: str = TRIM_HORIZON,
    parents: tuple[str, ...] = (),
    settings: ShardSettings = FAST,
    iterators: dict[str, str | None] | None = None,
) -> Harness:
    reader = FakeReader(pages, iterators or {})
    leases = FakeLeases({SHARD: checkpoint})
    pool, keys, sink, metrics = FakePool(), FakeKeys(), FakeSink(leases), Metrics()
    consumer = ShardConsumer(
        lease=LeaseToken(STREAM, SHARD, OWNER, 1),
        checkpoint=checkpoint,
        reader=reader,
        keys=keys,
        encryption_context={"aws:rds:dbc-id": "cluster-TEST"},
        pool=pool,
        sink=sink,
        leases=leases,
        metrics=metrics,
        settings=settings,
        parents=parents,
    )
    states: list[State] = []
    _record_states(consumer, states)
    return Harness(reader, pool, keys, leases, sink, metrics, consumer, states)


class _StateLog(logging.Handler):
    def __init__(self, consumer: ShardConsumer, states: list[State]) -> None:
        super().__init__(logging.DEBUG)
        self.consumer, self.states = consumer, states

    def emit(self, entry: logging.LogRecord) -> None:
        if entry.getMessage() == "shard state" and entry.__dict__.get("shard") == SHARD:
            self.states.append(State(entry.__dict__["to"]))


def _record_states(consumer: ShardConsumer, states: list[State]) -> None:
    """Every state the consumer enters, from its debug log of transitions."""
    logger = logging.getLogger("ingest.consumer.shard")
    logger.setLevel(logging.DEBUG)
    for old in [h for h in logger.handlers if isinstance(h, _StateLog)]:
        logger.removeHandler(old)
    logger.addHandler(_StateLog(consumer, states))


def events_of(h: Harness) -> list[str]:
    return [line.split(b"\t")[0].decode() for e in h.sink.stored_events for line in e.splitlines()]


# -- the table ----------------------------------------------------------------------------------


def test_the_table_covers_every_state_and_only_final_states_have_no_handler() -> None:
    assert set(TRANSITIONS) == set(State)
    assert {State.SHARD_END, State.SHUTTING_DOWN, State.LEASE_LOST} == FINAL_STATES
    for state, transition in TRANSITIONS.items():
        if state in FINAL_STATES:
            assert transition.next == frozenset()
        else:
            # Every working state can be stopped and can lose its lease.
            assert {State.SHUTTING_DOWN, State.LEASE_LOST} <= transition.next
            assert state not in FINAL_STATES
    assert State.PROCESSING in TRANSITIONS[State.PROCESSING].next


# -- initializing, processing, shard end -------------------------------------------------------


async def test_pages_commit_in_order_and_the_last_page_of_a_closed_shard_ends_it() -> None:
    h = harness(
        {
            "it-0": page([record(1), record(2), record(3)], "it-1"),
            "it-1": page([record(4)], None),
        }
    )
    assert await h.run() is State.SHARD_END
    assert h.states == [State.INITIALIZING, State.PROCESSING, State.PROCESSING, State.SHARD_END]
    # Chunks of at most two records; the last chunk of the last page carries SHARD_END.
    assert [c.checkpoint for c in h.sink.commits] == ["2", "3", SHARD_END]
    assert [c.sequence_range for c in h.sink.commits] == [("1", "2"), ("3", "3"), ("4", "4")]
    assert events_of(h) == ["1", "2", "3", "4"]
    assert h.leases.checkpoints[SHARD] == SHARD_END
    assert h.consumer.status.checkpoint == SHARD_END
    assert h.metrics.registry.get_sample_value("das_records_ingested_total") == 4
    assert h.sink.partitions == {date(2026, 1, 1)}
    assert [c.heartbeats for c in h.sink.commits] == [2, 1, 1]


async def test_shard_end_after_an_empty_last_page_commits_the_end_alone() -> None:
    h = harness({"it-0": page([record(1)], "it-1"), "it-1": page([], None)})
    assert await h.run() is State.SHARD_END
    assert [(c.checkpoint, c.sequence_range) for c in h.sink.commits] == [
        ("1", ("1", "1")),
        (SHARD_END, None),
    ]


async def test_a_finished_shard_ends_at_once_without_a_commit() -> None:
    h = harness({}, checkpoint="7", iterators={"7": None})
    assert await h.run() is State.SHARD_END
    assert h.states == [State.INITIALIZING, State.SHARD_END]
    assert h.reader.iterator_calls == ["7"]
    assert h.reader.calls == []
    assert h.sink.commits == []


async def test_records_at_or_before_the_checkpoint_are_dropped() -> None:
    h = harness({"it-0": page([record(4), record(5), record(6)], None)}, checkpoint="5")
    assert await h.run() is State.SHARD_END
    assert events_of(h) == ["6"]
    assert h.reader.iterator_calls == ["5"]


# -- waiting on parents ------------------------------------------------------------------------


async def test_a_shard_without_parents_starts_at_once() -> None:
    h = harness({"it-0": page([record(1)], None)})
    assert await h.run() is State.SHARD_END
    assert h.states[0] is State.INITIALIZING
    assert h.leases.lookups == []


async def test_a_child_waits_until_every_parent_reached_shard_end() -> None:
    h = harness(
        {"it-0": page([record(1)], None)},
        parents=("shardId-parent-a", "shardId-parent-b", "shardId-gone"),
    )
    h.leases.checkpoints["shardId-parent-a"] = SHARD_END
    h.leases.checkpoints["shardId-parent-b"] = "41"  # still being read
    task = asyncio.ensure_future(h.run())
    await asyncio.sleep(0.1)
    assert not task.done()
    assert h.states == []  # still WAITING_ON_PARENTS
    assert h.reader.iterator_calls == []
    assert h.leases.lookups.count("shardId-parent-b") >= 2  # polled
    h.leases.checkpoints["shardId-parent-b"] = SHARD_END
    assert await task is State.SHARD_END
    # A parent without a lease row is long gone: finished.
    assert h.states == [State.INITIALIZING, State.PROCESSING, State.SHARD_END]
    assert events_of(h) == ["1"]


async def test_a_stop_while_waiting_on_parents_shuts_down() -> None:
    h = harness({}, parents=("shardId-parent",))
    h.leases.checkpoints["shardId-parent"] = "41"
    task = asyncio.ensure_future(h.run())
    await asyncio.sleep(0.05)
    h.consumer.stop()
    assert await asyncio.wait_for(task, 2) is State.SHUTTING_DOWN
    assert h.reader.iterator_calls == []


# -- lease lost --------------------------------------------------------------------------------


async def test_lease_lost_at_commit_writes_nothing_and_ends_as_lease_lost() -> None:
    h = harness({"it-0": page([record(1), record(2)], "it-1"), "it-1": page([record(3)], None)})
    h.leases.counter = 2  # another worker took the lease meanwhile
    assert await h.run() is State.LEASE_LOST
    assert h.states[-1] is State.LEASE_LOST
    assert h.sink.commits == []
    assert h.leases.checkpoints[SHARD] == TRIM_HORIZON
    # At most the prefetch of the next page (cancelled), nothing after it.
    assert [i for i, _ in h.reader.calls] in (["it-0"], ["it-0", "it-1"])


async def test_lease_lost_at_renewal_ends_after_the_batch_in_hand() -> None:
    h = harness({"it-0": page([record(1)], "it-1")})
    h.reader.pages["it-1"] = page([record(2)], "it-2")
    h.pool.hold = asyncio.Event()
    task = asyncio.ensure_future(h.run())
    await asyncio.wait_for(h.pool.started.wait(), 2)
    h.consumer.lose()  # the renewer could not renew the lease
    h.leases.counter = 2
    h.pool.hold.set()
    assert await asyncio.wait_for(task, 2) is State.LEASE_LOST
    assert h.sink.commits == []  # the batch in hand was refused: fenced by the counter


async def test_lease_lost_while_waiting_for_records() -> None:
    h = harness({})
    h.reader.hold = asyncio.Event()  # GetRecords in flight
    task = asyncio.ensure_future(h.run())
    await asyncio.sleep(0.05)
    h.consumer.lose()
    assert await asyncio.wait_for(task, 2) is State.LEASE_LOST
    assert h.states == [State.INITIALIZING, State.PROCESSING, State.LEASE_LOST]


# -- stop requested ----------------------------------------------------------------------------


async def test_stop_mid_decode_commits_the_batch_in_hand_then_shuts_down() -> None:
    h = harness({"it-0": page([record(1), record(2)], "it-1")})
    h.reader.pages["it-1"] = page([record(3)], "it-2")
    h.pool.hold = asyncio.Event()
    task = asyncio.ensure_future(h.run())
    await asyncio.wait_for(h.pool.started.wait(), 2)
    h.consumer.stop()
    await asyncio.sleep(0.02)
    assert not task.done()  # the decode is not cancelled by a stop
    h.pool.hold.set()
    assert await asyncio.wait_for(task, 2) is State.SHUTTING_DOWN
    assert h.states[-1] is State.SHUTTING_DOWN
    assert events_of(h) == ["1", "2"]
    assert h.leases.checkpoints[SHARD] == "2"
    assert "3" not in events_of(h)


async def test_stop_mid_commit_lets_the_commit_finish_then_shuts_down() -> None:
    h = harness({"it-0": page([record(1)], "it-1"), "it-1": page([record(2)], "it-2")})
    h.sink.hold = asyncio.Event()
    task = asyncio.ensure_future(h.run())
    await asyncio.wait_for(h.sink.started.wait(), 2)
    h.consumer.stop()
    await asyncio.sleep(0.02)
    assert not task.done()
    h.sink.hold.set()
    assert await asyncio.wait_for(task, 2) is State.SHUTTING_DOWN
    assert [c.checkpoint for c in h.sink.commits] == ["1"]
    assert h.consumer.status.checkpoint == "1"


async def test_stop_while_waiting_for_records_shuts_down_at_once() -> None:
    h = harness({})  # an open, empty shard: polled after idle_sleep
    task = asyncio.ensure_future(h.run())
    await asyncio.sleep(0.1)
    assert h.consumer.idle_since is not None  # caught up and empty
    h.consumer.stop()
    assert await asyncio.wait_for(task, 1) is State.SHUTTING_DOWN
    calls = len(h.reader.calls)
    await asyncio.sleep(0.05)
    assert len(h.reader.calls) == calls  # the prefetch was cancelled
    assert h.sink.commits == []


async def test_stop_while_kinesis_is_throttled_ends_the_retries() -> None:
    h = harness({"it-0": KinesisUnavailableError("Kinesis ProvisionedThroughputExceeded")})
    task = asyncio.ensure_future(h.run())
    await asyncio.sleep(0.3)
    assert h.retries("kinesis") >= 1
    h.consumer.stop()
    assert await asyncio.wait_for(task, 1) is State.SHUTTING_DOWN


# -- fetching ----------------------------------------------------------------------------------


async def test_an_expired_iterator_is_renewed_from_the_checkpoint() -> None:
    h = harness(
        {
            "it-0": page([record(1), record(2)], "it-1"),
            "it-1": IteratorExpiredError("shard iterator expired"),
            # The fresh iterator repeats what was committed already.
            "it-fresh": page([record(2), record(3)], None),
        },
        iterators={TRIM_HORIZON: "it-0", "2": "it-fresh"},
    )
    assert await h.run() is State.SHARD_END
    assert h.reader.iterator_calls == [TRIM_HORIZON, "2"]
    assert events_of(h) == ["1", "2", "3"]  # nothing twice
    assert h.retries("kinesis") == 0  # renewed, not retried with the dead iterator


async def test_get_records_is_paced_per_shard() -> None:
    interval = 0.05
    settings = ShardSettings(
        fetch=FetchSettings(min_call_interval=interval, idle_sleep=0.0),
        commit=FAST.commit,
    )
    pages: dict[str, Any] = {f"it-{n}": page([], f"it-{n + 1}", lag=1000) for n in range(6)}
    pages["it-6"] = page([record(1)], None)
    h = harness(pages, settings=settings)
    assert await h.run() is State.SHARD_END
    starts = [at for _, at in h.reader.calls]
    assert len(starts) == 7
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= interval * 0.99, gaps


# -- bad records and refusals ------------------------------------------------------------------


async def test_a_poison_record_is_dead_lettered_and_the_shard_moves_on() -> None:
    h = harness({"it-0": page([record(1), poison(2), record(3, "bad"), record(4)], None)})
    assert await h.run() is State.SHARD_END
    assert events_of(h) == ["1", "4"]
    stages = {d.sequence_number: d.stage for d in h.sink.letters}
    assert stages == {"2": "json", "3": "decrypt"}
    assert [d.raw for d in h.sink.letters if d.sequence_number == "2"] == [b"\x00not json"]
    assert h.leases.checkpoints[SHARD] == SHARD_END


async def test_a_chunk_looks_each_data_key_up_once_and_a_refused_key_letters_its_records() -> None:
    settings = ShardSettings(fetch=FAST.fetch, commit=CommitSettings(chunk_records=10))
    keys = [b"blob", b"blob2", b"blob", b"refused", b"blob2", b"refused", b"blob"]
    records = [record(i + 1, key=key) for i, key in enumerate(keys)]
    h = harness({"it-0": page([*records[:3], poison(8), *records[3:]], None)}, settings=settings)
    assert await h.run() is State.SHARD_END
    # one lookup per distinct key blob of the chunk, for as many records as it serves
    assert sorted(h.keys.lookups) == [(b"blob", 3), (b"blob2", 2), (b"refused", 2)]
    assert events_of(h) == ["1", "2", "3", "5", "7"]
    (decoded,) = h.pool.decoded
    assert decoded == ["1", "2", "3", "5", "7"]
    (commit,) = h.sink.commits
    assert [(d.sequence_number, d.stage) for d in commit.letters] == [
        ("8", "json"),
        ("4", "kms"),
        ("6", "kms"),
    ]
    assert all("InvalidCiphertextException" in d.error for d in commit.letters[1:])
    assert h.leases.checkpoints[SHARD] == SHARD_END


async def test_a_batch_the_warehouse_refuses_is_stored_record_by_record_from_the_spans() -> None:
    settings = ShardSettings(fetch=FAST.fetch, commit=CommitSettings(chunk_records=10))
    h = harness(
        {"it-0": page([record(1), record(2, "evil"), record(3, "bad"), record(4)], None)},
        settings=settings,
    )
    assert await h.run() is State.SHARD_END
    (commit,) = h.sink.commits
    assert commit.per_record
    assert commit.checkpoint == SHARD_END
    assert events_of(h) == ["1", "4"]
    assert {d.sequence_number: d.stage for d in commit.letters} == {"3": "decrypt", "2": "store"}
    # Sliced from the one decode, not decoded again; each unit keeps its own chain digests.
    assert h.pool.decoded == [["1", "2", "3", "4"]]
    assert h.pool.alone == []
    assert commit.chain == {
        DAY: hashlib.sha256(b"1\tok\n").digest() + hashlib.sha256(b"4\tok\n").digest()
    }
    assert h.metrics.registry.get_sample_value("das_dead_letters_total", {"stage": "store"}) == 1


async def test_a_batch_that_crashes_the_pool_is_decoded_apart_in_quarantine() -> None:
    h = harness({"it-0": page([record(1), record(2, "crash"), record(3)], None)})
    settings_chunk = FAST.commit.chunk_records
    assert settings_chunk == 2
    assert await h.run() is State.SHARD_END
    assert events_of(h) == ["1", "3"]
    assert {d.sequence_number: d.stage for d in h.sink.letters} == {"2": "crash"}
    assert h.pool.alone == ["1", "2"]  # only the chunk that crashed, record by record


# -- transient faults --------------------------------------------------------------------------


async def test_transient_faults_are_retried_never_dead_lettered() -> None:
    h = harness({"it-0": [KinesisUnavailableError("Kinesis ThrottlingException")]})
    h.reader.pages["it-0"] = [
        KinesisUnavailableError("Kinesis ThrottlingException"),
        page([record(1), record(2)], None),
    ]
    h.keys.unavailable = 1
    h.sink.unavailable = 1
    assert await h.run() is State.SHARD_END
    assert events_of(h) == ["1", "2"]
    assert h.sink.letters == []
    assert (h.retries("kinesis"), h.retries("kms"), h.retries("postgres")) == (1, 1, 1)


async def test_a_commit_whose_answer_was_lost_is_not_written_twice() -> None:
    h = harness({"it-0": page([record(1)], "it-1"), "it-1": page([record(2)], None)})
    h.sink.lose_answer = True  # committed, then the connection dropped
    assert await h.run() is State.SHARD_END
    assert events_of(h) == ["1", "2"]
    assert [c.checkpoint for c in h.sink.commits] == ["1", SHARD_END]
    assert h.leases.lookups == [SHARD]  # the retry was refused; the checkpoint showed it landed


async def test_an_unexpected_error_propagates_as_a_crash() -> None:
    h = harness({"it-0": page([record(1)], None)})

    async def broken(*_args: Any, **_kwargs: Any) -> CommitResult:
        raise RuntimeError("a bug")

    h.sink.commit = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bug"):
        await h.run()


def test_statement_ranges_of_per_record_rows_name_the_record_alone() -> None:
    out = BatchOutput(
        events=b"a\nb\n",
        spans=[
            RecordSpan(0, "10", 0, 2, True, ()),
            RecordSpan(1, "11", 2, 4, False, ()),
        ],
        shard_id=SHARD,
    )
    rows = out.record_rows()
    assert [r.events for r in rows] == [b"a\n", b"b\n"]
    assert rows[0].statements == StatementRange(SHARD, "10", "10")
    assert rows[1].statements is None
