"""What each DAS engine means by its fields (pure): the engine of an event and whether it failed.

Aurora PostgreSQL (record versions 1.0/1.1) and Aurora MySQL (1.2) report a failure as an error
message or an SQLSTATE / error number in exitCode; RDS for Oracle (1.3) sends RETURN_CODE (0, or
the ORA- error number, e.g. 1017 for a wrong password); RDS for SQL Server (1.4) sends
fn_get_audit_file.succeeded (1 success, 0 failure; for all but login events, the permission
check's outcome). The warehouse applies the same rule in SQL (``das.event_failed``, migration
0006); the tests hold the two equal.
"""

from __future__ import annotations

from typing import Literal

Engine = Literal["postgresql", "mysql", "oracle", "sqlserver"]

ORACLE_VERSION = "1.3"
SQLSERVER_VERSION = "1.4"


def engine_of(record_version: str | None, server_type: str | None = None) -> Engine | None:
    """The engine of an event, from its record version, else its serverType."""
    server = (server_type or "").upper()
    if record_version == ORACLE_VERSION or server == "ORACLE":
        return "oracle"
    if record_version == SQLSERVER_VERSION or server == "SQLSERVER":
        return "sqlserver"
    if record_version == "1.2" or server == "MYSQL":
        return "mysql"
    if record_version in ("1.0", "1.1") or server == "POSTGRESQL":
        return "postgresql"
    return None


def event_failed(
    record_version: str | None, error_message: str | None, exit_code: str | None
) -> bool:
    """Whether the event reports a failure, right for every engine (``das.event_failed``)."""
    code = exit_code or ""
    if record_version == SQLSERVER_VERSION:
        return code == "0"
    if record_version == ORACLE_VERSION:
        return code not in ("", "0") or bool(error_message)
    return bool(error_message) or code not in ("", "0", "00000")
