"""aiobotocore clients configured from the standard AWS sources.

The region is ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else the ``region`` of the profile
(``AWS_PROFILE``) in the shared config file: the order of the AWS CLI v2 and of the other AWS
SDKs. botocore on its own reads only ``AWS_DEFAULT_REGION`` and the profile, so ``AWS_REGION``
(the variable Kubernetes manifests, ECS and most tooling set) is passed explicitly.

Credentials and endpoints come from wherever botocore finds them: AWS_PROFILE, web identity
(IRSA), container and instance roles, and the service-specific endpoint variables
AWS_ENDPOINT_URL_KINESIS, AWS_ENDPOINT_URL_KMS, AWS_ENDPOINT_URL_RDS (or AWS_ENDPOINT_URL for
all). We add only timeouts and a connection pool size.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import NoRegionError

from ingest.errors import ConfigError

# botocore retries a few times itself (throttling, 5xx, connection errors); our own loops retry
# transient errors indefinitely with backoff on top of that.
_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 30,
    "retries": {"mode": "standard", "max_attempts": 3},
}


@asynccontextmanager
async def aws_client(
    service: str,
    *,
    max_pool_connections: int = 32,
    retries: bool = True,
    fast_records: bool = False,
    session: AioSession | None = None,
) -> AsyncIterator[Any]:
    """An aiobotocore client for ``service`` ("kinesis", "kms", "rds"). ``retries=False``: one
    attempt per call, for callers that pace and retry every attempt themselves.
    ``fast_records``: GetRecords answers are parsed by ``ingest.records_parser`` (the same
    result without botocore's per-field walk). ``session``: share one (from :func:`session`)
    between the clients of a process: botocore then loads the service models and endpoint
    data once, not once per client (~50 ms of start-up each)."""
    session = session or get_session()
    settings = dict(_CONFIG)
    if not retries:
        settings["retries"] = {"mode": "standard", "total_max_attempts": 1}
    config = Config(max_pool_connections=max_pool_connections, **settings)
    # The parser factory is read while the client is created: set for this client only.
    factory = session.get_component("response_parser_factory")
    if fast_records:
        from ingest.records_parser import RecordsParserFactory

        session.register_component("response_parser_factory", RecordsParserFactory())
    try:
        async with session.create_client(
            service, region_name=region_from_environment(), config=config
        ) as client:
            session.register_component("response_parser_factory", factory)
            yield client
    except NoRegionError:
        raise ConfigError(
            "no AWS region configured: set AWS_REGION (or AWS_DEFAULT_REGION, or the region "
            "of the AWS_PROFILE in the shared config file)"
        ) from None
    finally:
        session.register_component("response_parser_factory", factory)


def session() -> AioSession:
    """A new aiobotocore session, for :func:`aws_client`'s ``session``."""
    return get_session()


def region_from_environment() -> str | None:
    """``$AWS_REGION`` if set; None leaves the region to botocore (AWS_DEFAULT_REGION, then
    the profile's ``region``)."""
    return os.environ.get("AWS_REGION") or None


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError, else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return code if isinstance(code, str) else None
    return None
