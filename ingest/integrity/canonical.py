"""The canonical encoding of stored events and chain links (pure), see docs/integrity.md.

The same functions run twice: in the decode pool, on the values about to be stored (so a
batch's digests cost the warehouse nothing), and in ``verify``, on the values read back from
the warehouse. Both sides encode *values*, never a database's text output, so the encoding is
defined here and in the documentation alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson

#: Columns of das.activity_events in table order: the order of the fields of an event.
EVENT_COLUMNS: tuple[str, ...] = (
    "log_time", "cluster_id", "instance_id", "record_version", "shard_id", "sequence_number",
    "event_index", "class", "client_application", "command", "command_text", "database_name",
    "db_protocol", "db_user_name", "end_time", "error_message", "exit_code", "net_protocol",
    "object_name", "object_type", "param_list", "pid", "remote_host", "remote_port",
    "row_count", "server_host", "server_type", "server_version", "service_name", "session_id",
    "start_time", "statement_id", "substatement_id", "transaction_id", "extra", "anomalies",
    "ingested_at",
)  # fmt: skip
TIME_COLUMNS = frozenset({"log_time", "end_time", "start_time", "ingested_at"})
JSON_COLUMNS = frozenset({"param_list", "extra", "anomalies"})

ZERO_HASH = bytes(32)
DIGEST_SIZE = 32


def canonical_time(stamp: datetime) -> str:
    """UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``: always four year digits and six fraction digits."""
    t = stamp.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond:06d}Z"
    )


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


def canonical_value(column: str, value: Any) -> str | None:
    """The canonical text of one column's value (None for SQL NULL)."""
    if value is None:
        return None
    if column in TIME_COLUMNS:
        return canonical_time(value)
    if column in JSON_COLUMNS:
        return canonical_json(value)
    if isinstance(value, Decimal):  # sequence_number
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return str(value)


def field(value: str | None) -> str:
    if value is None:
        return "-"
    size = len(value) if value.isascii() else len(value.encode())
    return f"+{size}:{value}"


def event_digest(values: Sequence[Any]) -> bytes:
    """SHA-256 of the canonical encoding of an event given its 37 column values in order."""
    encoded = "".join(
        field(canonical_value(column, value))
        for column, value in zip(EVENT_COLUMNS, values, strict=True)
    )
    return hashlib.sha256(encoded.encode()).digest()


def event_day(log_time: datetime | None) -> str:
    """The UTC day of an event (the unit retention removes), or "none"."""
    if log_time is None:
        return "none"
    day: date = log_time.astimezone(UTC).date()
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}"


class DayDigests:
    """Event digests grouped by UTC day, in the order they are added (sequence order)."""

    def __init__(self) -> None:
        self.by_day: dict[str, bytearray] = {}

    def add(self, day: str, digest: bytes) -> None:
        self.by_day.setdefault(day, bytearray()).extend(digest)

    def extend(self, chains: Iterable[Mapping[str, bytes]]) -> None:
        for chain in chains:
            for day, digests in chain.items():
                self.by_day.setdefault(day, bytearray()).extend(digests)

    def packed(self) -> dict[str, bytes]:
        """What crosses the process pool: day -> concatenated 32-byte digests."""
        return {day: bytes(digests) for day, digests in self.by_day.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        """The link's ``days``: count and SHA-256 of the concatenated digests, per day."""
        return {
            day: {"n": len(digests) // DIGEST_SIZE, "sha256": hashlib.sha256(digests).hexdigest()}
            for day, digests in sorted(self.by_day.items())
        }

    @property
    def count(self) -> int:
        return sum(len(d) // DIGEST_SIZE for d in self.by_day.values())


def link_hash(
    prev: bytes,
    stream: str,
    shard: str,
    link_no: int,
    kind: str,
    first_sequence: str,
    last_sequence: str,
    event_count: int,
    days: Mapping[str, Mapping[str, Any]],
) -> bytes:
    """SHA-256(prev_hash || UTF-8 link text); ``days`` enters as canonical JSON."""
    text = "\n".join(
        ("das-chain-v1", stream, shard, str(link_no), kind, first_sequence, last_sequence,
         str(event_count), canonical_json(days))
    )  # fmt: skip
    return hashlib.sha256(prev + text.encode()).digest()


def anchor_message(
    stream: str, shard: str, link_no: int, link_hash_value: bytes, anchored_at: datetime
) -> bytes:
    return "\n".join(
        ("das-anchor-v1", stream, shard, str(link_no), link_hash_value.hex(),
         canonical_time(anchored_at))
    ).encode()  # fmt: skip


class RecordFields:
    """The fields of a record's events that do not change from event to event, encoded once:
    the fast path of :func:`stored_event_digest`."""

    __slots__ = ("extra", "prefix", "suffix")

    def __init__(
        self, record: Any, shard_id: str, sequence_number: str, ingested_at: datetime
    ) -> None:
        self.prefix = (
            field(record.cluster_id) + field(record.instance_id) + field(record.record_version)
            + field(shard_id) + field(sequence_number)
        )  # fmt: skip
        self.suffix = field(canonical_time(ingested_at))
        self.extra = record.record_extra


_EVENT_ATTRS = (
    "class_", "client_application", "command", "command_text", "database_name", "db_protocol",
    "db_user_name", "end_time", "error_message", "exit_code", "net_protocol", "object_name",
    "object_type", "param_list", "pid", "remote_host", "remote_port", "row_count",
    "server_host", "server_type", "server_version", "service_name", "session_id",
    "start_time", "statement_id", "substatement_id", "transaction_id",
)  # fmt: skip
_TIME_ATTRS = frozenset({"end_time", "start_time"})
_INT_ATTRS = frozenset({"pid", "row_count", "statement_id", "substatement_id"})


def stored_event_digest(event: Any, fields: RecordFields) -> bytes:
    """:func:`event_digest` of what COPY stores for ``event`` (the same encoding, computed
    without building the value list; the tests hold the two equal)."""
    log_time = event.log_time
    parts = [
        field(None if log_time is None else canonical_time(log_time)),
        fields.prefix,
        field(str(event.event_index)),
    ]
    append = parts.append
    for attr in _EVENT_ATTRS:
        value = getattr(event, attr)
        if value is None:
            append("-")
        elif attr in _TIME_ATTRS:
            append(field(canonical_time(value)))
        elif attr in _INT_ATTRS:
            append(field(str(value)))
        elif attr == "param_list":
            append(field(canonical_json(value)))
        else:
            append(field(value))
    extra = event.extra
    if fields.extra:
        extra = {**extra, "_record": fields.extra}
    append(field(canonical_json(extra)))
    anomalies = event.anomalies
    append(field(canonical_json(list(anomalies)) if anomalies else "[]"))
    append(fields.suffix)
    return hashlib.sha256("".join(parts).encode()).digest()


def stored_event_values(
    event: Any, record: Any, shard_id: str, sequence_number: str, ingested_at: datetime
) -> list[Any]:
    """The 37 column values, in table order, that COPY stores for a decoded ``event`` of
    ``record`` (an ``ingest.decode`` ActivityEvent and DecodedRecord)."""
    extra = event.extra
    if record.record_extra:
        extra = {**extra, "_record": record.record_extra}
    return [
        event.log_time, record.cluster_id, record.instance_id, record.record_version, shard_id,
        sequence_number, event.event_index, event.class_, event.client_application,
        event.command, event.command_text, event.database_name, event.db_protocol,
        event.db_user_name, event.end_time, event.error_message, event.exit_code,
        event.net_protocol, event.object_name, event.object_type, event.param_list, event.pid,
        event.remote_host, event.remote_port, event.row_count, event.server_host,
        event.server_type, event.server_version, event.service_name, event.session_id,
        event.start_time, event.statement_id, event.substatement_id, event.transaction_id,
        extra, list(event.anomalies), ingested_at,
    ]  # fmt: skip
