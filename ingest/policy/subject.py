"""What a rule sees of an event: its fields under the names rules use, engine-aware.

Rules name fields the way an auditor thinks of them (``user``, ``remote_host``, ``client_app``);
this module maps them to the decoded event and derives the ones the stream does not carry
directly: ``engine`` (from the record version), ``failed`` (an error message or a non-success
exit code, per engine) and ``fingerprint``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from typing import Any

from ingest.decode.engines import engine_of, event_failed
from ingest.decode.fingerprint import Fingerprint
from ingest.decode.model import ActivityEvent, DecodedRecord

#: The engines (ingest/decode/engines.py: from the record version, else serverType); rules may
#: also write "postgres".
ENGINES = ("postgresql", "mysql", "oracle", "sqlserver")
ENGINE_ALIASES = {"postgres": "postgresql"}


@dataclass(frozen=True, slots=True)
class Subject:
    """One event as rules see it."""

    event: ActivityEvent
    record: DecodedRecord
    engine: str
    fingerprint: Fingerprint | None

    @property
    def failed(self) -> bool:
        """Failed, as each engine says it (Oracle RETURN_CODE, SQL Server succeeded = 0, an
        SQLSTATE or error number for Aurora): the warehouse's das.event_failed."""
        event = self.event
        return event_failed(self.record.record_version, event.error_message, event.exit_code)

    @property
    def time(self) -> datetime | None:
        return self.event.log_time


def subject(
    event: ActivityEvent, record: DecodedRecord, fingerprint: Fingerprint | None
) -> Subject:
    engine = engine_of(record.record_version, event.server_type) or "unknown"
    return Subject(event, record, engine, fingerprint)


def _fingerprint_text(s: Subject) -> str | None:
    return s.fingerprint[0] if s.fingerprint else None


#: Text fields rules may name, and how to read them (attrgetter: one C call per read, where
#: every rule's predicates read them for every event).
TEXT_FIELDS: dict[str, Callable[[Subject], str | None]] = {
    "engine": attrgetter("engine"),
    "class": attrgetter("event.class_"),
    "command": attrgetter("event.command"),
    "command_text": attrgetter("event.command_text"),
    "user": attrgetter("event.db_user_name"),
    "database": attrgetter("event.database_name"),
    "object": attrgetter("event.object_name"),
    "object_type": attrgetter("event.object_type"),
    "remote_host": attrgetter("event.remote_host"),
    "client_app": attrgetter("event.client_application"),
    "server_host": attrgetter("event.server_host"),
    "error_message": attrgetter("event.error_message"),
    "exit_code": attrgetter("event.exit_code"),
    "fingerprint": _fingerprint_text,
    "cluster": attrgetter("record.cluster_id"),
    "instance": attrgetter("record.instance_id"),
}
#: Numeric fields (min/max predicates, threshold sums).
NUMBER_FIELDS: dict[str, Callable[[Subject], int | None]] = {
    "row_count": attrgetter("event.row_count"),
}
#: Every field a rule can group by or put in a title.
GROUP_FIELDS = {**TEXT_FIELDS, **NUMBER_FIELDS}


def field_value(s: Subject, name: str) -> Any:
    return GROUP_FIELDS[name](s)
