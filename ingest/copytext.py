"""PostgreSQL COPY text format as das-ingest writes it (a pure leaf module).

The column order of das.activity_events and how one value is written in a line: NULL, escaping,
text[] arrays, times in canonical UTC text and JSON as canonical JSON. The decode pool writes its
COPY buffers with these, and an event's COPY line is also its canonical encoding for the
integrity chain (version 2, docs/integrity.md): so the verifier encodes stored values with the
very same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

#: The columns of das.activity_events before migration 0006, in the order of an event's
#: encoding (chain version 2): the order das-ingest COPYs them in. ingested_at is set by the
#: decoder (the time it decoded the batch), so the integrity chain can cover it too.
EVENT_COLUMNS_V2: tuple[str, ...] = (
    "cluster_id", "instance_id", "record_version", "stream_name", "shard_id", "sequence_number",
    "event_index", "class", "client_application", "command", "command_text", "database_name",
    "db_protocol", "db_user_name", "end_time", "error_message", "exit_code", "log_time",
    "net_protocol", "object_name", "object_type", "param_list", "pid", "remote_host",
    "remote_port", "row_count", "server_host", "server_type", "server_version", "service_name",
    "session_id", "start_time", "statement_id", "substatement_id", "transaction_id", "extra",
    "anomalies", "ingested_at",
)  # fmt: skip
#: The engine columns migration 0006 added (RDS for Oracle and RDS for SQL Server), after
#: ingested_at. das-ingest never stores an event with all four NULL from then on
#: (engine_native_audit_fields is at least {}), so NULL in all four marks an event stored
#: before: its encoding is its first 38 fields, as it was when its link was written.
ENGINE_COLUMNS: tuple[str, ...] = (
    "dbid", "engine_native_audit_fields", "statement_id_text", "times_as_sent",
)  # fmt: skip
#: The query fingerprint of a statement event and its hash (migration 0015,
#: ingest/decode/fingerprint.py), after the engine columns; NULL for an event without a
#: statement.
FINGERPRINT_COLUMNS: tuple[str, ...] = ("fingerprint", "fingerprint_hash")
#: Groups of columns appended after the version 2 columns, one per migration, in order. An
#: event's encoding is its COPY line without the trailing groups whose values are all NULL
#: (ingest.integrity.canonical.encoded_width): an event stored before a group existed keeps the
#: encoding its link was computed from, and a value put into a group later shows as altered.
#: Adding a column is one more group here, one migration, and nothing for the stored events.
COLUMN_GROUPS: tuple[tuple[str, ...], ...] = (ENGINE_COLUMNS, FINGERPRINT_COLUMNS)
#: Every column of das.activity_events in COPY order, which is also the order of an event's
#: canonical encoding (chain version 2). The COPY encoder (ingest.decode.copyfmt) writes its
#: lines in this order; the tests hold the two equal.
EVENT_COLUMNS: tuple[str, ...] = EVENT_COLUMNS_V2 + tuple(c for g in COLUMN_GROUPS for c in g)

#: COPY text format's NULL.
NULL = "\\N"


def canonical_time(stamp: datetime) -> str:
    """UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``: always four year digits and six fraction digits."""
    t = stamp if stamp.tzinfo is UTC else stamp.astimezone(UTC)
    # isoformat pads the year to four digits, writes six fraction digits with this timespec,
    # and ends a UTC time in "+00:00".
    return t.isoformat(timespec="microseconds")[:-6] + "Z"


def canonical_number(value: int | float | Decimal) -> str:
    """Plain decimal notation, no exponent; integers without a fraction; no negative zero.

    Integers and floats that are equal print alike only if their decimal texts are: 100 is
    "100" but 100.0 is "100.0", as their JSON texts differ.
    """
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers here")
    if isinstance(value, int):
        return str(value)
    number = Decimal(repr(value)) if isinstance(value, float) else value
    if number.is_zero():
        number = abs(number)
    return format(number, "f")


def _floatless(value: Any) -> bool:
    """True if ``value`` holds no float (and no Decimal) anywhere: then orjson with sorted keys
    writes exactly the canonical JSON (UTF-8 byte order is code point order)."""
    if isinstance(value, float | Decimal):
        return False
    if isinstance(value, dict):
        return all(_floatless(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_floatless(v) for v in value)
    return True


def canonical_json(value: Any) -> str:
    """JSON with object keys sorted by their UTF-8 bytes, no whitespace, strings escaped as
    JSON requires and nothing more (\\" \\\\ \\b \\f \\n \\r \\t, \\u00XX for other control
    characters, everything else as UTF-8), numbers by :func:`canonical_number`."""
    if not value and isinstance(value, dict):
        return "{}"
    if isinstance(value, dict | list) and _floatless(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONEncodeError:  # an integer beyond 64 bits: the general path
            pass
    return _canonical_json(value)


def _canonical_json(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, int | float | Decimal):
        return canonical_number(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical_json(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode())
        return "{" + ",".join(f"{_canonical_json(k)}:{_canonical_json(v)}" for k, v in items) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def copy_escape(text: str) -> str:
    """Escape text for PostgreSQL's COPY text format: backslash, tab, newline, carriage return."""
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\t", "\\t")
        return text.replace("\n", "\\n").replace("\r", "\\r")
    return text


def copy_array(values: Sequence[str]) -> str:
    """A text[] in COPY text: ``{}``, or every element double-quoted with ``\\`` and ``"``
    backslash-escaped, comma-separated in braces, then COPY-escaped."""
    if not values:
        return "{}"
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return copy_escape("{" + ",".join(quoted) + "}")
