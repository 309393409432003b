"""Decoding a whole Kinesis batch into COPY-ready payloads (pure; what the process pool runs).

The parent sends one :class:`BatchInput` (records whose data keys it already got from KMS) and
gets back one :class:`BatchOutput`: the events as one COPY buffer, the range of records whose
MySQL statement events the warehouse must merge, heartbeats, the days the events fall on, and the
records that failed with their stage.
One bytes object per batch is far cheaper to move between processes than row tuples.

Each decoded record also gets a :class:`RecordSpan`: where its COPY lines and its chain digests
sit in the output. When the warehouse refuses a batch, the consumer stores it record by record
from these slices (:meth:`BatchOutput.record_units`) instead of decoding it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from hashlib import sha256
from typing import Any, NamedTuple, Protocol

from ingest.decode import copyfmt
from ingest.decode.correlate import StatementRange, StatementRangeBuilder
from ingest.decode.envelope import Envelope, read_envelope
from ingest.decode.fingerprint import Fingerprint, of_statement
from ingest.decode.gunzip import DEFAULT_MAX_DECOMPRESSED
from ingest.decode.model import ActivityEvent, DecodedRecord
from ingest.decode.pipeline import Decryptor, decode_envelope
from ingest.digests import DayDigests, utc_date
from ingest.errors import DecodeError


@dataclass(frozen=True, slots=True)
class DecoderConfig:
    decryptor: str = "lean"
    verify_signatures: bool = True
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED
    #: compute the events' digests for the integrity chain (off with --no-integrity-chain)
    chain: bool = True
    #: evaluate the policy rules (the built-in pack and ``rules``): the pool decodes with
    #: ingest.policy.hook.decode_with_policy, which compiles them once per process
    policy: bool = True
    #: the rules file's text (None: the built-in pack alone)
    rules: str | None = None
    builtin_rules: bool = True


class KeyedRecord(NamedTuple):
    """A Kinesis record with its plaintext data key, ready to decode (a named tuple: it crosses
    the process pool as compactly as a plain one)."""

    #: where it is in the page or chunk it came from (Failure.index and spans refer to it)
    position: int
    sequence_number: str
    #: the record's bytes, or its envelope already parsed (the consumer parses it once, in the
    #: event loop, for the key blob; the pool then does not parse it again)
    record: bytes | Envelope
    data_key: bytes


@dataclass(frozen=True, slots=True)
class BatchInput:
    shard_id: str
    records: list[KeyedRecord]
    config: DecoderConfig = DecoderConfig()
    #: the stream the records were read from: stored with every event (shard ids repeat
    #: across streams)
    stream_name: str = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class Failure:
    index: int
    stage: str
    error: str
    retriable: bool


@dataclass(frozen=True, slots=True)
class HeartbeatRow:
    cluster_id: str | None
    instance_id: str | None
    log_time: datetime | None
    sequence_number: str
    fields: dict[str, Any]


class RecordSpan(NamedTuple):
    """Where one decoded record's rows sit in its BatchOutput."""

    position: int
    sequence_number: str
    #: its COPY lines: ``events[start:end]``
    start: int
    end: int
    #: whether it holds MySQL statement candidates (see correlate.StatementRange)
    statements: bool
    #: its chain digests: ``chain[day][start:end]`` for each (day, start, end)
    chain: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class RecordRows:
    """One record's share of a BatchOutput: what per-record storage COPYs."""

    position: int
    sequence_number: str
    events: bytes
    statements: StatementRange | None
    chain: dict[str, bytes]


@dataclass(slots=True)
class BatchOutput:
    events: bytes = b""
    event_count: int = 0
    #: The records holding MySQL MAIN/AUX events, for das.merge_statements (None: no such).
    statements: StatementRange | None = None
    #: How many records that range covers with MySQL events.
    statement_records: int = 0
    heartbeats: list[HeartbeatRow] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    days: set[date] = field(default_factory=set)
    records_decoded: int = 0
    #: The integrity chain's input: per UTC day, the concatenated digests of the events
    #: (docs/integrity.md), computed here where the values are at hand.
    chain: dict[str, bytes] = field(default_factory=dict)
    #: Undecodable NULL-time events go to the default partition; counted for metrics.
    undated_events: int = 0
    #: One span per decoded record, in input order.
    spans: list[RecordSpan] = field(default_factory=list)
    shard_id: str = ""
    #: What the events mean for the policy rules (an ingest.policy PolicyOutput: tallies,
    #: sightings, drops), or None when no policy ran.
    policy: Any = None

    def record_rows(self) -> list[RecordRows]:
        """The output cut record by record (slices: nothing is decoded again)."""
        return [
            RecordRows(
                span.position,
                span.sequence_number,
                self.events[span.start : span.end],
                StatementRange(self.shard_id, span.sequence_number, span.sequence_number)
                if span.statements
                else None,
                {day: self.chain[day][start:end] for day, start, end in span.chain},
            )
            for span in self.spans
        ]


_decryptors: dict[tuple[str, bool], Decryptor] = {}


def decryptor_for(config: DecoderConfig) -> Decryptor:
    """One decryptor per process and configuration (they keep small caches)."""
    key = (config.decryptor, config.verify_signatures)
    found = _decryptors.get(key)
    if found is None:
        from ingest.decode.decryptors import make_decryptor

        found = make_decryptor(config.decryptor, verify_signatures=config.verify_signatures)
        _decryptors[key] = found
    return found


class EventPolicy(Protocol):
    """Policy rules run beside normalize (ingest.policy.evaluate.Policy; the decode layer only
    knows this shape). ``evaluate`` records what an event means for the rules in ``output`` and
    returns the event to store (redacted, maybe) or None to drop it."""

    def new_output(self) -> Any: ...

    def evaluate(
        self,
        event: ActivityEvent,
        record: DecodedRecord,
        fingerprint: Fingerprint | None,
        ref: tuple[str, int],
        output: Any,
    ) -> ActivityEvent | None: ...


def decode_batch(batch: BatchInput, policy: EventPolicy | None = None) -> BatchOutput:
    """Decode every record; COPY-encode each one as soon as it is decoded.

    Encoding record by record keeps only one record's event objects alive at a time (a page
    of 100-event records holds ~10x its size in Python objects); the output is the same as
    encoding the whole batch at the end.
    """
    decryptor = decryptor_for(batch.config)
    max_decompressed = batch.config.max_decompressed
    shard_id = batch.shard_id
    out = BatchOutput()
    statements = StatementRangeBuilder(shard_id)
    chunks: list[bytes] = []
    digests = DayDigests()
    ingested_at = datetime.now(UTC)
    chain = batch.config.chain
    out.shard_id = shard_id
    size = 0
    if policy is not None:
        out.policy = policy.new_output()
    for index, sequence_number, raw, data_key in batch.records:
        try:
            envelope = raw if isinstance(raw, Envelope) else read_envelope(raw)
            record = decode_envelope(
                envelope, data_key, decryptor, max_decompressed=max_decompressed
            )
        except DecodeError as exc:
            out.failures.append(Failure(index, exc.stage.value, str(exc), exc.retriable))
            continue
        out.records_decoded += 1
        fingerprints: list[Fingerprint | None] | None = None
        if record.events and policy is not None:
            record, fingerprints = _apply_policy(policy, record, sequence_number, out.policy)
        start = size
        statement_records = statements.records
        #: day -> where this record's digests start in digests.by_day[day]
        day_starts: dict[str, int] = {}
        if record.events:
            data, count = copyfmt.encode_events(
                ((record, shard_id, sequence_number),),
                ingested_at,
                batch.stream_name,
                fingerprints,
            )
            chunks.append(data)
            size += len(data)
            out.event_count += count
            statements.add(record, sequence_number)
            # Every event's day, whatever the chain switch: the sink creates these partitions
            # before the commit (an event of a day without one lands in the default partition).
            # With the chain, an event's COPY line is its canonical encoding (chain version 2):
            # one SHA-256 a line, filed under that day (event_day). COPY escapes newlines.
            lines = data.split(b"\n") if chain else None
            for n, event in enumerate(record.events):
                if event.log_time is None:
                    out.undated_events += 1
                    day = "none"
                else:
                    event_date = utc_date(event.log_time)
                    out.days.add(event_date)
                    day = event_date.isoformat()
                if lines is not None:
                    if day not in day_starts:
                        day_starts[day] = len(digests.by_day.get(day, b""))
                    line = lines[n]
                    if line.endswith(copyfmt.NULL_FINGERPRINT):
                        # no fingerprint: not part of the encoding (docs/integrity.md)
                        line = line[: -len(copyfmt.NULL_FINGERPRINT)]
                    digests.add(day, sha256(line).digest())
        for beat in record.heartbeats:
            out.heartbeats.append(
                HeartbeatRow(
                    record.cluster_id,
                    record.instance_id,
                    beat.log_time,
                    sequence_number,
                    beat.fields,
                )
            )
        out.spans.append(
            RecordSpan(
                index,
                sequence_number,
                start,
                size,
                statements.records > statement_records,
                tuple((day, at, len(digests.by_day[day])) for day, at in day_starts.items()),
            )
        )
    out.events = b"".join(chunks)
    out.chain = digests.packed()
    out.statements = statements.build()
    out.statement_records = statements.records
    return out


def _apply_policy(
    policy: EventPolicy, record: DecodedRecord, sequence_number: str, out: Any
) -> tuple[DecodedRecord, list[Fingerprint | None]]:
    """Evaluate the rules on a record's events: the record with dropped events removed and
    redacted ones rewritten, and the fingerprints of the events kept (taken before
    redaction)."""
    kept = []
    fingerprints: list[Fingerprint | None] = []
    changed = False
    for event in record.events:
        found = of_statement(event.command_text)
        stored = policy.evaluate(event, record, found, (sequence_number, event.event_index), out)
        if stored is None:
            changed = True
            continue
        changed = changed or stored is not event
        kept.append(stored)
        fingerprints.append(found)
    if changed:
        record = dataclasses.replace(record, events=kept)
    return record, fingerprints
