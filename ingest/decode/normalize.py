"""Decompressed DAS JSON -> typed events.

The inner document is ``{"type": "DatabaseActivityMonitoringRecord", "clusterId": ...,
"instanceId": ..., "databaseActivityEventList": [...]}``. Each list entry is a ``record`` (an
:class:`ActivityEvent`) or a ``heartbeat``.

Nothing is dropped and nothing is fatal at the field or event level: a field the table does not
know goes to ``extra``; a known field whose value has the wrong type keeps its original value in
``extra`` (its column is NULL) and is listed in ``anomalies``; text that PostgreSQL cannot store
(NUL, lone surrogates from invalid UTF-8) is escaped reversibly and listed in ``anomalies``; a
number beyond 64 bits (or beyond a double) is kept exactly, as its JSON text, and listed
(``bignum``); an event whose ``type`` is missing or unknown is kept as a row and listed
(``type:missing``, ``type:unknown`` with the value in ``extra``). Only a document that is not a
DAS event list at all is an error.

Numbers: orjson, the fast parser, turns an integer beyond 64 bits into a *rounded* float and
refuses a number beyond a double. Such a document is parsed again by the standard library's
parser, which hands us the exact JSON text of those numbers (:class:`NumberText`). Aurora does
not send them; a hostile or broken producer must not make us store a different number.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import orjson

from ingest.decode.model import (
    FIELDS_BY_WIRE,
    STRUCTURAL_FIELDS,
    ActivityEvent,
    DecodedRecord,
    Heartbeat,
    JsonValue,
    Kind,
)
from ingest.errors import NormalizeError, ParseError

INNER_TYPE = "DatabaseActivityMonitoringRecord"
_INNER_KNOWN = frozenset({"type", "clusterId", "instanceId", "databaseActivityEventList"})
_INT64 = (-(2**63), 2**63 - 1)
#: Integers orjson parses and writes exactly (it rounds anything else to a float).
_EXACT_INTS = (-(2**63), 2**64 - 1)
#: A float this large from orjson may be a rounded integer (exact ones stay ints below it).
_ROUNDED = float(2**63)


class NumberText(str):
    """The exact JSON text of a number no int64/uint64 or finite double below 2**63 holds,
    from :func:`parse_exact`. Normalizing stores it as text and flags it ``bignum``."""

    __slots__ = ()


class _RoundedNumber(Exception):
    """A float of integer size in an orjson document: parse the bytes again, exactly."""


def parse_payload(data: bytes) -> Any:
    """JSON-decode the decompressed payload (orjson), falling back to :func:`parse_exact` for
    what orjson refuses: invalid UTF-8, lone surrogates, numbers beyond a double."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    # Rare path. Bytes that are not UTF-8 and \ud800-style escapes become lone surrogates,
    # which sanitize() later escapes and flags; huge numbers become NumberText.
    return parse_exact(data)


def _exact_int(text: str) -> int | NumberText:
    if len(text) <= 20:  # no int() of thousands of digits (Python limits int(str) anyway)
        value = int(text)
        if _EXACT_INTS[0] <= value <= _EXACT_INTS[1]:
            return value
    return NumberText(text)


def _exact_float(text: str) -> float | NumberText:
    value = float(text)
    if math.isfinite(value) and abs(value) < _ROUNDED:
        return value
    return NumberText(text)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_exact(data: bytes) -> Any:
    """The standard library's parser: every number exactly (huge ones as NumberText), invalid
    UTF-8 as lone surrogates, NaN and Infinity refused as orjson refuses them."""
    try:
        return json.loads(
            data.decode("utf-8", "surrogateescape"),
            parse_int=_exact_int,
            parse_float=_exact_float,
            parse_constant=_no_constants,
        )
    except json.JSONDecodeError as exc:
        raise ParseError(f"payload is not JSON ({_position(exc)})") from None
    except ValueError:
        raise ParseError("payload is not JSON (NaN or Infinity)") from None
    except RecursionError:
        raise ParseError("payload JSON is nested too deeply") from None


def _position(exc: json.JSONDecodeError) -> str:
    return f"line {exc.lineno} column {exc.colno}"


def decode_payload(data: bytes, record_version: str) -> DecodedRecord:
    """Parse and normalize a decompressed payload; a number orjson may have rounded makes us
    parse the bytes again, exactly (rare: Aurora's numbers fit 64 bits)."""
    doc = parse_payload(data)
    try:
        return _normalize(doc, record_version)
    except _RoundedNumber:
        return _normalize(parse_exact(data), record_version)


def normalize(doc: Any, record_version: str) -> DecodedRecord:
    """Turn the parsed inner document into a :class:`DecodedRecord`. A float of 2**63 or more
    (or not finite) is kept as its JSON text, flagged ``bignum``, like a number beyond 64 bits
    from :func:`parse_exact` (given bytes, use :func:`decode_payload`: it re-parses them)."""
    try:
        return _normalize(doc, record_version)
    except _RoundedNumber:
        return _normalize(_big_floats_as_text(doc), record_version)


def _big_floats_as_text(value: Any) -> Any:
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) < _ROUNDED):
        return NumberText(orjson.dumps(value).decode() if math.isfinite(value) else repr(value))
    if isinstance(value, list):
        return [_big_floats_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _big_floats_as_text(v) for k, v in value.items()}
    return value


def _normalize(doc: Any, record_version: str) -> DecodedRecord:
    if not isinstance(doc, dict):
        raise NormalizeError(f"payload is a JSON {type(doc).__name__}, not an object")
    kind = doc.get("type")
    if kind != INNER_TYPE:
        shown = repr(kind[:40]) if isinstance(kind, str) else type(kind).__name__
        raise NormalizeError(f"payload type is {shown}, not {INNER_TYPE}")
    events_in = doc.get("databaseActivityEventList")
    if not isinstance(events_in, list):
        raise NormalizeError("databaseActivityEventList is missing or not an array")
    anomalies: list[str] = []
    cluster_id = _id_field(doc, "clusterId", anomalies)
    instance_id = _id_field(doc, "instanceId", anomalies)
    record_extra = sanitize_json(
        {k: v for k, v in doc.items() if k not in _INNER_KNOWN}, "record", anomalies
    )
    if anomalies:
        record_extra["_anomalies"] = anomalies

    events: list[ActivityEvent] = []
    heartbeats: list[Heartbeat] = []
    for index, item in enumerate(events_in):
        if not isinstance(item, dict):
            raise NormalizeError(f"event {index} is a JSON {type(item).__name__}, not an object")
        event_type = item.get("type")
        if event_type == "heartbeat":
            heartbeats.append(_heartbeat(index, item))
        elif event_type == "record":
            events.append(normalize_event(index, item))
        else:
            # Neither: kept as a row, flagged, so one odd event never costs its neighbours.
            events.append(
                normalize_event(index, item, "missing" if "type" not in item else "unknown")
            )
    return DecodedRecord(
        record_version=record_version,
        cluster_id=cluster_id,
        instance_id=instance_id,
        events=events,
        heartbeats=heartbeats,
        record_extra=record_extra,
    )


def _id_field(doc: dict[str, Any], name: str, anomalies: list[str]) -> str | None:
    value = doc.get(name)
    if type(value) is float and not abs(value) < _ROUNDED:
        raise _RoundedNumber  # name the number as it was written
    if isinstance(value, NumberText):
        raise NormalizeError(f"{name} is a JSON number, not a string")
    if value is None or isinstance(value, str):
        text, flag = sanitize_text(value) if value is not None else (None, None)
        if flag:
            anomalies.append(f"{name}:{flag}")
        return text
    raise NormalizeError(f"{name} is a JSON {type(value).__name__}, not a string")


#: wire name -> (ActivityEvent attribute, kind). The hot loop below runs once per field of
#: every event, so it looks up one tuple instead of a FieldSpec and its column name.
_ATTRS: dict[str, tuple[str, Kind]] = {
    wire: ("class_" if spec.column == "class" else spec.column, spec.kind)
    for wire, spec in FIELDS_BY_WIRE.items()
}
_TEXT, _INT, _TIME = Kind.TEXT, Kind.INT, Kind.TIME


def normalize_event(
    index: int, item: dict[str, Any], type_problem: str | None = None
) -> ActivityEvent:
    """``type_problem`` ("missing" or "unknown"): the event is not of type ``record``; it is
    normalized all the same, flagged, and an unknown type's value is kept in ``extra``."""
    values: dict[str, Any] = {}
    extra: dict[str, JsonValue] = {}
    anomalies: list[str] = []
    if type_problem is not None:
        anomalies.append(f"type:{type_problem}")
        if "type" in item:
            extra["type"] = item["type"]
    times_as_sent: dict[str, str] = {}
    low, high = _INT64
    for wire, raw in item.items():
        spec = _ATTRS.get(wire)
        if spec is None:
            if wire not in STRUCTURAL_FIELDS:
                extra[wire] = raw
            continue
        if raw is None:
            continue
        attr, kind = spec
        # Fast paths for what Aurora sends almost always: ASCII text without NUL, and
        # in-range ints. Anything else takes _convert, the one definition of the rules.
        raw_type = type(raw)
        if kind is _TEXT:
            if raw_type is str and raw.isascii() and "\x00" not in raw:
                values[attr] = raw
                continue
        elif kind is _INT and raw_type is int and low <= raw <= high:
            values[attr] = raw
            continue
        converted, problem = _convert(kind, raw)
        if problem is None:
            values[attr] = converted
            if kind is _TIME and _fraction_digits(raw) > _MICROSECOND_DIGITS:
                # SQL Server's seven fraction digits: the column holds microseconds, the
                # original keeps the rest (no anomaly: a documented shape).
                times_as_sent[wire] = raw
        elif problem == "type" and wire == "statementId" and type(raw) is str:
            # SQL Server's statementId is a hex sequence_group_id ("0x38eaf4…"): stored as sent.
            values["statement_id_text"], flag = sanitize_text(raw)
            if flag:
                anomalies.append(f"{wire}:{flag}")
        elif problem in ("nul", "utf8", "bignum"):
            values[attr] = converted
            anomalies.append(f"{wire}:{problem}")
        else:
            extra[wire] = raw
            anomalies.append(f"{wire}:{problem}")
    if extra:
        extra = sanitize_json(extra, "extra", anomalies)
    param_list = values.get("param_list")
    if param_list is not None:
        values["param_list"] = _sanitize_list(param_list, anomalies)
    native = values.get("engine_native_audit_fields")
    if native:
        values["engine_native_audit_fields"] = sanitize_json(
            native, "engineNativeAuditFields", anomalies
        )
    if times_as_sent:
        values["times_as_sent"] = times_as_sent
    return ActivityEvent(event_index=index, extra=extra, anomalies=tuple(anomalies), **values)


_MICROSECOND_DIGITS = 6


def _fraction_digits(text: str) -> int:
    """Digits after the decimal point of a DAS time ('...:59.9422268+00' -> 7)."""
    dot = text.find(".")
    if dot < 0:
        return 0
    end = dot + 1
    while end < len(text) and text[end].isdigit():
        end += 1
    return end - dot - 1


def _sanitize_list(items: list[Any], anomalies: list[str]) -> list[Any]:
    """``sanitize_json(items, "paramList", anomalies)``, without the recursion for the usual
    list of clean ASCII strings (always a new list, as sanitize_json returns)."""
    for item in items:
        if type(item) is not str or not item.isascii() or "\x00" in item:
            return sanitize_json(items, "paramList", anomalies)  # type: ignore[no-any-return]
    return list(items)


def _convert(kind: Kind, raw: Any) -> tuple[Any, str | None]:
    """Returns (value, problem). problem: None; 'nul'/'utf8' (escaped) or 'bignum' (a number's
    exact JSON text): stored and flagged; 'type', 'range' or 'time': rejected (to extra)."""
    if type(raw) is float and not abs(raw) < _ROUNDED:
        raise _RoundedNumber
    if kind is Kind.TEXT:
        if type(raw) is NumberText:
            return str(raw), "bignum"
        if isinstance(raw, str):
            return sanitize_text(raw)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            return None, "type"
        if isinstance(raw, int):
            return str(raw), None if _EXACT_INTS[0] <= raw <= _EXACT_INTS[1] else "bignum"
        return orjson.dumps(raw).decode(), None
    if kind is Kind.INT:
        if isinstance(raw, bool):
            return None, "type"
        if type(raw) is NumberText:
            return None, "range"  # beyond 64 bits; extra keeps its text (flagged bignum)
        if isinstance(raw, int):
            value = raw
        elif (isinstance(raw, str) and _is_int_text(raw)) or (
            isinstance(raw, float) and raw.is_integer()
        ):
            value = int(raw)
        else:
            return None, "type"
        if not _INT64[0] <= value <= _INT64[1]:
            return None, "range"
        return value, None
    if kind is Kind.TIME:
        if not isinstance(raw, str) or type(raw) is NumberText:
            return None, "type"
        stamp = parse_time(raw)
        return (stamp, None) if stamp is not None else (None, "time")
    if kind is Kind.OBJECT:
        return (raw, None) if isinstance(raw, dict) else (None, "type")
    # Kind.LIST
    if isinstance(raw, list):
        return raw, None
    return None, "type"


def _is_int_text(text: str) -> bool:
    body = text[1:] if text[:1] in ("-", "+") else text
    return 0 < len(body) <= 19 and body.isascii() and body.isdigit()


def parse_time(text: str) -> datetime | None:
    """DAS times: '2019-05-24 00:39:49.940668+00' (UTC). A time without offset is UTC."""
    if len(text) > 64:
        return None
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp


def _heartbeat(index: int, item: dict[str, Any]) -> Heartbeat:
    """A heartbeat's fields are kept whole (logTime too); what had to be done to store them is
    listed under ``_anomalies``, as for a record's own unknown fields."""
    anomalies: list[str] = []
    raw_time = item.get("logTime")
    log_time = None
    if isinstance(raw_time, str) and type(raw_time) is not NumberText:
        log_time = parse_time(raw_time)
        if log_time is None:
            anomalies.append("logTime:time")
    elif raw_time is not None:
        anomalies.append("logTime:type")
    fields = sanitize_json({k: v for k, v in item.items() if k != "type"}, "heartbeat", anomalies)
    if anomalies:
        fields["_anomalies"] = anomalies
    return Heartbeat(event_index=index, log_time=log_time, fields=fields)


# --- text PostgreSQL cannot store --------------------------------------------------------------
#
# PostgreSQL text and jsonb reject NUL, and UTF-8 cannot encode lone surrogates (which is how
# invalid input bytes and "\ud800" escapes reach us). Such strings are escaped reversibly:
# "\" -> "\\", NUL -> "\x00", surrogate U+DC80..U+DCFF (an undecodable byte) -> "\xNN", any
# other lone surrogate -> "\uNNNN". Only flagged values are escaped, so clean text is untouched.


def sanitize_text(text: str) -> tuple[str, str | None]:
    if text.isascii():
        if "\x00" not in text:
            return text, None
        return _escape(text), "nul"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _escape(text), "utf8"
    if "\x00" in text:
        return _escape(text), "nul"
    return text, None


def _escape(text: str) -> str:
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code == 0:
            out.append("\\x00")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_text(text: str) -> str:
    """Inverse of the escaping applied to flagged values (for re-processing and tests)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "\\":
                out.append("\\")
                i += 2
                continue
            if nxt == "x":
                byte = int(text[i + 2 : i + 4], 16)
                out.append("\x00" if byte == 0 else chr(0xDC00 + byte))
                i += 4
                continue
            if nxt == "u":
                out.append(chr(int(text[i + 2 : i + 6], 16)))
                i += 6
                continue
        out.append(ch)
        i += 1
    return "".join(out)


#: JSON nesting we store; Aurora's events are flat, so anything deep is hostile input.
MAX_DEPTH = 64


def sanitize_json(value: Any, where: str, anomalies: list[str], depth: int = 0) -> Any:
    """Escape unstorable strings (keys and values) anywhere inside a JSON value."""
    if depth > MAX_DEPTH:
        raise NormalizeError(f"{where.split('.', 1)[0]} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if type(value) is NumberText:
            anomalies.append(f"{where}:bignum")
            return str(value)
        text, flag = sanitize_text(value)
        if flag:
            anomalies.append(f"{where}:{flag}")
        return text
    if type(value) is float and not abs(value) < _ROUNDED:
        raise _RoundedNumber
    if type(value) is int and not _EXACT_INTS[0] <= value <= _EXACT_INTS[1]:
        anomalies.append(f"{where}:bignum")  # from a caller's own dict: JSON can't be rounded
        return str(value)
    if isinstance(value, list):
        return [sanitize_json(v, where, anomalies, depth + 1) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            clean_key, flag = sanitize_text(key)
            if flag:
                anomalies.append(f"{where}:{flag}")
            out[clean_key] = sanitize_json(item, f"{where}.{clean_key}", anomalies, depth + 1)
        return out
    return value
