"""Least-privilege roles, created and granted by ``das-ingest migrate``.

- the **ingest** role appends: it may INSERT events and dead letters but never UPDATE, DELETE or
  TRUNCATE them; it maintains the bookkeeping tables (heartbeats, leases, workers). It has no
  privilege on das.statements at all: it merges the statements of the events it stored, and
  creates day partitions, only through SECURITY DEFINER functions (which run as the owner).
- the **analyst** role reads everything in schema ``das`` and writes nothing.
- the **verifier** role (auditors running ``das-ingest verify``) reads everything and writes
  only ``das.verify_progress``, how far each chain was verified (MACed with a key only the
  auditors may use: see docs/integrity.md, "Incremental verify").

Both are NOLOGIN group roles: grant them to login users (``GRANT das_ingest TO ingester``).
The migrating user owns the schema; keep it for migrations, retention and dead-letter re-drives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncpg

from ingest.errors import ConfigError
from ingest.warehouse.db import Conn

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Tables the ingest role may only append to.
APPEND_ONLY = ("das.activity_events", "das.dead_letters")
#: Bookkeeping tables the ingest role maintains.
MAINTAINED = ("das.heartbeats", "das.leases", "das.workers")
#: Policy state and delivery (migrations/0016): maintained by the ingest role, when present.
POLICY_STATE = (
    "das.policy_counters", "das.policy_seen", "das.policy_rule_start", "das.alert_outbox",
)  # fmt: skip
#: Tables the ingest role reads.
READ = ("das.schema_migrations", "das.privileged_users", "das.verify_runs")
#: Functions the ingest role calls: they run as the schema owner (SECURITY DEFINER).
FUNCTIONS = (
    "das.ensure_partition(date)",
    "das.ensure_partitions(date, date)",
    "das.merge_statements(text, text, numeric, numeric)",
    "das.merge_sessions(text, text, numeric, numeric)",
)


@dataclass(frozen=True)
class RoleNames:
    ingest: str = "das_ingest"
    analyst: str = "das_analyst"
    verifier: str = "das_verifier"

    def __post_init__(self) -> None:
        for name in (self.ingest, self.analyst, self.verifier):
            if not _IDENT.match(name):
                raise ConfigError(
                    f"role name {name!r} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)"
                )


async def apply_grants(conn: Conn, roles: RoleNames) -> None:
    """Idempotent: create the roles if missing and (re)state exactly their privileges."""
    for role in (roles.ingest, roles.analyst, roles.verifier):
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if not exists:
            try:
                await conn.execute(f"CREATE ROLE {role} NOLOGIN")
            except asyncpg.InsufficientPrivilegeError:
                raise ConfigError(
                    f"cannot create role {role}: the migrating user needs CREATEROLE "
                    "(or create the roles yourself, or pass --no-roles)"
                ) from None
    ingest, analyst, verifier = roles.ingest, roles.analyst, roles.verifier
    # Only the functions this schema has (a warehouse migrated to an older version lacks the
    # newer ones).
    functions = ", ".join(
        [f for f in FUNCTIONS if await conn.fetchval("SELECT to_regprocedure($1)", f)]
    )
    read = ", ".join([t for t in READ if await conn.fetchval("SELECT to_regclass($1)", t)])
    record_verify = "das.record_verify_run(text, smallint, integer, bigint, bigint)"
    verify_grants = (
        [
            # verify records its outcome (das.verify_runs) through this function only.
            f"REVOKE ALL ON FUNCTION {record_verify} FROM PUBLIC",
            f"GRANT EXECUTE ON FUNCTION {record_verify} TO {analyst}, {verifier}",
        ]
        if await conn.fetchval("SELECT to_regprocedure($1)", record_verify)
        else []
    )
    statements = [
        f"GRANT USAGE ON SCHEMA das TO {ingest}, {analyst}, {verifier}",
        # Start from nothing so a re-run also takes back anything granted by hand.
        f"REVOKE ALL ON ALL TABLES IN SCHEMA das FROM {ingest}",
        f"GRANT INSERT ON {', '.join(APPEND_ONLY)} TO {ingest}",
        f"GRANT SELECT, INSERT, UPDATE ON {', '.join(MAINTAINED)} TO {ingest}",
        f"GRANT DELETE ON das.workers TO {ingest}",
        f"GRANT SELECT ON {read} TO {ingest}",
        # The integrity chain and its anchors: appended by workers, never changed.
        f"GRANT SELECT, INSERT ON das.chain_links, das.chain_anchors TO {ingest}",
        f"REVOKE ALL ON FUNCTION {functions} FROM PUBLIC",
        f"GRANT EXECUTE ON FUNCTION {functions} TO {ingest}",
        *verify_grants,
        f"REVOKE ALL ON ALL TABLES IN SCHEMA das FROM {analyst}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA das TO {analyst}",
        # Partitions created later by ensure_partition (owned by the schema owner) stay readable.
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA das GRANT SELECT ON TABLES TO {analyst}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA das FROM {verifier}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA das TO {verifier}",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA das GRANT SELECT ON TABLES TO {verifier}",
    ]
    if await conn.fetchval("SELECT to_regclass('das.alerts') IS NOT NULL"):
        statements[-3:-3] = [
            # Alerts: appended with their events (and read for the alert chain's head), never
            # changed; acknowledgements are rows of their own.
            f"GRANT SELECT, INSERT ON das.alerts, das.alert_acks TO {ingest}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(POLICY_STATE)} TO {ingest}",
        ]
    if await conn.fetchval("SELECT to_regclass('das.verify_progress')"):
        statements.append(f"GRANT INSERT, UPDATE, DELETE ON das.verify_progress TO {verifier}")
    for statement in statements:
        await conn.execute(statement)
