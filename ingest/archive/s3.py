"""A thin S3 adapter for the archive (aiobotocore): multipart uploads from a local file,
streamed downloads, listings, the write options (Object Lock, SSE-KMS), and the error classes.

Every call here raises one of three classes (after botocore's own retries), which the commands
map to the exit-code contract:

- :class:`S3UnavailableError` (retriable): no answer (connection refused or reset, timeout,
  DNS), throttling or a 5xx. The same run later completes what is missing: exit 3.
- :class:`S3ConfigError` (a ConfigError): a refusal only the operator can fix (no such bucket,
  access denied, bad credentials, wrong region): exit 2.
- :class:`S3Error`: any other answer: a runtime failure, exit 1.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import ClientError as HttpClientError
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from ingest.aws import error_code
from ingest.errors import ConfigError, IngestError

#: Multipart part size: S3's minimum is 5 MiB (except the last part).
PART_SIZE = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")

#: Answers that may well succeed if simply repeated later (as do all 5xx).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "429",
    }
)
#: Refusals only the operator can fix. A HEAD request has no body: its code is the status.
REFUSAL_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
        "InvalidBucketName",
        "InvalidBucketState",
        "KMS.NotFoundException",
        "KMS.DisabledException",
        "KMS.AccessDeniedException",
        "301",
        "400",
        "403",
        "404",
    }
)


class S3Error(IngestError):
    """S3 answered with an error that is neither transient nor the operator's to fix."""


class S3UnavailableError(S3Error):
    """S3 could not be reached, throttled us or failed (5xx), after botocore's retries."""

    retriable = True


class S3ConfigError(S3Error, ConfigError):
    """S3 refused in a way only the operator can fix (bucket, permissions, credentials)."""


def classify(exc: BaseException) -> S3Error:
    """Map a botocore / network exception from S3 to our error classes."""
    code = error_code(exc)
    if code is None:
        if isinstance(
            exc,
            BotoConnectionError
            | HTTPClientError
            | HttpClientError
            | ConnectionError
            | TimeoutError,
        ):
            # The request never got an answer: connection refused or reset, timeout, DNS.
            return S3UnavailableError(f"S3 unreachable ({type(exc).__name__})")
        # No request was sent: no credentials, no region, an invalid parameter.
        return S3ConfigError(f"S3: {type(exc).__name__}: {exc}")
    response: Any = getattr(exc, "response", None)
    status = (response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
        return S3UnavailableError(f"S3 {code}")
    if code in REFUSAL_CODES:
        return S3ConfigError(f"S3 refused: {code}")
    return S3Error(f"S3 {code}: {exc}")


@contextlib.contextmanager
def _classified() -> Iterator[None]:
    """Raise botocore's and the network's exceptions as our error classes (a local file's
    OSError passes unchanged: it is not S3's)."""
    try:
        yield
    except (BotoCoreError, ClientError, HttpClientError, ConnectionError, TimeoutError) as exc:
        raise classify(exc) from exc


async def check_bucket(s3: Any, bucket: str) -> None:
    """Fail early: S3UnavailableError if S3 cannot answer, S3ConfigError for any refusal (a
    bucket that cannot be used is a configuration error whatever the code)."""
    try:
        with _classified():
            await s3.head_bucket(Bucket=bucket)
    except S3UnavailableError:
        raise
    except S3Error as exc:
        code = error_code(exc.__cause__) if exc.__cause__ else None
        name = code or type(exc.__cause__).__name__
        raise S3ConfigError(f"cannot use bucket {bucket}: {name}") from None


@dataclass(frozen=True)
class WriteOptions:
    """How objects are written: S3 Object Lock and server-side encryption with KMS."""

    lock_mode: str | None = None  # GOVERNANCE | COMPLIANCE
    retain_until: datetime | None = None
    kms_key_id: str | None = None

    def put_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.lock_mode:
            args["ObjectLockMode"] = self.lock_mode
            args["ObjectLockRetainUntilDate"] = self.retain_until
        if self.kms_key_id:
            args["ServerSideEncryption"] = "aws:kms"
            args["SSEKMSKeyId"] = self.kms_key_id
        return args


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in _NOT_FOUND


async def head(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object's HEAD response, or None when there is no such object."""
    with _classified():
        try:
            response: dict[str, Any] = await s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
    return response


async def get_bytes(s3: Any, bucket: str, key: str) -> bytes | None:
    with _classified():
        try:
            response = await s3.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        async with response["Body"] as body:
            data: bytes = await body.read()
    return data


async def download(s3: Any, bucket: str, key: str, path: Path) -> str | None:
    """Stream an object to ``path``; its SHA-256 (hex), or None when there is no such object."""
    with _classified():
        try:
            response = await s3.get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise
        digest = hashlib.sha256()
        with path.open("wb") as out:
            async with response["Body"] as body:
                while chunk := await body.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    return digest.hexdigest()


async def list_keys(s3: Any, bucket: str, prefix: str) -> AsyncIterator[str]:
    paginator = s3.get_paginator("list_objects_v2")
    # Only the listing's own errors pass through _classified: the caller's are not thrown in.
    with _classified():
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                yield item["Key"]


async def abort_stale_uploads(s3: Any, bucket: str, prefix: str) -> int:
    """Abort multipart uploads a crashed run left under ``prefix`` (they cost storage)."""
    aborted = 0
    with _classified():
        response = await s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        for upload in response.get("Uploads", ()):
            await s3.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            aborted += 1
    return aborted


async def upload_file(
    s3: Any,
    bucket: str,
    key: str,
    path: Path,
    *,
    metadata: dict[str, str],
    options: WriteOptions,
    part_size: int = PART_SIZE,
) -> None:
    """A multipart upload of ``path``, read a part at a time (memory: one part). The object
    appears only when the upload completes: a crash leaves no partial object."""
    with _classified():
        await _upload_file(s3, bucket, key, path, metadata, options, part_size)


async def _upload_file(
    s3: Any,
    bucket: str,
    key: str,
    path: Path,
    metadata: dict[str, str],
    options: WriteOptions,
    part_size: int,
) -> None:
    upload = await s3.create_multipart_upload(
        Bucket=bucket, Key=key, Metadata=metadata, **options.put_arguments()
    )
    upload_id = upload["UploadId"]
    try:
        parts = []
        with path.open("rb") as source:
            number = 1
            while True:
                data = source.read(part_size)
                if not data and number > 1:
                    break
                part = await s3.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
                number += 1
                if len(data) < part_size:
                    break
        await s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
        if options.lock_mode:
            # Stated again once the object exists: S3 applies it from CreateMultipartUpload,
            # but not every S3-compatible store does (moto, older MinIO), and an object that
            # should be locked and is not must not pass silently.
            await s3.put_object_retention(
                Bucket=bucket,
                Key=key,
                Retention={"Mode": options.lock_mode, "RetainUntilDate": options.retain_until},
            )
    except BaseException:
        # The original error is the one to raise; a failed abort leaves what a re-run aborts.
        with contextlib.suppress(Exception):
            await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


async def put_bytes(
    s3: Any, bucket: str, key: str, data: bytes, *, options: WriteOptions, content_type: str
) -> None:
    with _classified():
        await s3.put_object(
            Bucket=bucket, Key=key, Body=data, ContentType=content_type, **options.put_arguments()
        )
