"""The canonical encoding of docs/integrity.md: its fast paths equal its definition."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.copytext import _canonical_json
from ingest.decode import copyfmt
from ingest.decode.batch import BatchInput, DecoderConfig, KeyedRecord, decode_batch
from ingest.decode.fingerprint import fingerprint_hash, of_statement
from ingest.decode.model import ActivityEvent, DecodedRecord
from ingest.integrity.canonical import (
    COLUMN_GROUPS,
    EVENT_COLUMNS,
    ZERO_HASH,
    LinkFields,
    anchor_message,
    canonical_json,
    canonical_number,
    canonical_time,
    dead_letter_entries,
    event_digest,
    event_encoding,
    link_hash,
    stored_event_values,
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_the_fast_path_is_the_definition(value: Any) -> None:
    assert canonical_json(value) == _canonical_json(value)


@given(json_values)
def test_canonical_json_is_valid_json_of_the_same_value(value: Any) -> None:
    parsed = json.loads(canonical_json(value), parse_float=Decimal, parse_int=Decimal)
    assert parsed == _as_decimals(value)


def _as_decimals(value: Any) -> Any:
    """Numbers as exact decimals: the canonical text is their plain decimal form."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, list):
        return [_as_decimals(v) for v in value]
    return {k: _as_decimals(v) for k, v in value.items()}


def test_numbers_times_and_fields() -> None:
    assert canonical_number(1e20) == "100000000000000000000"
    assert canonical_number(1e-7) == "0.0000001"
    assert canonical_number(100.0) == "100.0"
    assert canonical_number(-0.0) == "0.0"
    assert canonical_number(12) == "12"
    assert canonical_number(Decimal("2.50")) == "2.50"
    assert canonical_json({"b": 1, "a": [1.5, None, True], "é": "x\n"}) == (
        '{"a":[1.5,null,true],"b":1,"é":"x\\n"}'
    )
    assert canonical_json({"ab": 1, "b": 2}) == '{"ab":1,"b":2}'  # bytes, not length, first
    assert canonical_time(datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0999-01-02T03:04:05.000000Z"
    assert (
        canonical_time(
            datetime(2024, 3, 1, 10, 0, 0, 500000, tzinfo=timezone(timedelta(hours=5, minutes=30)))
        )
        == "2024-03-01T04:30:00.500000Z"
    )


def documented_example() -> list[Any]:
    """The example event of docs/integrity.md, as its 38 values in EVENT_COLUMNS order."""
    values: list[Any] = [None] * 38
    named = {
        "cluster_id": "cluster-ABC",
        "record_version": "1.2",
        "stream_name": "aws-rds-das-cluster-ABC",
        "shard_id": "shardId-000000000000",
        "sequence_number": Decimal("49590338271490256608559692538361571095921575989136588898"),
        "event_index": 0,
        "class": "MAIN",
        "command_text": "SELECT 'é'\t\n",
        "param_list": [1.5, "x"],
        "pid": 42,
        "extra": {"b": 1, "a": None, "q": 'say "\\hi"'},
        "anomalies": ["commandText:nul", 'a"b'],
        "ingested_at": datetime(2026, 11, 25, 12, 0, 0, 5, tzinfo=UTC),
    }
    for column, value in named.items():
        values[EVENT_COLUMNS.index(column)] = value
    return values


def test_the_columns_are_the_copy_columns() -> None:
    assert EVENT_COLUMNS == copyfmt.LINE_COLUMNS


def test_the_documented_example_encoding() -> None:
    """The example in docs/integrity.md, byte for byte: the event's COPY text line."""
    expected = "\t".join(
        [
            "cluster-ABC", "\\N", "1.2", "aws-rds-das-cluster-ABC", "shardId-000000000000",
            "49590338271490256608559692538361571095921575989136588898", "0", "MAIN",
            "\\N", "\\N", "SELECT 'é'\\t\\n", *["\\N"] * 10, '[1.5,"x"]', "42",
            *["\\N"] * 12,
            '{"a":null,"b":1,"q":"say \\\\"\\\\\\\\hi\\\\""}',
            '{"commandText:nul","a\\\\"b"}',
            "2026-11-25T12:00:00.000005Z",
        ]
    )  # fmt: skip
    assert event_encoding(documented_example()) == expected.encode()
    digest = hashlib.sha256(expected.encode()).digest()
    assert event_digest(documented_example()) == digest


def test_the_documented_fingerprint_encoding() -> None:
    """docs/integrity.md, "Column groups": the fingerprint group is encoded only when set,
    after the engine columns; trailing all-NULL groups are left out whatever the version."""
    v2 = event_encoding(documented_example())
    aurora = [*documented_example(), None, {}, None, None]
    assert event_encoding([*aurora, None, None]) == event_encoding(aurora)
    assert event_encoding([*aurora, "select ?", -42]) == v2 + b"\t\\N\t{}\t\\N\t\\N\tselect ?\t-42"
    # a fingerprint on an event stored before the engine columns: the whole line
    old_with_print = [*documented_example(), None, None, None, None, "select ?", -42]
    assert event_encoding(old_with_print) == v2 + b"\t\\N\t\\N\t\\N\t\\N\tselect ?\t-42"
    for version in (1, 2):
        assert event_encoding(old_with_print, version) != event_encoding(
            documented_example(), version
        )
    assert COLUMN_GROUPS[-1] == ("fingerprint", "fingerprint_hash")
    assert EVENT_COLUMNS[-2:] == COLUMN_GROUPS[-1]


def test_version_1_encoding_has_no_stream_name() -> None:
    """Links written before migration 0004 (version 1) encode the same event without it."""
    assert (
        event_encoding(documented_example(), version=1)
        == (
            '[null,"cluster-ABC",null,"1.2","shardId-000000000000",'
            '"49590338271490256608559692538361571095921575989136588898",0,"MAIN",null,null,'
            '"SELECT \'é\'\\t\\n",null,null,null,null,null,null,null,null,null,[1.5,"x"],42,'
            + "null," * 12
            + '{"a":null,"b":1,"q":"say \\"\\\\hi\\""},["commandText:nul","a\\"b"],'
            + '"2026-11-25T12:00:00.000005Z"]'
        ).encode()
    )


def test_the_documented_link_text() -> None:
    """The version 2 link text example of docs/integrity.md, byte for byte."""
    link = LinkFields(
        stream="aws-rds-das-cluster-ABC",
        shard="shardId-000000000000",
        link_no=7,
        kind="batch",
        first_sequence="49590338271490256608559692538361571095921575989136588898",
        last_sequence="49590338271490256608559692538361571095921575989136588900",
        event_count=3,
        days={"2026-11-25": {"n": 3, "sha256": "ab" * 32}},
        created_at=datetime(2026, 11, 25, 12, 0, 1, 250000, tzinfo=UTC),
        dead_letters=dead_letter_entries(
            [("49590338271490256608559692538361571095921575989136588899", b"not a record")]
        ),
    )
    assert link.text() == "\n".join(
        (
            "das-chain-v2",
            "aws-rds-das-cluster-ABC",
            "shardId-000000000000",
            "7",
            "batch",
            "49590338271490256608559692538361571095921575989136588898",
            "49590338271490256608559692538361571095921575989136588900",
            "3",
            "2026-11-25T12:00:01.250000Z",
            '{"2026-11-25":{"n":3,"sha256":"' + "ab" * 32 + '"}}',
            '[{"sequence_number":"49590338271490256608559692538361571095921575989136588899",'
            '"sha256":"' + hashlib.sha256(b"not a record").hexdigest() + '"}]',
        )
    )
    assert link_hash(ZERO_HASH, link) == hashlib.sha256(ZERO_HASH + link.text().encode()).digest()
    # A link with events drop rules removed has them, as canonical JSON, on one more line.
    dropping = LinkFields(**{**link.__dict__, "dropped": {"z": 1, "noise": 4}})
    assert dropping.text().split("\n") == [*link.text().split("\n"), '{"noise":4,"z":1}']
    # Version 1 (before migration 0004): no created_at, no dead letters.
    old = LinkFields(**{**link.__dict__, "version": 1})
    assert old.text().split("\n") == [
        "das-chain-v1",
        *link.text().split("\n")[1:8],
        '{"2026-11-25":{"n":3,"sha256":"' + "ab" * 32 + '"}}',
    ]


def test_dead_letter_entries_are_ordered_by_sequence_number() -> None:
    entries = dead_letter_entries([("100", b"b"), ("99", b"a"), ("100", b"b")])
    assert [e["sequence_number"] for e in entries] == ["99", "100"]
    assert entries[0]["sha256"] == hashlib.sha256(b"a").hexdigest()


def test_anchor_messages_name_the_key_from_version_2() -> None:
    stamp = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    v2 = anchor_message("s", "shardId-1", 3, b"\x01" * 32, stamp, key_id="arn:k", algorithm="A")
    assert v2.decode().split("\n") == [
        "das-anchor-v2", "s", "shardId-1", "3", "01" * 32, "2026-11-25T12:00:00.000000Z",
        "arn:k", "A",
    ]  # fmt: skip
    v1 = anchor_message("s", "shardId-1", 3, b"\x01" * 32, stamp, version=1)
    assert v1.decode().split("\n") == ["das-anchor-v1", *v2.decode().split("\n")[1:6]]


texts = st.one_of(st.none(), st.text(max_size=12))
ints = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
times = st.one_of(
    st.none(),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))])),
)  # fmt: skip


@st.composite
def events(draw: st.DrawFn) -> tuple[ActivityEvent, DecodedRecord]:
    event = ActivityEvent(
        event_index=draw(st.integers(min_value=0, max_value=500)),
        class_=draw(texts), client_application=draw(texts), command=draw(texts),
        command_text=draw(texts), database_name=draw(texts), db_protocol=draw(texts),
        db_user_name=draw(texts), end_time=draw(times), error_message=draw(texts),
        exit_code=draw(texts), log_time=draw(times), net_protocol=draw(texts),
        object_name=draw(texts), object_type=draw(texts),
        param_list=draw(st.one_of(st.none(), st.lists(json_values, max_size=3))),
        pid=draw(ints), remote_host=draw(texts), remote_port=draw(texts), row_count=draw(ints),
        server_host=draw(texts), server_type=draw(texts), server_version=draw(texts),
        service_name=draw(texts), session_id=draw(texts), start_time=draw(times),
        statement_id=draw(ints), substatement_id=draw(ints), transaction_id=draw(texts),
        extra=draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3)),
        anomalies=tuple(draw(st.lists(st.text(max_size=8), max_size=2))),
    )  # fmt: skip
    record = DecodedRecord(
        record_version=draw(st.sampled_from(["1.0", "1.1", "1.2"])),
        cluster_id=draw(texts), instance_id=draw(texts), events=[event], heartbeats=[],
        record_extra=draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2)),
    )  # fmt: skip
    return event, record


@settings(max_examples=300)
@given(events(), st.integers(min_value=1, max_value=10**40), st.text(max_size=24))
def test_the_writer_line_is_the_verifier_encoding(
    pair: tuple[ActivityEvent, DecodedRecord], sequence: int, stream: str
) -> None:
    """The COPY line the decode processes write is, byte for byte, the encoding verify
    computes from the stored values; without a fingerprint, once its two NULL fields are cut
    (what decode_batch hashes)."""
    event, record = pair
    stamp = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=UTC)
    data, count = copyfmt.encode_events([(record, "shardId-1", str(sequence))], stamp, stream)
    assert count == 1
    assert data.endswith(b"\n")
    values = stored_event_values(
        event, record, stream, "shardId-1", str(sequence), stamp, of_statement(event.command_text)
    )
    assert values[EVENT_COLUMNS.index("stream_name")] == stream
    line = data[:-1]
    if values[-2] is None:
        assert line.endswith(copyfmt.NULL_FINGERPRINT)
        line = line[: -len(copyfmt.NULL_FINGERPRINT)]
    assert line == event_encoding(values)


def test_decode_batch_digests_each_event_line() -> None:
    """decode_batch's chain input is, per UTC day, the SHA-256 of each stored COPY line in
    order (without the fingerprint fields when they are NULL): what verify recomputes from the
    rows."""
    import orjson

    from tests.sealing import seal

    key = bytes(range(32))
    events = [
        {"type": "record", "class": "READ", "logTime": "2026-11-24 23:59:59.5+00",
         "commandText": "SELECT 1\t-- tab"},
        {"type": "record", "class": "READ", "logTime": "2026-11-25 00:00:00.25+00",
         "paramList": [1.25]},
        {"type": "record", "class": "READ"},
    ]  # fmt: skip
    doc = orjson.dumps(
        {"type": "DatabaseActivityMonitoringRecord", "clusterId": "c", "instanceId": "i",
         "databaseActivityEventList": events}
    )  # fmt: skip
    raw = seal(doc, key, "1.1")
    out = decode_batch(
        BatchInput(
            "shardId-1", [KeyedRecord(0, "7", raw, key)], DecoderConfig("esdk"), stream_name="s"
        )
    )
    assert out.failures == []
    assert out.event_count == 3
    lines = out.events.split(b"\n")[:-1]
    assert lines[0].endswith(b"\tselect ?\t" + str(fingerprint_hash("select ?")).encode())
    assert lines[1].endswith(copyfmt.NULL_FINGERPRINT)
    lines[1:] = [line[: -len(copyfmt.NULL_FINGERPRINT)] for line in lines[1:]]
    by_day = {
        day: b"".join(hashlib.sha256(line).digest() for line in lines[i : i + 1])
        for day, i in (("2026-11-24", 0), ("2026-11-25", 1), ("none", 2))
    }
    assert out.chain == by_day
