"""Typed DAS events: what the decode layer produces and the warehouse stores.

Field names are the DAS names in snake_case (``class`` becomes ``class_`` in Python, ``class`` in
SQL). ``FIELDS`` is the one table that maps the wire name, the column and the value kind; the
normalizer, the COPY encoder, the CLI's JSON output and the migrations all follow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

# JSON values as the parser hands them to us.
JsonValue = Any


class Kind(Enum):
    """How a wire value becomes a column value."""

    TEXT = "text"  # str; numbers are kept as their JSON text
    INT = "int"  # 64-bit integer; numeric strings are accepted
    TIME = "time"  # "2019-05-24 00:39:49.940668+00" -> aware datetime
    LIST = "list"  # JSON array (paramList), stored as jsonb
    OBJECT = "object"  # JSON object (engineNativeAuditFields), stored as jsonb


@dataclass(frozen=True, slots=True)
class FieldSpec:
    wire: str
    column: str
    kind: Kind


#: Every field of the Aurora PostgreSQL and Aurora MySQL field tables, in column order (the
#: Oracle and SQL Server tables share them; their own fields are ENGINE_FIELDS).
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("class", "class", Kind.TEXT),
    FieldSpec("clientApplication", "client_application", Kind.TEXT),
    FieldSpec("command", "command", Kind.TEXT),
    FieldSpec("commandText", "command_text", Kind.TEXT),
    FieldSpec("databaseName", "database_name", Kind.TEXT),
    FieldSpec("dbProtocol", "db_protocol", Kind.TEXT),
    FieldSpec("dbUserName", "db_user_name", Kind.TEXT),
    FieldSpec("endTime", "end_time", Kind.TIME),
    FieldSpec("errorMessage", "error_message", Kind.TEXT),
    # exitCode is documented as int but arrives as null, 0, "0", "" or an SQLSTATE ("42P01").
    FieldSpec("exitCode", "exit_code", Kind.TEXT),
    FieldSpec("logTime", "log_time", Kind.TIME),
    FieldSpec("netProtocol", "net_protocol", Kind.TEXT),
    FieldSpec("objectName", "object_name", Kind.TEXT),
    FieldSpec("objectType", "object_type", Kind.TEXT),
    FieldSpec("paramList", "param_list", Kind.LIST),
    FieldSpec("pid", "pid", Kind.INT),
    FieldSpec("remoteHost", "remote_host", Kind.TEXT),
    FieldSpec("remotePort", "remote_port", Kind.TEXT),
    FieldSpec("rowCount", "row_count", Kind.INT),
    FieldSpec("serverHost", "server_host", Kind.TEXT),
    FieldSpec("serverType", "server_type", Kind.TEXT),
    FieldSpec("serverVersion", "server_version", Kind.TEXT),
    FieldSpec("serviceName", "service_name", Kind.TEXT),
    # sessionId is "5ce73c6f.7e64" on PostgreSQL and "725121" on MySQL: text.
    FieldSpec("sessionId", "session_id", Kind.TEXT),
    FieldSpec("startTime", "start_time", Kind.TIME),
    FieldSpec("statementId", "statement_id", Kind.INT),
    FieldSpec("substatementId", "substatement_id", Kind.INT),
    FieldSpec("transactionId", "transaction_id", Kind.TEXT),
)

#: Fields of the RDS for Oracle (1.3) and RDS for SQL Server (1.4) tables that the Aurora ones
#: lack. Their columns come after ``ingested_at`` (see ENGINE_COLUMNS).
ENGINE_FIELDS: tuple[FieldSpec, ...] = (
    # Oracle's DBID: documented as a number, sent as a string in AWS's own example
    # ("0123456789", leading zero): text keeps either exactly as sent.
    FieldSpec("dbid", "dbid", Kind.TEXT),
    # Oracle UNIFIED_AUDIT_TRAIL columns (UPPERCASE keys), SQL Server fn_get_audit_file
    # columns (snake_case keys); an empty object unless the stream was started with
    # --engine-native-audit-fields-included.
    FieldSpec("engineNativeAuditFields", "engine_native_audit_fields", Kind.OBJECT),
)

#: The columns added for the RDS engines (migration 0006), in COPY order after ``ingested_at``:
#: the two fields above, then ``statement_id_text`` (a statementId that is not a 64-bit integer,
#: as sent: SQL Server's ``0x…`` sequence_group_id) and ``times_as_sent`` (the original text of
#: a logTime/startTime/endTime whose precision a timestamptz cannot hold, e.g. SQL Server's
#: seven fraction digits).
ENGINE_COLUMNS: tuple[str, ...] = (
    "dbid",
    "engine_native_audit_fields",
    "statement_id_text",
    "times_as_sent",
)

FIELDS_BY_WIRE: dict[str, FieldSpec] = {f.wire: f for f in (*FIELDS, *ENGINE_FIELDS)}

#: Wire fields that are consumed structurally and never stored in ``extra``.
STRUCTURAL_FIELDS = frozenset({"type"})


@dataclass(frozen=True, slots=True)
class ActivityEvent:
    """One DAS event of type ``record``.

    ``extra`` holds every field the engine sent that has no column, and the original value of
    any known field whose value could not be stored in its column (that column is then NULL).
    ``anomalies`` lists what was done to make the event storable, e.g. ``"pid:type"`` (value
    moved to extra) or ``"commandText:nul"`` (NUL bytes escaped); empty for a clean event.
    """

    event_index: int
    class_: str | None = None
    client_application: str | None = None
    command: str | None = None
    command_text: str | None = None
    database_name: str | None = None
    db_protocol: str | None = None
    db_user_name: str | None = None
    end_time: datetime | None = None
    error_message: str | None = None
    exit_code: str | None = None
    log_time: datetime | None = None
    net_protocol: str | None = None
    object_name: str | None = None
    object_type: str | None = None
    param_list: list[JsonValue] | None = None
    pid: int | None = None
    remote_host: str | None = None
    remote_port: str | None = None
    row_count: int | None = None
    server_host: str | None = None
    server_type: str | None = None
    server_version: str | None = None
    service_name: str | None = None
    session_id: str | None = None
    start_time: datetime | None = None
    statement_id: int | None = None
    substatement_id: int | None = None
    transaction_id: str | None = None
    extra: dict[str, JsonValue] = field(default_factory=dict)
    anomalies: tuple[str, ...] = ()
    dbid: str | None = None
    #: Never None for an event das-ingest decodes (``{}`` when the engine sent none): rows
    #: stored before migration 0006 are the only ones with NULL here (docs/integrity.md).
    engine_native_audit_fields: dict[str, JsonValue] = field(default_factory=dict)
    statement_id_text: str | None = None
    times_as_sent: dict[str, str] | None = None

    def column(self, name: str) -> Any:
        """The value of SQL column ``name`` (``class`` maps to ``class_``)."""
        return getattr(self, "class_" if name == "class" else name)

    def as_dict(self) -> dict[str, Any]:
        """Column name -> value, as the warehouse stores it (times stay datetimes)."""
        out: dict[str, Any] = {"event_index": self.event_index}
        for spec in FIELDS:
            out[spec.column] = self.column(spec.column)
        out["extra"] = self.extra
        out["anomalies"] = list(self.anomalies)
        for name in ENGINE_COLUMNS:
            out[name] = getattr(self, name)
        return out


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A DAS event of type ``heartbeat``: liveness of one instance, not database activity."""

    event_index: int
    log_time: datetime | None
    fields: dict[str, JsonValue]


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """Everything one Kinesis record carried, decrypted and normalized."""

    record_version: str
    cluster_id: str | None
    instance_id: str | None
    events: list[ActivityEvent]
    heartbeats: list[Heartbeat]
    #: Fields of the inner document other than the known ones, kept for the warehouse.
    record_extra: dict[str, JsonValue] = field(default_factory=dict)
