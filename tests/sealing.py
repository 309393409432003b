"""Test helper: seal an inner DAS document the way Aurora does (ESDK, signed suite, gzip)."""

from __future__ import annotations

import base64
import gzip

import aws_encryption_sdk
import orjson
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.identifiers import Algorithm

from ingest.decode.esdk import DataKeyProvider

_CLIENT = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT
)
SIGNED_SUITE = Algorithm.AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384


def seal_payload(inner: bytes, data_key: bytes, *, gzip_it: bool = True) -> bytes:
    plaintext = gzip.compress(inner) if gzip_it else inner
    message, _ = _CLIENT.encrypt(
        source=plaintext,
        key_provider=DataKeyProvider(data_key),
        algorithm=SIGNED_SUITE,
        frame_length=4096,
    )
    return bytes(message)


def outer_record(message: bytes, key_blob: bytes, version: str = "1.1") -> bytes:
    return orjson.dumps(
        {
            "type": "DatabaseActivityMonitoringRecords",
            "version": version,
            "databaseActivityEvents": base64.b64encode(message).decode(),
            "key": base64.b64encode(key_blob).decode(),
        }
    )


def seal(inner: bytes, data_key: bytes, version: str = "1.1", key_blob: bytes = b"blob") -> bytes:
    """A complete Kinesis record carrying ``inner`` (the decrypted JSON document)."""
    return outer_record(seal_payload(inner, data_key), key_blob, version)
