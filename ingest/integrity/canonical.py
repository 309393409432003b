"""The canonical encodings of docs/integrity.md, in Python (pure).

The warehouse computes links with SQL functions (migrations/0003_integrity.sql); the verifier
recomputes everything here from plain column values, so it trusts neither those functions nor
anything else an administrator could have changed in the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

#: Columns of das.activity_events in table order, as the verifier selects them: each as its
#: canonical text (see EVENT_SELECT).
EVENT_COLUMNS: tuple[str, ...] = (
    "log_time",
    "cluster_id",
    "instance_id",
    "record_version",
    "shard_id",
    "sequence_number",
    "event_index",
    "class",
    "client_application",
    "command",
    "command_text",
    "database_name",
    "db_protocol",
    "db_user_name",
    "end_time",
    "error_message",
    "exit_code",
    "net_protocol",
    "object_name",
    "object_type",
    "param_list",
    "pid",
    "remote_host",
    "remote_port",
    "row_count",
    "server_host",
    "server_type",
    "server_version",
    "service_name",
    "session_id",
    "start_time",
    "statement_id",
    "substatement_id",
    "transaction_id",
    "extra",
    "anomalies",
    "ingested_at",
)
_TIMES = frozenset({"log_time", "end_time", "start_time", "ingested_at"})
_NUMBERS = frozenset(
    {"sequence_number", "event_index", "pid", "row_count", "statement_id", "substatement_id"}
)
_TIME_FORMAT = '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\''


def _select_expr(column: str) -> str:
    if column in _TIMES:
        return f"to_char({column} AT TIME ZONE 'UTC', {_TIME_FORMAT})"
    if column in _NUMBERS or column in ("extra", "param_list"):
        return f"{column}::text"
    if column == "anomalies":
        return "to_jsonb(anomalies)::text"
    return column


#: The SELECT list giving each column's canonical text (PostgreSQL's built-in output functions
#: for numbers and jsonb; the documented format for times).
EVENT_SELECT = ", ".join(f"{_select_expr(c)} AS {c}" for c in EVENT_COLUMNS)

ZERO_HASH = bytes(32)


def field(value: str | None) -> str:
    if value is None:
        return "-"
    return f"+{len(value.encode())}:{value}"


def canonical_event(values: Sequence[str | None]) -> str:
    """The canonical encoding of one event from its columns' canonical texts, in table order."""
    return "".join(field(v) for v in values)


def event_digest(values: Sequence[str | None]) -> bytes:
    return hashlib.sha256(canonical_event(values).encode()).digest()


def day_digest(event_digests: Iterable[bytes]) -> bytes:
    """sha256 of the concatenated event digests, in (sequence_number, event_index) order."""
    h = hashlib.sha256()
    for digest in event_digests:
        h.update(digest)
    return h.digest()


def link_hash(
    prev: bytes,
    stream: str,
    shard: str,
    link_no: int,
    kind: str,
    first_sequence: str,
    last_sequence: str,
    event_count: int,
    days_text: str,
) -> bytes:
    """sha256(prev_hash || link text); ``days_text`` is the stored jsonb's text output."""
    text = "\n".join(
        (
            "das-chain-v1",
            stream,
            shard,
            str(link_no),
            kind,
            first_sequence,
            last_sequence,
            str(event_count),
            days_text,
        )
    )
    return hashlib.sha256(prev + text.encode()).digest()


def canonical_time(stamp: datetime) -> str:
    return stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def anchor_message(
    stream: str, shard: str, link_no: int, link_hash_value: bytes, anchored_at: datetime
) -> bytes:
    return "\n".join(
        (
            "das-anchor-v1",
            stream,
            shard,
            str(link_no),
            link_hash_value.hex(),
            canonical_time(anchored_at),
        )
    ).encode()
