"""``das-ingest migrate``: create or upgrade the warehouse schema and its roles."""

from __future__ import annotations

import argparse
from typing import Any

from ingest.commands.options import add_dsn_argument, add_log_argument, env_default


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="create or upgrade the audit warehouse schema (idempotent)",
        description="Apply the SQL migrations in order, record them, and (re)grant the "
        "ingest, analyst and verifier roles. Safe to run again and from several workers at once.",
    )
    add_dsn_argument(parser)
    parser.add_argument(
        "--ingest-role",
        default=env_default("DAS_INGEST_ROLE", "das_ingest"),
        help="append-only role for the ingester (default: das_ingest) [DAS_INGEST_ROLE]",
    )
    parser.add_argument(
        "--analyst-role",
        default=env_default("DAS_ANALYST_ROLE", "das_analyst"),
        help="read-only role for analysts (default: das_analyst) [DAS_ANALYST_ROLE]",
    )
    parser.add_argument(
        "--verifier-role",
        default=env_default("DAS_VERIFIER_ROLE", "das_verifier"),
        help="role for auditors running verify: reads everything, writes only "
        "das.verify_progress (default: das_verifier) [DAS_VERIFIER_ROLE]",
    )
    parser.add_argument(
        "--no-roles",
        action="store_true",
        help="do not create or grant roles (manage them yourself)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only report the schema version; exit 1 if migrations are pending",
    )
    add_log_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ingest.runtime import run_async

    return run_async(_migrate(args))


async def _migrate(args: argparse.Namespace) -> int:
    from ingest.warehouse.db import connect, redact, resolve_dsn
    from ingest.warehouse.migrate import load_migrations, migrate, schema_version
    from ingest.warehouse.roles import RoleNames

    dsn = resolve_dsn(args.dsn)
    roles = (
        None
        if args.no_roles
        else RoleNames(args.ingest_role, args.analyst_role, args.verifier_role)
    )
    conn = await connect(dsn)
    try:
        if args.check:
            current = await schema_version(conn)
            latest = load_migrations()[-1].version
            print(f"schema version {current}, latest {latest} ({redact(dsn)})")
            return 0 if current == latest else 1
        report = await migrate(conn, roles=roles)
    finally:
        await conn.close()
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in report.applied) or "nothing to apply"
    print(f"warehouse at schema version {report.current}: {names}")
    return 0
