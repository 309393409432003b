"""Connecting to the warehouse, and which database errors are transient.

This is the warehouse's error adapter: :func:`warehouse_call` turns the asyncpg and network
errors that go away by themselves into :class:`WarehouseUnavailableError` (retriable), so the
retry loops ask the error's class (``retriable``) and know no asyncpg exception. Other database
errors pass unchanged (a refused row: not retried), but a missing privilege becomes
:class:`WarehousePermissionError`, a configuration error.

The DSN comes from ``--dsn``, else ``DAS_DSN``, else libpq's ``PG*`` variables (asyncpg reads
PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE, PGPASSFILE...). Passwords are never
printed: use :func:`redact` for anything that shows a DSN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import asyncpg

from ingest.conn import Conn as Conn
from ingest.errors import ConfigError, IngestError

SCHEMA = "das"

log = logging.getLogger(__name__)


class WarehouseUnavailableError(IngestError):
    """The warehouse cannot be reached right now (down, restarting, network): retry."""

    retriable = True


class WarehousePermissionError(ConfigError):
    """The warehouse refused a statement for want of a privilege: the role must change."""


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
# now" while the server restarts (57P0x), a statement cancelled by a timeout or by our own
# cancel request after --db-command-timeout (57014), a lock not available under lock_timeout
# (55P03), and system errors (58). None of them is the fault of the rows being written.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P0", "57014", "55P03", "58")


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


P = ParamSpec("P")
R = TypeVar("R")


def unavailable(exc: BaseException) -> WarehouseUnavailableError:
    """The retriable error for a transient ``exc``, described by class and SQLSTATE (a
    database message can quote row values) or by the network error's own text."""
    if isinstance(exc, asyncpg.PostgresError):
        what = f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
    elif isinstance(exc, OSError | TimeoutError) and str(exc):
        what = f"{type(exc).__name__}: {exc}"
    else:
        what = type(exc).__name__
    return WarehouseUnavailableError(f"warehouse unavailable: {what}"[:300])


def warehouse_call(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Decorates an adapter method: transient failures leave it as WarehouseUnavailableError."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise permission_denied(exc) from exc
        except Exception as exc:
            if is_transient(exc):
                raise unavailable(exc) from exc
            raise

    return call


def permission_denied(exc: asyncpg.InsufficientPrivilegeError) -> WarehousePermissionError:
    """Which privilege is missing, and what to do about it (the least-privilege roles)."""
    return WarehousePermissionError(
        f"permission denied in the warehouse: {exc} (run this command as a role that may; see "
        "docs/operations.md, 'The warehouse: owner, ingest and analyst')"
    )


async def connect(dsn: str | None, **kwargs: Any) -> asyncpg.Connection:
    """One connection, with configuration problems turned into a clear ConfigError (the
    login from Secrets Manager or IAM authentication when so configured: see auth.py)."""
    dsn, kwargs = await _with_auth(dsn, kwargs)
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise ConfigError(f"the warehouse refused the login ({redact(dsn)}): {exc}") from None
    except asyncpg.InvalidCatalogNameError as exc:
        raise ConfigError(f"the warehouse database does not exist ({redact(dsn)}): {exc}") from None
    except asyncpg.InvalidPasswordError as exc:
        raise ConfigError(f"the warehouse refused the password ({redact(dsn)}): {exc}") from None
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        # asyncpg's DSN parser: a wrong scheme, a port that is not a number, an unknown option.
        raise ConfigError(f"invalid warehouse DSN {redact(dsn)}: {exc}") from None
    except (TimeoutError, OSError) as exc:
        raise WarehouseUnavailableError(
            f"cannot reach the warehouse at {redact(dsn)}: {exc}"
        ) from None


async def _with_auth(dsn: str | None, kwargs: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    from ingest.warehouse.auth import SecretUnavailableError, connect_args

    try:
        dsn, extra = await connect_args(dsn)
    except SecretUnavailableError as exc:
        raise WarehouseUnavailableError(str(exc)) from None
    return dsn, {**extra, **kwargs}


#: TCP keepalive probing of our warehouse connections: a server that vanished without a FIN or
#: RST (a failed-over primary, a dropped NAT entry) is noticed on an idle pooled connection
#: within about idle + interval * count seconds instead of the kernel's two hours. (Only our
#: side: the server's tcp_keepalives_* belong in its own configuration. As startup parameters
#: poolers such as PgBouncer refuse them, and a SET would not survive the RESET ALL with which
#: asyncpg returns connections to the pool.)
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3


def enable_keepalive(conn: Any) -> bool:
    """Turn on TCP keepalives on the client side of ``conn``; False if it has no TCP socket
    (a Unix socket) or the platform lacks the options."""
    transport = getattr(conn, "_transport", None)  # asyncpg exposes no public socket accessor
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except (AttributeError, OSError):
        return False
    return True


async def create_pool(
    dsn: str | None,
    *,
    min_size: int = 1,
    max_size: int = 10,
    init: Callable[[Any], Awaitable[None]] | None = None,
    command_timeout: float | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    """A connection pool. ``command_timeout`` bounds every statement and also the connection
    attempt, so a connection that stalls (accepts, then answers nothing) raises TimeoutError,
    a transient fault, instead of hanging its caller; TCP keepalives are on."""

    async def setup(conn: Any) -> None:
        enable_keepalive(conn)
        if init is not None:
            await init(conn)

    dsn, kwargs = await _with_auth(dsn, kwargs)
    if command_timeout is not None:
        kwargs.setdefault("timeout", command_timeout)  # asyncpg's connect timeout (default 60 s)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=setup,
            command_timeout=command_timeout,
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


async def close_pool(db: asyncpg.Pool, seconds: float) -> None:
    """Close the pool gracefully, or abort its connections if the warehouse does not answer
    (a stalled connection must not keep a stopping worker alive)."""
    try:
        async with asyncio.timeout(seconds):
            await db.close()
    except (TimeoutError, OSError) as exc:
        log.warning("warehouse connections aborted at exit", extra={"error": type(exc).__name__})
        db.terminate()
