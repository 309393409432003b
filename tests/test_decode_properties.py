"""Hypothesis: encrypt -> decode round trips; corruption is always a typed error, never a crash
and never a wrong row."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import decode_record
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.model import FIELDS, FIELDS_BY_WIRE, Kind
from ingest.decode.normalize import sanitize_text, unescape_text
from ingest.errors import DecodeError, DecryptError
from tests.sealing import outer_record, seal_payload

DECRYPTOR = EsdkDecryptor()
KEY = os.urandom(32)
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text PostgreSQL can store as is (no NUL, no lone surrogates): round trips unchanged.
clean_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
    max_size=40,
)
stamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def wire_time(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00"


#: Text fields Aurora also sends as JSON numbers: exitCode (null, 0, "0", "" or an SQLSTATE) and
#: sessionId ("5ce73c6f.7e64" on PostgreSQL, 725121 or "725121" on MySQL).
NUMERIC_TEXT = {
    "exitCode": st.one_of(st.just(""), st.just(0), int64, st.sampled_from(["0", "42P01"])),
    "sessionId": st.one_of(st.integers(min_value=0, max_value=2**63 - 1), int64),
}


def value_for(wire: str, kind: Kind) -> st.SearchStrategy[Any]:
    if kind is Kind.TEXT:
        numeric = [NUMERIC_TEXT[wire]] if wire in NUMERIC_TEXT else []
        return st.one_of(st.none(), clean_text, *numeric)
    if kind is Kind.INT:
        return st.one_of(st.none(), int64)  # rowCount null: "not a DML statement"
    if kind is Kind.TIME:
        return st.one_of(st.none(), stamps)
    # paramList: null (Aurora MySQL, always), [] or strings (Aurora PostgreSQL)
    return st.one_of(st.none(), st.lists(st.one_of(st.none(), clean_text), max_size=4))


# Unknown fields (a future DAS version's): any JSON value orjson writes exactly, kept in extra.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e18, max_value=1e18)
    | clean_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(clean_text, inner, max_size=3),
    max_leaves=8,
)
unknown_names = clean_text.filter(lambda k: k != "type" and k not in FIELDS_BY_WIRE)
unknown_fields = st.dictionaries(unknown_names, json_values, max_size=3)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    known = draw(st.fixed_dictionaries({f.wire: value_for(f.wire, f.kind) for f in FIELDS}))
    return {**known, **draw(unknown_fields)}


heartbeat_or_record = st.lists(
    st.one_of(events(), st.just({"type": "heartbeat"})), min_size=0, max_size=6
)


def to_wire(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("type") == "heartbeat":
        return event
    wire = {k: (wire_time(v) if isinstance(v, datetime) else v) for k, v in event.items()}
    return {"type": "record", **wire}


def expected_column(kind: Kind, wire_value: Any) -> Any:
    """What the column holds for a clean wire value: numbers in text columns as their text."""
    if kind is Kind.TEXT and isinstance(wire_value, int):
        return str(wire_value)
    return wire_value


def assert_round_trip(items: list[dict[str, Any]], version: str) -> None:
    doc = {
        "type": "DatabaseActivityMonitoringRecord",
        "clusterId": "cluster-P",
        "instanceId": "db-Q",
        "databaseActivityEventList": [to_wire(e) for e in items],
    }
    raw = outer_record(seal_payload(orjson.dumps(doc), KEY), b"blob", version)
    record = decode_record(raw, KEY, DECRYPTOR)

    assert record.record_version == version
    assert (record.cluster_id, record.instance_id) == ("cluster-P", "db-Q")
    expected_records = [(i, e) for i, e in enumerate(items) if e.get("type") != "heartbeat"]
    assert [e.event_index for e in record.events] == [i for i, _ in expected_records]
    assert len(record.heartbeats) == len(items) - len(expected_records)
    for event, (_, source) in zip(record.events, expected_records, strict=True):
        assert event.anomalies == ()
        assert event.extra == {k: v for k, v in source.items() if k not in FIELDS_BY_WIRE}
        for spec in FIELDS:
            got = event.column(spec.column)
            # Times: the wire format carries microseconds, so they are exact too.
            want = expected_column(spec.kind, source[spec.wire])
            assert got == want, spec.wire
            assert type(got) is type(want), spec.wire


@SLOW
@given(items=heartbeat_or_record, version=st.sampled_from(["1.0", "1.1", "1.2"]))
def test_round_trip(items: list[dict[str, Any]], version: str) -> None:
    assert_round_trip(items, version)


def test_round_trip_of_the_typed_variants_and_unknown_fields() -> None:
    """The quirks the strategy draws, each at least once, whatever Hypothesis picks."""
    base: dict[str, Any] = {f.wire: None for f in FIELDS}
    variants = [
        base | {"exitCode": 0, "sessionId": 725121, "rowCount": None, "paramList": None},
        base | {"exitCode": "", "sessionId": "5ce73c6f.7e64", "paramList": []},
        base | {"exitCode": -1, "sessionId": 2**63 - 1, "rowCount": 0, "paramList": ["a"]},
        base | {"brandNew": {"n": 2**64 - 1, "f": -0.5, "l": [True, None, "x"]}, "z": ""},
    ]
    assert_round_trip(variants, "1.2")


@settings(deadline=None)
@given(number=st.integers(min_value=-(10**200), max_value=10**200))
def test_integers_of_any_size_are_kept_exactly(number: int) -> None:
    """Written by a producer as JSON integers (orjson rounds those beyond 64 bits to floats):
    an unknown field, a text column and an integer column each keep the exact value."""
    event = {"type": "record", "big": number, "sessionId": number, "pid": number}
    doc = {
        "type": "DatabaseActivityMonitoringRecord",
        "clusterId": "c",
        "instanceId": "i",
        "databaseActivityEventList": [event],
    }
    raw = outer_record(seal_payload(json.dumps(doc).encode(), KEY), b"blob", "1.2")
    (got,) = decode_record(raw, KEY, DECRYPTOR).events
    exact = -(2**63) <= number <= 2**64 - 1  # what orjson, and so jsonb via COPY, writes
    int64 = -(2**63) <= number <= 2**63 - 1
    assert got.session_id == str(number)
    assert got.pid == (number if int64 else None)
    expected_extra: dict[str, Any] = {"big": number if exact else str(number)}
    expected_flags = set()
    if not exact:
        expected_flags |= {"extra.big:bignum", "sessionId:bignum"}
    if not int64:
        expected_flags.add("pid:range")
        expected_extra["pid"] = number if exact else str(number)
        if not exact:
            expected_flags.add("extra.pid:bignum")
    assert got.extra == expected_extra
    assert set(got.anomalies) == expected_flags


@st.composite
def sealed(draw: st.DrawFn) -> tuple[bytes, list[dict[str, Any]]]:
    items = draw(st.lists(events(), min_size=1, max_size=3))
    doc = {
        "type": "DatabaseActivityMonitoringRecord",
        "clusterId": "c",
        "instanceId": "i",
        "databaseActivityEventList": [to_wire(e) for e in items],
    }
    return seal_payload(orjson.dumps(doc), KEY), items


@SLOW
@given(data=st.data(), message_and_items=sealed())
def test_any_altered_ciphertext_byte_is_rejected(
    data: st.DataObject, message_and_items: tuple[bytes, list[dict[str, Any]]]
) -> None:
    message, _ = message_and_items
    position = data.draw(st.integers(min_value=0, max_value=len(message) - 1), label="position")
    delta = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    altered = bytearray(message)
    altered[position] ^= delta
    try:
        decode_record(outer_record(bytes(altered), b"blob"), KEY, DECRYPTOR)
    except DecryptError:
        return
    raise AssertionError(f"altered byte {position} of {len(message)} was accepted")


@SLOW
@given(data=st.data(), message_and_items=sealed())
def test_any_altered_record_byte_is_an_error_or_changes_nothing(
    data: st.DataObject, message_and_items: tuple[bytes, list[dict[str, Any]]]
) -> None:
    """The outer JSON is not authenticated (Aurora does not bind it); what matters is that a
    change to it either fails with a typed error or yields exactly the original events."""
    message, _ = message_and_items
    raw = outer_record(message, b"blob", "1.1")
    original = decode_record(raw, KEY, DECRYPTOR)
    position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1), label="position")
    replacement = data.draw(st.integers(min_value=0, max_value=255), label="byte")
    altered = bytearray(raw)
    altered[position] = replacement
    try:
        record = decode_record(bytes(altered), KEY, DECRYPTOR)
    except DecodeError:
        return
    assert record.events == original.events
    assert record.heartbeats == original.heartbeats
    assert record.cluster_id == original.cluster_id


@SLOW
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_truncation_is_rejected(cut: int) -> None:
    message = seal_payload(b'{"type": "DatabaseActivityMonitoringRecord"}', KEY)
    cut %= len(message)
    with pytest.raises(DecodeError) as info:
        decode_record(outer_record(message[:cut], b"blob"), KEY, DECRYPTOR)
    assert info.value.stage.value in {"base64", "decrypt"}


@given(garbage=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(garbage: bytes) -> None:
    for raw in (garbage, outer_record(garbage, b"k") if garbage else b"{}"):
        try:
            decode_record(raw, KEY, DECRYPTOR)
        except DecodeError:
            continue
        raise AssertionError("garbage decoded")


@given(text=st.text(max_size=60))
def test_sanitized_text_round_trips(text: str) -> None:
    clean, flag = sanitize_text(text)
    assert "\x00" not in clean
    clean.encode("utf-8")  # storable
    if flag:
        assert unescape_text(clean) == text
    else:
        assert clean == text


def test_wire_time_helper_matches_das_format() -> None:
    assert wire_time(datetime(2019, 5, 24, 0, 39, 49, 940668, tzinfo=UTC)) == (
        "2019-05-24 00:39:49.940668+00"
    )
