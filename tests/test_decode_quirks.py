"""The type quirks of real DAS events, unknown fields, heartbeats and unstorable text."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from ingest.decode import decode_record
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.model import DecodedRecord
from ingest.decode.normalize import sanitize_text, unescape_text
from ingest.errors import EnvelopeJsonError, NormalizeError, ParseError
from tests.sealing import seal

DECRYPTOR = EsdkDecryptor()
KEY = os.urandom(32)


def inner(*events: dict[str, Any], **record: Any) -> bytes:
    doc = {
        "type": "DatabaseActivityMonitoringRecord",
        "clusterId": "cluster-ABC",
        "instanceId": "db-XYZ",
        "databaseActivityEventList": list(events),
    }
    doc.update(record)
    return orjson.dumps(doc)


def decode(payload: bytes, version: str = "1.1") -> DecodedRecord:
    return decode_record(seal(payload, KEY, version), KEY, DECRYPTOR)


def one(**fields: Any) -> Any:
    record = decode(inner({"type": "record", **fields}))
    assert len(record.events) == 1
    return record.events[0]


@pytest.mark.parametrize(
    ("raw", "stored"),
    [(None, None), (0, "0"), (1, "1"), ("", ""), ("0", "0"), ("42P01", "42P01")],
)
def test_exit_code_is_text_whatever_its_json_type(raw: object, stored: str | None) -> None:
    event = one(exitCode=raw)
    assert event.exit_code == stored
    assert event.anomalies == ()


@pytest.mark.parametrize(
    ("raw", "stored"),
    [("5ce73c6f.7e64", "5ce73c6f.7e64"), ("725121", "725121"), (725121, "725121")],
)
def test_session_id_is_text(raw: object, stored: str) -> None:
    assert one(sessionId=raw).session_id == stored


def test_nulls_and_empty_lists() -> None:
    event = one(rowCount=None, paramList=None, commandText=None)
    assert (event.row_count, event.param_list, event.command_text) == (None, None, None)
    assert one(paramList=[]).param_list == []
    assert one(paramList=["a", "1", None]).param_list == ["a", "1", None]


def test_times_become_aware_datetimes() -> None:
    event = one(
        logTime="2019-05-24 00:39:49.940668+00",
        startTime="2019-05-24 00:39:49+05:30",
        endTime="2020-05-22 18:07:13.267213",
    )
    assert event.log_time == datetime(2019, 5, 24, 0, 39, 49, 940668, tzinfo=UTC)
    assert event.start_time == datetime(
        2019, 5, 24, 0, 39, 49, tzinfo=timezone(timedelta(hours=5, minutes=30))
    )
    # Documented as UTC; a missing offset is read as UTC.
    assert event.end_time == datetime(2020, 5, 22, 18, 7, 13, 267213, tzinfo=UTC)


def test_numeric_strings_become_integers() -> None:
    event = one(pid="18251", statementId="65459278", rowCount=10.0)
    assert (event.pid, event.statement_id, event.row_count) == (18251, 65459278, 10)
    assert event.anomalies == ()


def test_unknown_fields_are_kept_in_extra() -> None:
    record = decode(
        inner(
            {"type": "record", "command": "SELECT", "newField": {"a": [1, 2]}, "other": None},
            engineHint="x",
        )
    )
    event = record.events[0]
    assert event.command == "SELECT"
    assert event.extra == {"newField": {"a": [1, 2]}, "other": None}
    assert record.record_extra == {"engineHint": "x"}


@pytest.mark.parametrize(
    ("field", "raw", "column", "flag"),
    [
        ("pid", "abc", "pid", "pid:type"),
        ("pid", True, "pid", "pid:type"),
        ("rowCount", 2**63, "row_count", "rowCount:range"),
        ("logTime", "yesterday", "log_time", "logTime:time"),
        ("logTime", 12345, "log_time", "logTime:type"),
        ("commandText", {"sql": "x"}, "command_text", "commandText:type"),
        ("paramList", "a,b", "param_list", "paramList:type"),
    ],
)
def test_wrong_types_keep_the_original_in_extra(
    field: str, raw: object, column: str, flag: str
) -> None:
    event = one(**{field: raw, "command": "QUERY"})
    assert getattr(event, column) is None
    assert event.extra == {field: raw}
    assert event.anomalies == (flag,)
    assert event.command == "QUERY"


def test_heartbeats_are_separated_from_records() -> None:
    record = decode(
        inner(
            {"type": "heartbeat", "logTime": "2020-05-22 18:07:13.267214+00"},
            {"type": "record", "command": "SELECT"},
            {"type": "heartbeat"},
        )
    )
    assert [e.event_index for e in record.events] == [1]
    assert [h.event_index for h in record.heartbeats] == [0, 2]
    assert record.heartbeats[0].log_time == datetime(2020, 5, 22, 18, 7, 13, 267214, tzinfo=UTC)
    assert record.heartbeats[1].log_time is None


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2", "1.3"])
def test_record_versions_1_x_decode(version: str) -> None:
    record = decode(inner({"type": "record", "command": "SELECT"}), version)
    assert record.record_version == version
    assert record.events[0].command == "SELECT"


def test_major_version_2_is_refused() -> None:
    with pytest.raises(EnvelopeJsonError, match="unsupported record version"):
        decode(inner({"type": "record"}), "2.0")


def test_nul_bytes_are_escaped_and_flagged() -> None:
    event = one(commandText="select '\x00' -- a\\b", paramList=["\x00"], weird="\x00")
    assert event.command_text == "select '\\x00' -- a\\\\b"
    assert unescape_text(event.command_text) == "select '\x00' -- a\\b"
    assert event.param_list == ["\\x00"]
    assert event.extra == {"weird": "\\x00"}
    assert set(event.anomalies) == {"commandText:nul", "paramList:nul", "extra.weird:nul"}


def test_invalid_utf8_is_escaped_and_flagged() -> None:
    payload = inner({"type": "record", "commandText": "PLACEHOLDER", "command": "QUERY"})
    payload = payload.replace(b"PLACEHOLDER", b"select \xff\xfe from t")
    event = decode(payload).events[0]
    assert event.command_text == "select \\xff\\xfe from t"
    assert event.anomalies == ("commandText:utf8",)
    assert event.command == "QUERY"
    original = unescape_text(event.command_text).encode("utf-8", "surrogateescape")
    assert original == b"select \xff\xfe from t"


def test_lone_surrogate_escapes_are_flagged() -> None:
    payload = inner({"type": "record", "commandText": "PLACEHOLDER"})
    payload = payload.replace(b"PLACEHOLDER", b"a\\ud800b")
    event = decode(payload).events[0]
    assert event.command_text == "a\\ud800b"
    assert unescape_text(event.command_text) == "a\ud800b"
    assert event.anomalies == ("commandText:utf8",)


def test_clean_text_is_untouched() -> None:
    text = "select 'ünïcødé', e'\\t' from \"t\"\n-- ☃"
    assert sanitize_text(text) == (text, None)
    assert one(commandText=text).command_text == text


def test_huge_command_text() -> None:
    text = "select '" + "x" * (1024 * 1024) + "'"
    assert one(commandText=text).command_text == text


# -- events that are neither records nor heartbeats ---------------------------------------------


def test_an_event_of_unknown_or_missing_type_is_kept_flagged_and_spares_the_others() -> None:
    record = decode(
        inner(
            {"type": "record", "command": "A"},
            {"type": "audit", "command": "B", "pid": 7},
            {"command": "C", "logTime": "2020-05-22 18:07:13.267214+00"},
            {"type": "heartbeat", "logTime": "2020-05-22 18:07:14+00"},
            {"type": "Heartbeat", "command": "D"},  # not a heartbeat: types are exact
            {"type": {"nested": "x\x00y"}, "command": "E"},
            {"type": "record", "command": "F"},
        )
    )
    assert [(e.event_index, e.command) for e in record.events] == [
        (0, "A"),
        (1, "B"),
        (2, "C"),
        (4, "D"),
        (5, "E"),
        (6, "F"),
    ]
    assert [h.event_index for h in record.heartbeats] == [3]
    by_command = {e.command: e for e in record.events}
    for clean in ("A", "F"):
        assert by_command[clean].anomalies == ()
        assert by_command[clean].extra == {}
    assert by_command["B"].anomalies == ("type:unknown",)
    assert by_command["B"].extra == {"type": "audit"}
    assert by_command["B"].pid == 7  # the rest of the event is normalized as usual
    assert by_command["C"].anomalies == ("type:missing",)
    assert by_command["C"].extra == {}
    assert by_command["C"].log_time == datetime(2020, 5, 22, 18, 7, 13, 267214, tzinfo=UTC)
    assert by_command["D"].anomalies == ("type:unknown",)
    assert by_command["D"].extra == {"type": "Heartbeat"}
    assert by_command["E"].extra == {"type": {"nested": "x\\x00y"}}
    assert set(by_command["E"].anomalies) == {"type:unknown", "extra.type.nested:nul"}


def test_heartbeats_keep_their_anomaly_flags() -> None:
    record = decode(
        inner(
            {"type": "heartbeat", "logTime": "yesterday", "note": "a\x00b"},
            {"type": "heartbeat", "logTime": 17},
            {"type": "heartbeat", "logTime": "2020-05-22 18:07:14+00"},
        )
    )
    first, second, clean = record.heartbeats
    assert first.log_time is None
    assert first.fields == {
        "logTime": "yesterday",
        "note": "a\\x00b",
        "_anomalies": ["logTime:time", "heartbeat.note:nul"],
    }
    assert second.fields == {"logTime": 17, "_anomalies": ["logTime:type"]}
    assert clean.fields == {"logTime": "2020-05-22 18:07:14+00"}
    assert record.events == []


# -- numbers beyond 64 bits -----------------------------------------------------------------------


def raw_inner(event_json: str) -> bytes:
    """An inner document whose one event is given as JSON text (numbers orjson can't write)."""
    return (
        b'{"type":"DatabaseActivityMonitoringRecord","clusterId":"c","instanceId":"i",'
        b'"databaseActivityEventList":[' + event_json.encode() + b"]}"
    )


@pytest.mark.parametrize(
    ("text", "stored", "flagged"),
    [
        ("18446744073709551615", 2**64 - 1, False),  # uint64: orjson keeps it exactly
        ("-9223372036854775808", -(2**63), False),
        ("18446744073709551616", "18446744073709551616", True),  # orjson: a rounded float
        ("-9223372036854775809", "-9223372036854775809", True),
        ("123456789012345678901234567890", "123456789012345678901234567890", True),
        ("9" * 5000, "9" * 5000, True),  # beyond Python's int(str) digit limit
        ("1e400", "1e400", True),  # beyond a double: orjson refuses the document
        ("-1.5e300", "-1.5e300", True),
        ("1e19", "1e19", True),  # a float of integer size: kept as written
        ("1.5", 1.5, False),
    ],
)
def test_an_unknown_field_with_a_huge_number_keeps_it_exactly(
    text: str, stored: object, flagged: bool
) -> None:
    record = decode(raw_inner('{"type":"record","command":"SELECT","big":' + text + "}"))
    (event,) = record.events
    assert event.extra == {"big": stored}
    assert type(event.extra["big"]) is type(stored)  # a plain str, int or float
    assert event.anomalies == (("extra.big:bignum",) if flagged else ())
    assert event.command == "SELECT"


def test_known_fields_with_huge_numbers_are_kept_exactly() -> None:
    huge = "123456789012345678901234567890"
    record = decode(
        raw_inner(
            f'{{"type":"record","sessionId":{huge},"pid":{huge},"logTime":{huge},'
            f'"paramList":[{huge}, "x"],"exitCode":18446744073709551616,"rowCount":5}}'
        )
    )
    (event,) = record.events
    assert event.session_id == huge  # a text column: the number's exact text
    assert event.exit_code == "18446744073709551616"
    assert event.param_list == [huge, "x"]
    assert event.pid is None  # not storable in their columns
    assert event.log_time is None
    assert event.extra == {"pid": huge, "logTime": huge}
    assert set(event.anomalies) == {
        "sessionId:bignum",
        "exitCode:bignum",
        "paramList:bignum",
        "pid:range",
        "extra.pid:bignum",
        "logTime:type",
        "extra.logTime:bignum",
    }
    assert event.row_count == 5


def test_huge_numbers_in_heartbeats_and_record_fields_are_kept_exactly() -> None:
    huge = "18446744073709551616"
    record = decode(
        b'{"type":"DatabaseActivityMonitoringRecord","clusterId":"c","instanceId":"i",'
        b'"seq":' + huge.encode() + b',"databaseActivityEventList":['
        b'{"type":"heartbeat","n":' + huge.encode() + b"}]}"
    )
    assert record.record_extra == {"seq": huge, "_anomalies": ["record.seq:bignum"]}
    assert record.heartbeats[0].fields == {"n": huge, "_anomalies": ["heartbeat.n:bignum"]}


def test_nan_and_infinity_are_still_not_json() -> None:
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ParseError):
            decode(raw_inner('{"type":"record","x":' + constant + "}"))


def test_a_huge_cluster_id_number_is_still_refused() -> None:
    with pytest.raises(NormalizeError, match="clusterId is a JSON number"):
        decode(
            b'{"type":"DatabaseActivityMonitoringRecord","clusterId":123456789012345678901234,'
            b'"databaseActivityEventList":[]}'
        )
