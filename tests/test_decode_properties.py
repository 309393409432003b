"""Hypothesis: encrypt -> decode round trips; corruption is always a typed error, never a crash
and never a wrong row."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import decode_record
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.model import FIELDS, Kind
from ingest.decode.normalize import sanitize_text, unescape_text
from ingest.errors import DecodeError, DecryptError
from tests.sealing import outer_record, seal_payload

DECRYPTOR = EsdkDecryptor()
KEY = os.urandom(32)
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text PostgreSQL can store as is (no NUL, no lone surrogates): round trips unchanged.
clean_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)
stamps = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def wire_time(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00"


def value_for(kind: Kind) -> st.SearchStrategy[Any]:
    if kind is Kind.TEXT:
        return st.one_of(st.none(), clean_text)
    if kind is Kind.INT:
        return st.one_of(st.none(), int64)
    if kind is Kind.TIME:
        return st.one_of(st.none(), stamps)
    return st.one_of(st.none(), st.lists(st.one_of(st.none(), clean_text), max_size=4))


events = st.fixed_dictionaries({f.wire: value_for(f.kind) for f in FIELDS})
heartbeat_or_record = st.lists(
    st.one_of(events, st.just({"type": "heartbeat"})), min_size=0, max_size=6
)


def to_wire(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("type") == "heartbeat":
        return event
    wire = {k: (wire_time(v) if isinstance(v, datetime) else v) for k, v in event.items()}
    return {"type": "record", **wire}


@SLOW
@given(items=heartbeat_or_record, version=st.sampled_from(["1.0", "1.1", "1.2"]))
def test_round_trip(items: list[dict[str, Any]], version: str) -> None:
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
        assert event.extra == {}
        for spec in FIELDS:
            got = event.column(spec.column)
            want = source[spec.wire]
            if isinstance(want, datetime):
                # The wire format carries microseconds: exact.
                assert got == want
            else:
                assert got == want, spec.wire


@st.composite
def sealed(draw: st.DrawFn) -> tuple[bytes, list[dict[str, Any]]]:
    items = draw(st.lists(events, min_size=1, max_size=3))
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
