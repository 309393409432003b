"""PostgreSQL COPY text format for decoded events (pure).

The process pool returns one COPY-ready ``bytes`` per batch instead of thousands of row tuples:
pickling tuples back to the parent costs about as much as producing them.

Each line is also the event's canonical encoding for the integrity chain (version 2, with the
engine columns of migration 0006; see ingest/copytext.py, ingest/integrity/canonical.py and
docs/integrity.md): times in canonical UTC text, JSON in canonical JSON. So the chain's digest of
an event is one SHA-256 of its line, and the tests hold this fast encoder equal to the
definition there.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from ingest.copytext import NULL, canonical_json, canonical_time, copy_array, copy_escape
from ingest.decode.fingerprint import Fingerprint, of_statement
from ingest.decode.model import ENGINE_COLUMNS, FIELDS, ActivityEvent, DecodedRecord, Kind

#: The columns :func:`event_line` writes, in order: the record's leading columns, the model's
#: FIELDS, extra, anomalies, ingested_at, the model's ENGINE_COLUMNS, then the statement's
#: fingerprint and its hash. It must be ingest.copytext.EVENT_COLUMNS, the order the sink
#: COPYs in and the chain encodes in (held equal by the tests).
LINE_COLUMNS: tuple[str, ...] = (
    "cluster_id",
    "instance_id",
    "record_version",
    "stream_name",
    "shard_id",
    "sequence_number",
    "event_index",
    *(f.column for f in FIELDS),
    "extra",
    "anomalies",
    "ingested_at",
    *ENGINE_COLUMNS,
    "fingerprint",
    "fingerprint_hash",
)

#: How a line without a fingerprint ends: the encoding (the chain digest's input) is the line
#: without it (trailing all-NULL column groups are not encoded, ingest/integrity/canonical.py).
NULL_FINGERPRINT = b"\t\\N\t\\N"

_FIELD_ATTRS = tuple(("class_" if f.column == "class" else f.column, f.kind) for f in FIELDS)
_GET_FIELDS = operator.attrgetter(*(attr for attr, _ in _FIELD_ATTRS))
_KINDS = tuple(kind for _, kind in _FIELD_ATTRS)
_TEXT, _INT, _TIME = Kind.TEXT, Kind.INT, Kind.TIME


def text(value: str | None) -> str:
    return NULL if value is None else copy_escape(value)


def jsonb(value: Any) -> str:
    return NULL if value is None else copy_escape(canonical_json(value))


def event_line(
    event: ActivityEvent,
    record: DecodedRecord,
    stream_name: str,
    shard_id: str,
    sequence_number: str,
    prefix: str | None = None,
    ingested_at: str = NULL,
    fingerprint: Fingerprint | None = None,
) -> str:
    """One COPY line for ``event``. ``prefix`` caches the record-level leading columns;
    ``ingested_at`` is the decode time's canonical text (NULL would violate its NOT NULL);
    ``fingerprint`` is its statement's (computed before any redaction of the text)."""
    if prefix is None:
        prefix = record_prefix(record, stream_name, shard_id, sequence_number)
    cols = [prefix, str(event.event_index)]
    append = cols.append
    # One C call fetches every field; the loop then only formats. Clean text (nothing COPY
    # must escape) is the common case and is appended as is; copy_escape() handles the rest.
    for value, kind in zip(_GET_FIELDS(event), _KINDS, strict=True):
        if value is None:
            append(NULL)
        elif kind is _TEXT:
            if "\\" in value or not value.isprintable():
                value = copy_escape(value)
            append(value)
        elif kind is _INT:
            append(str(value))
        elif kind is _TIME:
            append(canonical_time(value))
        else:
            append(jsonb(value))
    extra = event.extra
    if record.record_extra:
        extra = {**extra, "_record": record.record_extra}
    append("{}" if type(extra) is dict and not extra else jsonb(extra))
    anomalies = event.anomalies
    append(copy_array(anomalies) if anomalies else "{}")
    append(ingested_at)
    # The engine columns (migration 0006). engine_native_audit_fields is never NULL: all four
    # NULL is how verify tells an event stored before them (docs/integrity.md).
    append(text(event.dbid))
    native = event.engine_native_audit_fields
    append(jsonb(native) if native else "{}")
    append(text(event.statement_id_text))
    append(jsonb(event.times_as_sent))
    # The fingerprint (migration 0015): the last group, so a line ending in NULL_FINGERPRINT
    # is encoded without it (docs/integrity.md).
    if fingerprint is None:
        append(NULL)
        append(NULL)
    else:
        append(text(fingerprint[0]))
        append(str(fingerprint[1]))
    return "\t".join(cols)


def record_prefix(
    record: DecodedRecord, stream_name: str, shard_id: str, sequence_number: str
) -> str:
    return "\t".join(
        (
            text(record.cluster_id),
            text(record.instance_id),
            copy_escape(record.record_version),
            copy_escape(stream_name),
            copy_escape(shard_id),
            sequence_number,
        )
    )


def encode_events(
    records: Iterable[tuple[DecodedRecord, str, str]],
    ingested_at: datetime,
    stream_name: str,
    fingerprints: Sequence[Fingerprint | None] | None = None,
) -> tuple[bytes, int]:
    """COPY payload for (record, shard_id, sequence_number) triples of the stream
    ``stream_name``; returns (data, row count). ``fingerprints`` (one per event of all the
    records, in order) are the statements' fingerprints when the caller has them already
    (taken before redaction); else they are computed from each event's text."""
    lines: list[str] = []
    stamp = canonical_time(ingested_at)
    n = 0
    for record, shard_id, sequence_number in records:
        if not record.events:
            continue
        prefix = record_prefix(record, stream_name, shard_id, sequence_number)
        for event in record.events:
            found = of_statement(event.command_text) if fingerprints is None else fingerprints[n]
            n += 1
            lines.append(
                event_line(
                    event, record, stream_name, shard_id, sequence_number, prefix, stamp, found
                )
            )
    if not lines:
        return b"", 0
    lines.append("")
    return "\n".join(lines).encode(), len(lines) - 1
