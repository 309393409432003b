"""Connecting to the warehouse, and which database errors are transient.

The DSN comes from ``--dsn``, else ``DAS_DSN``, else libpq's ``PG*`` variables (asyncpg reads
PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGPASSFILE...). Passwords are never
printed: use :func:`redact` for anything that shows a DSN.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ingest.errors import ConfigError, IngestError

#: A plain connection or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

SCHEMA = "das"


class WarehouseUnavailableError(IngestError):
    """The warehouse cannot be reached right now (down, restarting, network): retry."""

    retriable = True


def resolve_dsn(cli_value: str | None) -> str | None:
    """``--dsn``, else ``DAS_DSN``, else None (asyncpg then uses the PG* variables)."""
    return cli_value or os.environ.get("DAS_DSN") or None


_PASSWORD_IN_URL = re.compile(r"(://[^:/@]+):[^@]*@")
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact(dsn: str | None) -> str:
    """A DSN safe to print: the password replaced by ***."""
    if not dsn:
        return "(PG* environment)"
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1:***@", dsn))


# SQLSTATE classes that mean "try again": connection exceptions (08), transaction rollback
# such as serialization failure and deadlock (40), insufficient resources such as too many
# connections (53), operator intervention such as admin or crash shutdown and "cannot connect
# now" while the server restarts (57P0x), and system errors (58).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P0", "58")


def is_transient(exc: BaseException) -> bool:
    """True for faults that go away by themselves: network, restarts, contention."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncio.TimeoutError
        | asyncpg.InterfaceError  # "connection is closed", "connection was lost"
        | asyncpg.exceptions.ConnectionDoesNotExistError,
    )


async def connect(dsn: str | None, **kwargs: Any) -> asyncpg.Connection:
    """One connection, with configuration problems turned into a clear ConfigError."""
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise ConfigError(f"the warehouse refused the login ({redact(dsn)}): {exc}") from None
    except asyncpg.InvalidCatalogNameError as exc:
        raise ConfigError(f"the warehouse database does not exist ({redact(dsn)}): {exc}") from None
    except (TimeoutError, OSError) as exc:
        raise ConfigError(f"cannot reach the warehouse at {redact(dsn)}: {exc}") from None


async def create_pool(
    dsn: str | None,
    *,
    min_size: int = 1,
    max_size: int = 10,
    init: Callable[[Any], Awaitable[None]] | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=init,  # type: ignore[arg-type]  # the stubs' callback protocol is too narrow
            **kwargs,
        )
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise ConfigError(f"the warehouse refused the login ({redact(dsn)}): {exc}") from None
    except Exception as exc:
        if is_transient(exc):
            raise WarehouseUnavailableError(
                f"cannot reach the warehouse at {redact(dsn)}: {type(exc).__name__}: {exc}"
            ) from None
        raise
    assert pool is not None
    return pool
