"""A thin S3 adapter for the archive (aiobotocore): multipart uploads from a local file,
streamed downloads, listings, and the write options (Object Lock, SSE-KMS)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ingest.aws import error_code

#: Multipart part size: S3's minimum is 5 MiB (except the last part).
PART_SIZE = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")


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
    try:
        response: dict[str, Any] = await s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise
    return response


async def get_bytes(s3: Any, bucket: str, key: str) -> bytes | None:
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
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            yield item["Key"]


async def abort_stale_uploads(s3: Any, bucket: str, prefix: str) -> int:
    """Abort multipart uploads a crashed run left under ``prefix`` (they cost storage)."""
    aborted = 0
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
    await s3.put_object(
        Bucket=bucket, Key=key, Body=data, ContentType=content_type, **options.put_arguments()
    )
