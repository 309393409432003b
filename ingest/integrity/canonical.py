"""The canonical encoding of stored events and chain links (pure), see docs/integrity.md.

The same functions run twice: in the decode pool, on the values about to be stored (so a
batch's digests cost the warehouse nothing), and in ``verify``, on the values read back from
the warehouse. Both sides encode *values*, never a database's text output, so the encoding is
defined here (with the COPY text primitives of ``ingest.copytext`` and the day digests of
``ingest.digests``, re-exported below) and in the documentation alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ingest.copytext import COLUMN_GROUPS as COLUMN_GROUPS
from ingest.copytext import ENGINE_COLUMNS as ENGINE_COLUMNS
from ingest.copytext import EVENT_COLUMNS as EVENT_COLUMNS
from ingest.copytext import EVENT_COLUMNS_V2 as EVENT_COLUMNS_V2
from ingest.copytext import NULL as NULL
from ingest.copytext import canonical_json as canonical_json
from ingest.copytext import canonical_number as canonical_number
from ingest.copytext import canonical_time as canonical_time
from ingest.copytext import copy_array as copy_array
from ingest.copytext import copy_escape as copy_escape
from ingest.digests import DIGEST_SIZE as DIGEST_SIZE
from ingest.digests import DayDigests as DayDigests
from ingest.digests import event_day as event_day
from ingest.digests import utc_date as utc_date

#: The columns of chain version 1 (links written before migration 0004), in its order.
EVENT_COLUMNS_V1: tuple[str, ...] = (
    "log_time", "cluster_id", "instance_id", "record_version", "shard_id", "sequence_number",
    "event_index", "class", "client_application", "command", "command_text", "database_name",
    "db_protocol", "db_user_name", "end_time", "error_message", "exit_code", "net_protocol",
    "object_name", "object_type", "param_list", "pid", "remote_host", "remote_port",
    "row_count", "server_host", "server_type", "server_version", "service_name", "session_id",
    "start_time", "statement_id", "substatement_id", "transaction_id", "extra", "anomalies",
    "ingested_at",
)  # fmt: skip
#: Where each version 1 column sits in EVENT_COLUMNS.
V1_POSITIONS = tuple(EVENT_COLUMNS.index(c) for c in EVENT_COLUMNS_V1)
#: The version of the links and anchors das-ingest writes.
CHAIN_VERSION = 2
TIME_COLUMNS = frozenset({"log_time", "end_time", "start_time", "ingested_at"})
JSON_COLUMNS = frozenset(
    {"param_list", "extra", "anomalies", "engine_native_audit_fields", "times_as_sent"}
)
_V2_WIDTH = len(EVENT_COLUMNS_V2)
#: (first, end) positions of each column group in EVENT_COLUMNS.
_GROUP_BOUNDS = tuple(
    (EVENT_COLUMNS.index(g[0]), EVENT_COLUMNS.index(g[0]) + len(g)) for g in COLUMN_GROUPS
)
ZERO_HASH = bytes(32)


def copy_field(column: str, value: Any) -> str:
    """The COPY text of one column's value: the version 2 encoding's field."""
    if value is None:
        return NULL
    return field_encoder(column)(value)


def field_encoder(column: str) -> Callable[[Any], str]:
    """The function giving the COPY text of a column's (non-NULL) value."""
    if column in TIME_COLUMNS:
        return canonical_time
    if column == "sequence_number":
        return _sequence_field
    if column == "anomalies":
        return copy_array
    if column in JSON_COLUMNS:
        return _json_field
    return _plain_field


def _sequence_field(value: Any) -> str:
    return value if isinstance(value, str) else str(int(value))


def _json_field(value: Any) -> str:
    return copy_escape(canonical_json(value))


def _plain_field(value: Any) -> str:
    return str(value) if isinstance(value, int) else copy_escape(value)


#: The column encoders in EVENT_COLUMNS order, chosen once (verify encodes every stored event).
_ENCODERS = tuple(field_encoder(c) for c in EVENT_COLUMNS)


def has_engine_values(values: Sequence[Any]) -> bool:
    """Whether any engine column (:data:`ENGINE_COLUMNS`) of an event's values is set."""
    return any(v is not None for v in values[_V2_WIDTH : _V2_WIDTH + len(ENGINE_COLUMNS)])


def encoded_width(values: Sequence[Any]) -> int:
    """How many of an event's values (in :data:`EVENT_COLUMNS` order; or only its first 38)
    its encoding has: all of them but the trailing :data:`COLUMN_GROUPS` that are all NULL."""
    width = min(len(values), len(EVENT_COLUMNS))
    for start, _end in reversed(_GROUP_BOUNDS):
        if start >= width:
            continue
        if any(v is not None for v in values[start:width]):
            return width
        width = start
    return width


def event_line(values: Sequence[Any]) -> str:
    """An event's version 2 encoding (as text): its COPY text line, the :func:`copy_field` of
    its values in :data:`EVENT_COLUMNS` order joined by tabs, no newline, without the trailing
    column groups that are all NULL (:data:`COLUMN_GROUPS`): an event stored before migration
    0006 (or given as its 38 values of :data:`EVENT_COLUMNS_V2`) is its first 38 fields."""
    width = encoded_width(values)
    return "\t".join(
        NULL if v is None else f(v) for f, v in zip(_ENCODERS[:width], values[:width], strict=True)
    )


def canonical_value(column: str, value: Any) -> Any:
    """The JSON value a column's value enters the version 1 encoding as (None for NULL)."""
    if value is None:
        return None
    if column in TIME_COLUMNS:
        return canonical_time(value)
    if column == "sequence_number":
        return value if isinstance(value, str) else str(int(value))
    if column == "anomalies":
        return list(value)
    return value


def event_encoding(values: Sequence[Any], version: int = 2) -> bytes:
    """The canonical encoding of an event given its values in :data:`EVENT_COLUMNS` order (or
    its 38 :data:`EVENT_COLUMNS_V2` values): version 2, its COPY text line
    (:func:`event_line`) as UTF-8; version 1, the canonical JSON array of the
    :func:`canonical_value` of its :data:`EVENT_COLUMNS_V1` (no stream_name). An event with an
    value in a later column group is its full line under either version: no link written before
    migration 0006 covered one, so such a value under an older link shows as altered."""
    if version >= 2 or encoded_width(values) > _V2_WIDTH:
        return event_line(values).encode()
    row = [
        canonical_value(c, values[i]) for c, i in zip(EVENT_COLUMNS_V1, V1_POSITIONS, strict=True)
    ]
    return canonical_json(row).encode()


def event_digest(values: Sequence[Any], version: int = 2) -> bytes:
    """SHA-256 of the canonical encoding of an event given its values in EVENT_COLUMNS order."""
    return hashlib.sha256(event_encoding(values, version)).digest()


@dataclass(frozen=True)
class LinkFields:
    """What a link's hash covers (docs/integrity.md, "Links")."""

    stream: str
    shard: str
    link_no: int
    kind: str
    first_sequence: str
    last_sequence: str
    event_count: int
    days: Mapping[str, Mapping[str, Any]]
    #: version 2 only: when the link was written
    created_at: datetime | None = None
    #: version 2 only: :func:`dead_letter_entries` of the records dead-lettered (batch) or
    #: re-driven (redrive)
    dead_letters: Sequence[Mapping[str, str]] = ()
    #: per drop rule, how many events of the covered records it kept out of storage
    dropped: Mapping[str, int] = field(default_factory=dict)
    version: int = CHAIN_VERSION

    def text(self) -> str:
        """The link text: its fields, one per line."""
        lines = [
            f"das-chain-v{self.version}", self.stream, self.shard, str(self.link_no), self.kind,
            self.first_sequence, self.last_sequence, str(self.event_count),
        ]  # fmt: skip
        if self.version == 1:
            lines.append(canonical_json(self.days))
        elif self.version == 2:
            if self.created_at is None:
                raise ValueError("a version 2 link has a created_at")
            lines.extend(
                (canonical_time(self.created_at), canonical_json(self.days),
                 canonical_json(list(self.dead_letters)))
            )  # fmt: skip
            # Events drop rules kept out of storage (policies, migration 0015): one more line,
            # only when there were any, so links without drops keep their text.
            if self.dropped:
                lines.append(canonical_json(dict(self.dropped)))
        else:
            raise ValueError(f"unknown chain version {self.version}")
        return "\n".join(lines)


def link_hash(prev: bytes, link: LinkFields) -> bytes:
    """SHA-256(prev_hash || UTF-8 link text)."""
    return hashlib.sha256(prev + link.text().encode()).digest()


def dead_letter_entries(letters: Iterable[tuple[str, bytes]]) -> list[dict[str, str]]:
    """A link's ``dead_letters``: for each (sequence number, raw record bytes), the sequence
    number and the SHA-256 of the raw bytes, in ascending sequence order, one per record."""
    found = {seq: hashlib.sha256(raw).hexdigest() for seq, raw in letters}
    return [{"sequence_number": seq, "sha256": found[seq]} for seq in sorted(found, key=int)]


def anchor_message(
    stream: str,
    shard: str,
    link_no: int,
    link_hash_value: bytes,
    anchored_at: datetime,
    *,
    key_id: str = "",
    algorithm: str = "",
    version: int = CHAIN_VERSION,
) -> bytes:
    """What an anchor's MAC or signature authenticates; version 2 also names the key (as the
    ARN KMS gives for it) and the algorithm."""
    lines = [
        f"das-anchor-v{version}", stream, shard, str(link_no), link_hash_value.hex(),
        canonical_time(anchored_at),
    ]  # fmt: skip
    if version == 2:
        lines.extend((key_id, algorithm))
    elif version != 1:
        raise ValueError(f"unknown anchor version {version}")
    return "\n".join(lines).encode()


def stored_event_values(
    event: Any,
    record: Any,
    stream_name: str,
    shard_id: str,
    sequence_number: str,
    ingested_at: datetime,
    fingerprint: tuple[str, int] | None = None,
) -> list[Any]:
    """The column values, in :data:`EVENT_COLUMNS` order, that COPY stores for a decoded
    ``event`` of ``record`` (an ``ingest.decode`` ActivityEvent and DecodedRecord), with its
    statement's fingerprint (ingest.decode.fingerprint) when it has one."""
    extra = event.extra
    if record.record_extra:
        extra = {**extra, "_record": record.record_extra}
    return [
        record.cluster_id, record.instance_id, record.record_version, stream_name, shard_id,
        sequence_number, event.event_index, event.class_, event.client_application,
        event.command, event.command_text, event.database_name, event.db_protocol,
        event.db_user_name, event.end_time, event.error_message, event.exit_code,
        event.log_time, event.net_protocol, event.object_name, event.object_type,
        event.param_list, event.pid, event.remote_host, event.remote_port, event.row_count,
        event.server_host, event.server_type, event.server_version, event.service_name,
        event.session_id, event.start_time, event.statement_id, event.substatement_id,
        event.transaction_id, extra, list(event.anomalies), ingested_at,
        event.dbid, event.engine_native_audit_fields or {}, event.statement_id_text,
        event.times_as_sent, *(fingerprint if fingerprint is not None else (None, None)),
    ]  # fmt: skip
