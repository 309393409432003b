"""The docker-compose demo's anchor key: the one-shot service ``anchor-key`` runs this in the
das-ingest image (``python3 -I``, mounted read-only) before the ingesters start.

It makes sure the KMS alias in ``$DAS_ANCHOR_KEY_ID`` (``alias/das-anchor``) names an HMAC_256
key for GenerateMac/VerifyMac, creating key and alias in LocalStack if the alias does not exist
yet. The ingesters then anchor their chain heads with ``--anchor-key-id alias/das-anchor``
(through ``DAS_ANCHOR_KEY_ID``), and ``das-ingest verify`` checks the anchors with the same key.

Idempotent: an existing alias is kept, so a re-run leaves earlier anchors verifiable. LocalStack
that does not answer yet, throttles or fails with a 5xx is retried for up to
``$DAS_ANCHOR_KEY_DEADLINE`` seconds (default 120). Exit status: 0 once the key exists; 1 if
LocalStack never answered in time; 2 for a configuration error (no alias given, no region, or an
alias naming a key that cannot anchor).

On AWS, create the anchor key yourself, in an account or under a key policy the warehouse's
administrators do not control (docs/integrity.md); this script is for LocalStack only.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ingest.aws import aws_client, error_code
from ingest.errors import ConfigError

KEY_SPEC = "HMAC_256"
KEY_USAGE = "GENERATE_VERIFY_MAC"
RETRY_SECONDS = 2.0
#: AWS error codes worth another try: LocalStack or KMS still starting, or busy.
TRANSIENT_CODES = frozenset(
    {"ThrottlingException", "KMSInternalException", "DependencyTimeoutException"}
)


class NotReady(Exception):
    """LocalStack did not answer the way a ready KMS does (yet)."""


def transient(exc: BaseException) -> bool:
    if isinstance(exc, BotoCoreError):  # refused, reset, timed out: no answer at all
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(exc) in TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
    return False


async def existing_key(kms: Any, alias: str) -> dict[str, Any] | None:
    try:
        response = await kms.describe_key(KeyId=alias)
    except ClientError as exc:
        if error_code(exc) == "NotFoundException":
            return None
        raise
    metadata: dict[str, Any] = response["KeyMetadata"]
    return metadata


async def ensure_anchor_key(kms: Any, alias: str) -> tuple[str, bool]:
    """The key id the alias names, and whether it was created now."""
    found = await existing_key(kms, alias)
    if found is None:
        created = await kms.create_key(
            KeySpec=KEY_SPEC,
            KeyUsage=KEY_USAGE,
            Description="das-ingest demo: anchors the integrity chain heads (docs/integrity.md)",
        )
        key_id = str(created["KeyMetadata"]["KeyId"])
        try:
            await kms.create_alias(AliasName=alias, TargetKeyId=key_id)
        except ClientError as exc:
            if error_code(exc) != "AlreadyExistsException":
                raise
            # Another run made the alias meanwhile: use its key (ours stays unused).
        else:
            return key_id, True
        found = await existing_key(kms, alias)
        if found is None:
            raise NotReady(f"alias {alias!r} exists and does not")
    if found.get("KeySpec") != KEY_SPEC or found.get("KeyUsage") != KEY_USAGE:
        raise ConfigError(
            f"alias {alias!r} names a {found.get('KeySpec')} {found.get('KeyUsage')} key, "
            f"not an {KEY_SPEC} {KEY_USAGE} key"
        )
    return str(found["KeyId"]), False


async def main() -> int:
    alias = os.environ.get("DAS_ANCHOR_KEY_ID", "")
    if not alias.startswith("alias/"):
        print(f"anchor-key: set DAS_ANCHOR_KEY_ID to an alias/..., not {alias!r}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + float(os.environ.get("DAS_ANCHOR_KEY_DEADLINE", "120"))
    while True:
        try:
            async with aws_client("kms") as kms:
                key_id, created = await ensure_anchor_key(kms, alias)
        except ConfigError as exc:
            print(f"anchor-key: {exc}", file=sys.stderr)
            return 2
        except (BotoCoreError, ClientError, NotReady) as exc:
            if not (isinstance(exc, NotReady) or transient(exc)):
                print(f"anchor-key: KMS refused: {exc}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"anchor-key: KMS did not answer in time: {exc}", file=sys.stderr)
                return 1
            print(f"anchor-key: KMS not ready, retrying: {exc}", file=sys.stderr)
            await asyncio.sleep(RETRY_SECONDS)
            continue
        verb = "created" if created else "found"
        print(f"anchor-key: {verb} {alias} -> {key_id} ({KEY_SPEC}, {KEY_USAGE})")
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
