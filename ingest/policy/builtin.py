"""The built-in rule pack: on by default, each rule disabled or tuned under ``builtins:``.

They are plain rule specs (the same YAML shape a rules file uses), so ``das-ingest rules list``
shows them as they are evaluated and docs/policies.md explains what each catches and misses.

Engine-awareness. Statements are recognized by their *fingerprint* (lower case, comments and
literals gone: ingest/decode/fingerprint.py), which is the same for every engine's SQL, and
logins by the ``command`` each engine reports:

================  ===========================  ========================================
engine            failed login                 where the statement text is
================  ===========================  ========================================
Aurora PostgreSQL ``AUTH FAILURE``             every statement event
Aurora MySQL      ``FAILED_CONNECT``           the MAIN event (AUX events carry objects)
RDS for Oracle    ``LOGON`` + non-zero exit     every statement event
RDS for SQL Srv   ``LOGIN FAILED``             every statement event
================  ===========================  ========================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FAILED_LOGIN_COMMANDS = [
    "AUTH FAILURE", "AUTHENTICATION FAILURE", "FAILED_CONNECT", "LOGIN FAILED", "LOGON FAILED",
]  # fmt: skip
LOGIN_COMMANDS = ["CONNECT", "LOGIN", "LOGON", "LOGIN SUCCEEDED"]
#: The change window when a rules file sets none (``off_hours_ddl``, ``time: change_window``).
CHANGE_DAYS = ("mon", "tue", "wed", "thu", "fri")
CHANGE_HOURS = "07:00-19:00"

PRIVILEGE_PATTERN = (
    r"^(grant|revoke|deny|(create|alter|drop) (role|user|login)\b|rename user|set default role"
    r"|alter (server )?role \S+ (add|drop) member"
    r"|(exec|execute) (sys\.)?sp_(add|drop)(srv)?rolemember|(exec|execute) (sys\.)?sp_grantlogin)"
)
AUDIT_PATTERN = (
    r"^(alter system\b"  # PostgreSQL ALTER SYSTEM, Oracle ALTER SYSTEM SET audit_*
    r"|(set|reset) (session |local )?(pgaudit\.|log_)"
    r"|alter (role|user|database) .* (set|reset) (pgaudit\.|log_)"
    r"|(drop|alter) extension (if exists )?pgaudit"
    r"|set (global |persist |persist_only )?(@@(global|persist|persist_only)\.)?"
    r"(general_log|log_output|server_audit\w*|audit_log\w*|sql_log_off|slow_query_log)\b"
    r"|(un)?install (plugin|component)"
    r"|(no)?audit\b|(create|alter|drop) audit policy"  # Oracle
    r"|(create|alter|drop) (server |database )audit"  # SQL Server
    r"|.*\bdbms_audit_mgmt\.)"
)
DDL_PATTERN = r"^(create|alter|drop|truncate|rename|comment on)\b"
READ_PATTERN = r"^(select|with|table|show|values|copy \S+ to|copy \()"


def builtin_specs(change_window: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The built-in rules as specs, in evaluation order. ``change_window`` (days, hours) is the
    file's top-level setting, used by ``off_hours_ddl``."""
    window = dict(change_window or {})
    days = window.get("days", list(CHANGE_DAYS))
    hours = window.get("hours", CHANGE_HOURS)
    return {
        "brute_force_login": {
            "name": "brute_force_login",
            "description": "failed logins for one user, or from one remote host, in a short time",
            "kind": "threshold",
            "where": {
                "any": [
                    {"command": FAILED_LOGIN_COMMANDS},
                    {"command": LOGIN_COMMANDS, "failed": True},
                ]
            },
            "group_by": [["user"], ["remote_host"]],
            "count": 5,
            "window": "60s",
            "severity": "high",
            "title": "{count} failed logins for {group} within {window}",
        },
        "privilege_change": {
            "name": "privilege_change",
            "description": "GRANT/REVOKE, CREATE/ALTER/DROP ROLE or USER, role membership",
            "kind": "match",
            "where": {
                "any": [
                    {"fingerprint": {"regex": PRIVILEGE_PATTERN}},
                    {
                        # Oracle ACTION_NAME and SQL Server audit action names
                        "command": [
                            "GRANT",
                            "REVOKE",
                            "DENY",
                            "CREATE ROLE",
                            "ALTER ROLE",
                            "DROP ROLE",
                            "CREATE USER",
                            "ALTER USER",
                            "DROP USER",
                            "CREATE LOGIN",
                            "ALTER LOGIN",
                            "DROP LOGIN",
                            "ADD MEMBER",
                            "DROP MEMBER",
                            "ADD ROLE MEMBER",
                            "DROP ROLE MEMBER",
                        ]
                    },
                ],
                "failed": False,
            },
            "group_by": ["user", "instance"],
            "window": "10m",
            "severity": "high",
            "title": "privilege change by {user} on {instance}: {fingerprint}",
        },
        "audit_tampering": {
            "name": "audit_tampering",
            "description": "statements that change auditing or logging",
            "kind": "match",
            "where": {
                "any": [
                    {"fingerprint": {"regex": AUDIT_PATTERN}},
                    {
                        "command": [
                            "AUDIT",
                            "NOAUDIT",
                            "ALTER SYSTEM",
                            "CREATE AUDIT POLICY",
                            "ALTER AUDIT POLICY",
                            "DROP AUDIT POLICY",
                            "ALTER SERVER AUDIT",
                            "DROP SERVER AUDIT",
                            "ALTER DATABASE AUDIT SPECIFICATION",
                        ]
                    },
                ],
            },
            "group_by": ["user", "instance"],
            "window": "10m",
            "severity": "critical",
            "title": "audit or logging changed by {user} on {instance}: {fingerprint}",
        },
        "mass_read": {
            "name": "mass_read",
            "description": "one statement returning >= 10,000 rows, or >= 100,000 rows for one "
            "user within 10 minutes",
            "kind": "threshold",
            "where": {
                "any": [{"fingerprint": {"regex": READ_PATTERN}}, {"command": "SELECT"}],
                "row_count": {"min": 1},
            },
            "group_by": ["user"],
            "sum": "row_count",
            "single": 10_000,
            "count": 100_000,
            "window": "10m",
            "severity": "high",
            "title": "{count} rows read by {user} within {window}",
        },
        "off_hours_ddl": {
            "name": "off_hours_ddl",
            "description": "DDL outside the change window",
            "kind": "match",
            "where": {
                "fingerprint": {"regex": DDL_PATTERN},
                "failed": False,
                "time": {"outside": hours, "days": days},
            },
            "group_by": ["user", "instance"],
            "window": "1h",
            "severity": "medium",
            "title": "DDL outside the change window by {user} on {instance}: {fingerprint}",
        },
        "new_client_host": {
            "name": "new_client_host",
            "description": "a user connecting from a remote host not seen for it before",
            "kind": "first_seen",
            "where": {"command": LOGIN_COMMANDS, "failed": False, "remote_host": {"regex": "."}},
            "value": "remote_host",
            "group_by": ["user"],
            "learning": "1d",
            "severity": "low",
            "title": "{user} connected from a new host {remote_host}",
        },
        "heartbeat_gap": {
            "name": "heartbeat_gap",
            "description": "no heartbeat from an instance for 5 minutes while the shards are "
            "caught up (the activity stream may have been stopped)",
            "kind": "stream_health",
            "gap": "5m",
            "severity": "high",
            "title": "no heartbeat from {instance} for {gap}",
        },
    }
