"""Aurora MySQL MAIN/AUX correlation (pure).

One MySQL statement produces a MAIN event (substatementId 1) and zero or more AUX events
(substatementId 2) sharing a statementId. They arrive in any order, possibly in different
records and batches. statementId restarts when the instance restarts and session ids repeat, so
the key is (cluster, instance, pid, session, statementId).

A batch folds its events into one :class:`StatementPart` per key; the warehouse merges parts
into ``das.statements`` with an upsert, so the result is the same whatever the arrival order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ingest.decode import copyfmt
from ingest.decode.model import ActivityEvent, DecodedRecord

StatementKey = tuple[str | None, str | None, int | None, str | None, int]

#: Columns of the staging table the parts are COPY'd into (see migrations).
PART_COLUMNS: tuple[str, ...] = (
    "cluster_id",
    "instance_id",
    "pid",
    "session_id",
    "statement_id",
    "has_main",
    "log_time",
    "start_time",
    "end_time",
    "db_user_name",
    "database_name",
    "remote_host",
    "command",
    "command_text",
    "object_type",
    "object_name",
    "row_count",
    "exit_code",
    "error_message",
    "transaction_id",
    "main_shard_id",
    "main_sequence_number",
    "main_event_index",
    "aux",
)


def is_statement_event(event: ActivityEvent) -> bool:
    return event.class_ in ("MAIN", "AUX") and event.statement_id is not None


@dataclass(slots=True)
class StatementPart:
    main: tuple[ActivityEvent, str, str] | None = None
    aux: list[dict[str, Any]] = field(default_factory=list)


class StatementFolder:
    """Accumulates the MAIN/AUX events of a batch, keyed by statement."""

    def __init__(self) -> None:
        self.parts: dict[StatementKey, StatementPart] = {}

    def add(self, record: DecodedRecord, shard_id: str, sequence_number: str) -> None:
        for event in record.events:
            if not is_statement_event(event):
                continue
            assert event.statement_id is not None
            key = (
                record.cluster_id,
                record.instance_id,
                event.pid,
                event.session_id,
                event.statement_id,
            )
            part = self.parts.get(key)
            if part is None:
                part = self.parts[key] = StatementPart()
            if event.class_ == "MAIN":
                # A repeated MAIN for one key (instance restart reusing pid, session and
                # statementId) keeps the earliest; the events table keeps both.
                if part.main is None or _earlier(event, part.main[0]):
                    part.main = (event, shard_id, sequence_number)
            else:
                part.aux.append(aux_entry(event, shard_id, sequence_number))

    def extend(self, records: Iterable[tuple[DecodedRecord, str, str]]) -> None:
        for record, shard_id, sequence_number in records:
            self.add(record, shard_id, sequence_number)

    def encode(self) -> tuple[bytes, int]:
        """COPY payload for the staging table; returns (data, part count)."""
        lines = [part_line(key, part) for key, part in self.parts.items()]
        if not lines:
            return b"", 0
        lines.append("")
        return "\n".join(lines).encode(), len(lines) - 1


def _earlier(a: ActivityEvent, b: ActivityEvent) -> bool:
    if a.log_time is None or b.log_time is None:
        return False
    return a.log_time < b.log_time


def aux_entry(event: ActivityEvent, shard_id: str, sequence_number: str) -> dict[str, Any]:
    return {
        "command": event.command,
        "object_type": event.object_type,
        "object_name": event.object_name,
        "command_text": event.command_text,
        "log_time": _utc_text(event.log_time),
        "shard_id": shard_id,
        "sequence_number": sequence_number,
        "event_index": event.event_index,
    }


def _utc_text(stamp: datetime | None) -> str | None:
    """One spelling for times inside aux (the rebuild in SQL writes the same)."""
    if stamp is None:
        return None
    return stamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def part_line(key: StatementKey, part: StatementPart) -> str:
    cluster_id, instance_id, pid, session_id, statement_id = key
    t, n, ts = copyfmt.text, copyfmt.number, copyfmt.timestamp
    cols = [t(cluster_id), t(instance_id), n(pid), t(session_id), str(statement_id)]
    if part.main is None:
        cols.append("f")
        cols.extend([copyfmt.NULL] * 17)
    else:
        e, shard_id, sequence_number = part.main
        cols += [
            "t",
            ts(e.log_time),
            ts(e.start_time),
            ts(e.end_time),
            t(e.db_user_name),
            t(e.database_name),
            t(e.remote_host),
            t(e.command),
            t(e.command_text),
            t(e.object_type),
            t(e.object_name),
            n(e.row_count),
            t(e.exit_code),
            t(e.error_message),
            t(e.transaction_id),
            t(shard_id),
            sequence_number,
            str(e.event_index),
        ]
    cols.append(copyfmt.jsonb(part.aux))
    return "\t".join(cols)
