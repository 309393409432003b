"""Where the warehouse login comes from on AWS: the DSN from AWS Secrets Manager
(``--dsn-secret ARN``), and RDS / Aurora PostgreSQL IAM database authentication (``--iam-auth``),
whose password is a 15-minute token signed with the standard AWS credentials.

The settings are process-wide (one warehouse per process): the command line sets them once
(:func:`configure`), and :mod:`ingest.warehouse.db` applies them to every connection it opens.
A token is made when a connection is opened (asyncpg asks for the password then) and reused
until ``REFRESH_BEFORE`` seconds before it expires, so a long-running pool never presents an
expired one. IAM authentication sends the token as the password: it requires
``sslmode=verify-full`` (the server's certificate checked against ``PGSSLROOTCERT`` or
``sslrootcert``), which is what an unset ``sslmode`` becomes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import orjson

from ingest.errors import ConfigError, IngestError

#: RDS IAM tokens are valid for 15 minutes.
TOKEN_LIFETIME = 900.0
#: A token is replaced this long before it expires (a connection attempt takes a while).
REFRESH_BEFORE = 300.0


class SecretUnavailableError(IngestError):
    """Secrets Manager could not be reached or throttled us: try again later."""

    retriable = True


@dataclass(frozen=True)
class WarehouseAuth:
    dsn_secret: str | None = None
    iam: bool = False


_auth = WarehouseAuth()


def configure(dsn_secret: str | None, iam: bool) -> None:
    global _auth  # process-wide by design: set once by the command line
    _auth = WarehouseAuth(dsn_secret or None, bool(iam))


def current() -> WarehouseAuth:
    return _auth


def dsn_from_secret_string(text: str) -> str:
    """A secret holds a DSN as is, or the JSON Secrets Manager's RDS rotation uses
    (``{"engine": "postgres", "host", "port", "username", "password", "dbname"}``)."""
    stripped = text.strip()
    if stripped.startswith(("postgresql://", "postgres://")):
        return stripped
    try:
        fields = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        raise ConfigError("the --dsn-secret value is neither a DSN nor JSON") from None
    if not isinstance(fields, dict) or not {"host", "username"} <= set(fields):
        raise ConfigError(
            "the --dsn-secret JSON needs at least host and username "
            "(and usually password, port, dbname)"
        )
    user = quote(str(fields["username"]), safe="")
    password = fields.get("password")
    login = f"{user}:{quote(str(password), safe='')}" if password else user
    port = f":{fields['port']}" if fields.get("port") else ""
    database = quote(str(fields.get("dbname") or "postgres"), safe="")
    return f"postgresql://{login}@{fields['host']}{port}/{database}"


_secret_cache: dict[str, str] = {}


async def dsn_from_secret(arn: str) -> str:
    """The DSN in secret ``arn`` (read once per process)."""
    if arn in _secret_cache:
        return _secret_cache[arn]
    from botocore.exceptions import BotoCoreError, ClientError

    from ingest.aws import aws_client, error_code

    try:
        async with aws_client("secretsmanager") as client:
            answer = await client.get_secret_value(SecretId=arn)
    except ClientError as exc:
        code = error_code(exc) or "error"
        if code in ("ThrottlingException", "InternalServiceError"):
            raise SecretUnavailableError(f"Secrets Manager: {code} reading {arn}") from None
        raise ConfigError(f"cannot read the warehouse secret {arn}: {code}") from None
    except BotoCoreError as exc:  # endpoint unreachable, timeouts
        raise SecretUnavailableError(
            f"Secrets Manager unreachable reading {arn}: {type(exc).__name__}"
        ) from None
    text = answer.get("SecretString")
    if not isinstance(text, str):
        raise ConfigError(f"the warehouse secret {arn} has no SecretString")
    _secret_cache[arn] = dsn_from_secret_string(text)
    return _secret_cache[arn]


TokenMaker = Callable[[str, int, str, str | None], Awaitable[str]]


async def rds_token(host: str, port: int, user: str, region: str | None) -> str:
    """An RDS IAM authentication token from the standard credentials (a presigned
    ``rds-db:connect`` URL, valid for 15 minutes)."""
    from ingest.aws import aws_client, region_from_environment

    async with aws_client("rds") as client:
        token = await client.generate_db_auth_token(
            DBHostname=host,
            Port=port,
            DBUsername=user,
            Region=region or region_from_environment() or client.meta.region_name,
        )
    return str(token)


class TokenProvider:
    """asyncpg's ``password`` callable: a cached token, replaced before it expires."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        *,
        region: str | None = None,
        make: TokenMaker = rds_token,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port, self.user, self.region = host, port, user, region
        self._make = make
        self._clock = clock
        self._token: str | None = None
        self._made_at = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self) -> str:
        async with self._lock:
            age = self._clock() - self._made_at
            if self._token is None or age >= TOKEN_LIFETIME - REFRESH_BEFORE:
                self._token = await self._make(self.host, self.port, self.user, self.region)
                self._made_at = self._clock()
            return self._token


def iam_connect_args(dsn: str | None) -> tuple[str, dict[str, Any]]:
    """The DSN (``sslmode=verify-full`` unless it says so already) and asyncpg's keyword
    arguments for IAM authentication of the login the DSN names."""
    if not dsn:
        host = os.environ.get("PGHOST", "")
        user = os.environ.get("PGUSER", "")
        port = int(os.environ.get("PGPORT") or 5432)
        dsn = (
            f"postgresql://{quote(user, safe='')}@{host}:{port}/{os.environ.get('PGDATABASE', '')}"
        )
    parts = urlsplit(dsn)
    if parts.password:
        raise ConfigError(
            "--iam-auth: the DSN must not carry a password (the token is the password)"
        )
    if not parts.hostname or not parts.username:
        raise ConfigError(
            "--iam-auth needs the warehouse host and user in the DSN (or PGHOST, PGUSER)"
        )
    query = dict(parse_qsl(parts.query))
    mode = query.get("sslmode") or os.environ.get("PGSSLMODE") or "verify-full"
    if mode != "verify-full":
        raise ConfigError(
            f"--iam-auth sends a token as the password: it needs sslmode=verify-full, not {mode}"
        )
    query["sslmode"] = "verify-full"
    region = query.pop("aws_region", None)
    dsn = urlunsplit(parts._replace(query=urlencode(query)))
    provider = TokenProvider(parts.hostname, parts.port or 5432, parts.username, region=region)
    return dsn, {"password": provider}


async def connect_args(dsn: str | None) -> tuple[str | None, dict[str, Any]]:
    """``dsn`` (from the command line, DAS_DSN or the PG* variables) with the configured AWS
    sources applied: the secret's DSN when there is no other, and IAM authentication."""
    auth = _auth
    if auth.dsn_secret:
        if dsn:
            raise ConfigError("give the warehouse as --dsn/DAS_DSN or --dsn-secret, not both")
        dsn = await dsn_from_secret(auth.dsn_secret)
    if not auth.iam:
        return dsn, {}
    return iam_connect_args(dsn)
