"""Schema migrations: plain SQL files in ``migrations/``, applied in order, each in a transaction.

Applied versions are recorded in ``das.schema_migrations`` with a checksum; running again is a
no-op; concurrent runs serialize on an advisory lock; a schema newer than this code knows is
refused, and so is an applied migration whose file has since changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import ConfigError
from ingest.warehouse.db import Conn
from ingest.warehouse.roles import RoleNames, apply_grants

#: pg_advisory_lock key for migrations: the first 8 bytes of sha256("das-ingest migrate").
LOCK_KEY = int.from_bytes(hashlib.sha256(b"das-ingest migrate").digest()[:8], "big", signed=True)

DEFAULT_ROLES = RoleNames()

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS das;
CREATE TABLE IF NOT EXISTS das.schema_migrations (
    version     integer PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text        NOT NULL DEFAULT current_user
);
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationReport:
    applied: list[Migration]
    current: int
    latest: int


def migrations_dir() -> Path:
    """``$DAS_MIGRATIONS_DIR``, else the repository's ``migrations/`` (a checkout or an
    editable install), else ``<prefix>/share/das-ingest/migrations`` (a wheel install)."""
    override = os.environ.get("DAS_MIGRATIONS_DIR")
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "das-ingest" / "migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    if not directory.is_dir():
        raise ConfigError(f"migrations directory {directory} not found (set DAS_MIGRATIONS_DIR)")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise ConfigError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    # Gaps are fine (each branch of development numbers its migrations in its own range); the
    # runner applies every missing one, in numeric order.
    versions = [m.version for m in found]
    # Each branch of development numbers its migrations in its own range, so gaps are fine;
    # a version twice is not (the sort above makes them ascending).
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise ConfigError(f"migration versions must be distinct and from 1, found {versions}")
    return found


async def schema_version(conn: Conn) -> int:
    """The highest applied migration, 0 for an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('das.schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM das.schema_migrations"))


async def require_current_schema(conn: Conn) -> int:
    """For workers: refuse to run against a schema older or newer than this code."""
    known = [m.version for m in load_migrations()]
    latest = known[-1]
    current = await schema_version(conn)
    applied: set[int] = set()
    if current:
        rows = await conn.fetch("SELECT version FROM das.schema_migrations")
        applied = {int(r["version"]) for r in rows}
    # With numbers in ranges, a lower migration can arrive after a higher one was applied.
    missing = [v for v in known if v not in applied]
    if current < latest or missing:
        raise ConfigError(
            f"the warehouse schema is at version {current}, this das-ingest needs {latest}"
            + (f" (migration {missing[0]:04d} is not applied)" if current >= latest else "")
            + ": run `das-ingest migrate` first"
        )
    if current > latest:
        raise ConfigError(
            f"the warehouse schema is at version {current}, newer than this das-ingest knows "
            f"({latest}): upgrade das-ingest"
        )
    return current


async def migrate(
    conn: Conn,
    *,
    roles: RoleNames | None = DEFAULT_ROLES,
    directory: Path | None = None,
) -> MigrationReport:
    migrations = load_migrations(directory)
    latest = migrations[-1].version
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        async with conn.transaction():
            await conn.execute(_BOOTSTRAP)
        rows = await conn.fetch("SELECT version, name, checksum FROM das.schema_migrations")
        applied = {r["version"]: r for r in rows}
        newest = max(applied, default=0)
        if newest > latest:
            raise ConfigError(
                f"the warehouse schema is at version {newest}, newer than this das-ingest knows "
                f"({latest}); refusing to touch it: upgrade das-ingest"
            )
        done: list[Migration] = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise ConfigError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it "
                        "was applied; restore the original file"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO das.schema_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            done.append(migration)
        if roles is not None:
            async with conn.transaction():
                await apply_grants(conn, roles)
        return MigrationReport(applied=done, current=latest, latest=latest)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
