"""The warehouse login on AWS: the DSN from Secrets Manager (moto's, on the local stack) and RDS
IAM database authentication (a token signed with the standard credentials, checked here against
an independent SigV4 computation, and renewed before it expires)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import pytest

from ingest.errors import ConfigError
from ingest.warehouse import auth
from ingest.warehouse.auth import (
    REFRESH_BEFORE,
    TOKEN_LIFETIME,
    TokenProvider,
    dsn_from_secret_string,
    iam_connect_args,
    rds_token,
)
from tests.cli_helpers import das_ingest
from tests.fleet import migrated

# -- Secrets Manager ----------------------------------------------------------------------


@pytest.fixture
def secrets_env(aws_env: dict[str, str]) -> dict[str, str]:
    # moto serves every AWS service on one port: Secrets Manager where KMS is.
    return {**aws_env, "AWS_ENDPOINT_URL_SECRETS_MANAGER": aws_env["AWS_ENDPOINT_URL_KMS"]}


def put_secret(env: dict[str, str], value: str) -> str:
    client = boto3.client(
        "secretsmanager",
        endpoint_url=env["AWS_ENDPOINT_URL_SECRETS_MANAGER"],
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    )
    name = f"das-warehouse-{secrets.token_hex(4)}"
    return str(client.create_secret(Name=name, SecretString=value)["ARN"])


async def test_migrate_and_status_with_the_dsn_from_a_secret(
    pg_dsn: str, secrets_env: dict[str, str]
) -> None:
    arn = put_secret(secrets_env, pg_dsn)
    env = {**secrets_env, "DAS_DSN": ""}
    migrated = await das_ingest("migrate", "--dsn-secret", arn, env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert "warehouse at schema version" in migrated.stdout
    # The RDS secret's JSON form, from the environment variable.
    parts = urlsplit(pg_dsn)
    rds_secret = put_secret(
        secrets_env,
        f'{{"engine": "postgres", "host": "{parts.hostname}", "port": {parts.port}, '
        f'"username": "{parts.username}", "password": "p@ss:/w?rd", '
        f'"dbname": "{parts.path.lstrip("/")}"}}',
    )
    status = await das_ingest(
        "status", "--no-lag", "--json", env={**env, "DAS_DSN_SECRET": rds_secret}
    )
    assert status.returncode == 0, status.stderr
    assert '"events": 0' in status.stdout


async def test_alerts_deliver_takes_the_dsn_from_the_secret(
    pg_dsn: str, secrets_env: dict[str, str]
) -> None:
    # alerts deliver opens a pool, not a connection: it must log in the same way. The PG*
    # variables point nowhere, so only the secret's DSN can reach the warehouse.
    await migrated(pg_dsn)
    arn = put_secret(secrets_env, pg_dsn)
    env = {**secrets_env, "DAS_DSN": "", "PGHOST": "/nonexistent", "PGPORT": "1"}
    result = await das_ingest(
        "alerts", "deliver", "--once", "--notify", "webhook=http://127.0.0.1:9/hook",
        "--dsn-secret", arn, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "deliveries attempted" in result.stdout


async def test_an_unknown_secret_is_a_one_line_configuration_error(
    secrets_env: dict[str, str],
) -> None:
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nothing-here-AbCdEf"
    result = await das_ingest("status", "--dsn-secret", missing, env={**secrets_env, "DAS_DSN": ""})
    assert result.returncode == 2, result.stderr
    assert "cannot read the warehouse secret" in result.stderr
    assert "ResourceNotFoundException" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_a_dsn_and_a_secret_together_are_refused() -> None:
    result = await das_ingest(
        "status", "--dsn", "postgresql://a@b/c", "--dsn-secret", "arn:aws:secretsmanager:x"
    )
    assert result.returncode == 2
    assert "not both" in result.stderr


def test_a_secret_in_rds_json_form_becomes_a_dsn_with_its_password_quoted() -> None:
    dsn = dsn_from_secret_string(
        '{"engine": "postgres", "host": "db.example.com", "port": 5432, '
        '"username": "ingester", "password": "p@ss:/w?rd#1", "dbname": "audit"}'
    )
    parts = urlsplit(dsn)
    assert (parts.hostname, parts.port, parts.username) == ("db.example.com", 5432, "ingester")
    assert parts.password == quote("p@ss:/w?rd#1", safe="")
    assert parts.path == "/audit"
    assert dsn_from_secret_string(" postgresql://u@h/d\n") == "postgresql://u@h/d"
    with pytest.raises(ConfigError, match="neither a DSN nor JSON"):
        dsn_from_secret_string("hunter2")
    with pytest.raises(ConfigError, match="host and username"):
        dsn_from_secret_string('{"password": "x"}')


# -- IAM database authentication -----------------------------------------------------------


def _sign(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


async def test_the_token_is_a_sigv4_presigned_rds_connect_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_RDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    token = await rds_token("db.example.com", 5432, "ingester", None)
    host, _, query = token.partition("/?")
    assert host == "db.example.com:5432"
    params = dict(parse_qsl(query))
    assert params["Action"] == "connect"
    assert params["DBUser"] == "ingester"
    assert params["X-Amz-Expires"] == str(int(TOKEN_LIFETIME))
    assert params["X-Amz-SignedHeaders"] == "host"
    date = params["X-Amz-Date"]
    scope = f"{date[:8]}/eu-west-1/rds-db/aws4_request"
    assert params["X-Amz-Credential"] == f"AKIDEXAMPLE/{scope}"
    # The signature, recomputed from the SigV4 specification (query-string presigning).
    unsigned = sorted((k, v) for k, v in params.items() if k != "X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in unsigned
    )
    canonical = "\n".join(
        ["GET", "/", canonical_query, f"host:{host}\n", "host", hashlib.sha256(b"").hexdigest()]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _sign(("AWS4" + "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY").encode(), date[:8])
    for part in ("eu-west-1", "rds-db", "aws4_request"):
        key = _sign(key, part)
    assert params["X-Amz-Signature"] == hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


async def test_the_token_is_reused_then_renewed_before_it_expires() -> None:
    now = [1000.0]
    made: list[float] = []

    async def make(host: str, port: int, user: str, region: str | None) -> str:
        made.append(now[0])
        return f"token-{len(made)}-{user}@{host}:{port}"

    provider = TokenProvider("db", 5432, "ingester", make=make, clock=lambda: now[0])
    assert await provider() == "token-1-ingester@db:5432"
    now[0] += TOKEN_LIFETIME - REFRESH_BEFORE - 1  # still well inside its 15 minutes
    assert await provider() == "token-1-ingester@db:5432"
    now[0] += 2  # within REFRESH_BEFORE of expiring: a new one
    assert await provider() == "token-2-ingester@db:5432"
    assert len(made) == 2


def test_iam_auth_requires_verify_full_and_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    dsn, kwargs = iam_connect_args("postgresql://ingester@db.example.com:5432/audit")
    assert dict(parse_qsl(urlsplit(dsn).query)) == {"sslmode": "verify-full"}
    provider = kwargs["password"]
    assert isinstance(provider, TokenProvider)
    assert (provider.host, provider.port, provider.user) == ("db.example.com", 5432, "ingester")
    with pytest.raises(ConfigError, match="sslmode=verify-full, not require"):
        iam_connect_args("postgresql://ingester@db/audit?sslmode=require")
    monkeypatch.setenv("PGSSLMODE", "prefer")
    with pytest.raises(ConfigError, match="not prefer"):
        iam_connect_args("postgresql://ingester@db/audit")
    with pytest.raises(ConfigError, match="must not carry a password"):
        iam_connect_args("postgresql://ingester:pw@db/audit?sslmode=verify-full")


async def test_iam_auth_without_tls_is_a_one_line_configuration_error() -> None:
    result = await das_ingest(
        "status", "--iam-auth", "--dsn", "postgresql://ingester@127.0.0.1:1/audit?sslmode=disable"
    )
    assert result.returncode == 2, result.stderr
    assert "needs sslmode=verify-full, not disable" in result.stderr


def test_configure_is_what_the_command_line_sets() -> None:
    before = auth.current()
    try:
        auth.configure("arn:aws:secretsmanager:x", True)
        assert auth.current() == auth.WarehouseAuth("arn:aws:secretsmanager:x", True)
    finally:
        auth.configure(before.dsn_secret, before.iam)
