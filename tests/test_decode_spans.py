"""Per-record spans of a decoded batch: per-record storage slices the batch, nothing is decoded
again, and a parsed envelope decodes exactly as the record's bytes do (pure, no servers)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ingest.decode import copyfmt
from ingest.decode.batch import BatchInput, DecoderConfig, KeyedRecord, decode_batch
from ingest.decode.correlate import StatementRange
from ingest.decode.envelope import read_envelope
from tests.sealing import seal
from tests.warehouse_helpers import KEY, inner

CONFIG = DecoderConfig(decryptor="esdk")
NOW = datetime.now(UTC).replace(microsecond=0)


def ev(command: str, when: datetime | None, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "record", "command": command, **extra}
    if when is not None:
        event["logTime"] = when.isoformat()
    return event


def records() -> list[KeyedRecord]:
    yesterday = NOW - timedelta(days=1)
    mysql = {"class": "MAIN", "substatementId": 1, "statementId": 7, "serverType": "MySQL"}
    docs = [
        inner(ev("A1", NOW), ev("A2", yesterday), ev("A3", NOW)),  # two days, interleaved
        inner(ev("B1", yesterday)),
        inner(ev("C1", NOW, **mysql)),  # a MySQL statement candidate
        inner(),  # no events at all
        inner(ev("E1", None), ev("E2", NOW)),  # an undated event
    ]
    items = [KeyedRecord(n, str(100 + n), seal(doc, KEY, "1.2"), KEY) for n, doc in enumerate(docs)]
    # A record that fails (a wrong data key) between good ones: it gets no span.
    items.insert(2, KeyedRecord(9, "150", seal(docs[0], KEY, "1.2"), b"x" * 32))
    return items


def decode(items: list[KeyedRecord], chain: bool = True) -> Any:
    config = DecoderConfig(decryptor="esdk", chain=chain)
    return decode_batch(BatchInput("shardId-1", items, config, stream_name="s"))


@pytest.mark.parametrize("chain", [True, False], ids=["chain", "no-chain"])
def test_record_rows_partition_the_batch_exactly(chain: bool) -> None:
    items = records()
    out = decode(items, chain)
    assert [f.index for f in out.failures] == [9]
    rows = out.record_rows()
    assert [r.position for r in rows] == [0, 1, 2, 3, 4]
    assert [r.sequence_number for r in rows] == ["100", "101", "102", "103", "104"]
    # The slices are the batch, in order, without a byte more or less.
    assert b"".join(r.events for r in rows) == out.events
    assert [r.events.count(b"\n") for r in rows] == [3, 1, 1, 0, 2]
    days = set(out.chain)
    assert bool(days) is chain
    for day in days:
        assert b"".join(r.chain.get(day, b"") for r in rows) == out.chain[day]
    # Each record's chain digests are those of its own lines.
    for r in rows:
        own = b"".join(sorted(r.chain.values()))
        assert len(own) == 32 * (r.events.count(b"\n") if chain else 0)
        if chain:
            # (a line's encoding leaves out a NULL fingerprint: docs/integrity.md)
            digests = {
                hashlib.sha256(line.removesuffix(copyfmt.NULL_FINGERPRINT)).digest()
                for line in r.events.split(b"\n")[:-1]
            }
            got = {own[i : i + 32] for i in range(0, len(own), 32)}
            assert got == digests
    assert [r.statements for r in rows] == [
        None,
        None,
        StatementRange("shardId-1", "102", "102"),
        None,
        None,
    ]


def test_each_record_alone_decodes_to_what_its_slice_holds() -> None:
    items = records()
    rows = {r.sequence_number: r for r in decode(items).record_rows()}
    for item in items:
        alone = decode([item])
        if alone.failures:
            assert item.sequence_number not in rows
            continue
        sliced = rows[item.sequence_number]
        assert sliced.events.count(b"\n") == alone.event_count
        assert sliced.statements == alone.statements
        assert set(sliced.chain) == set(alone.chain)
        assert {d: len(v) for d, v in sliced.chain.items()} == {
            d: len(v) for d, v in alone.chain.items()
        }


def test_a_parsed_envelope_decodes_as_the_record_bytes_do() -> None:
    items = records()
    parsed = []
    for item in items:
        assert isinstance(item.record, bytes)
        parsed.append(item._replace(record=read_envelope(item.record)))
    from_bytes, from_envelopes = decode(items), decode(parsed)
    assert from_envelopes.failures == from_bytes.failures
    assert from_envelopes.event_count == from_bytes.event_count == 7
    assert from_envelopes.spans == from_bytes.spans
    assert from_envelopes.statements == from_bytes.statements
    assert from_envelopes.days == from_bytes.days
