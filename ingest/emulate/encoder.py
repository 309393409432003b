"""Encode a DAS record exactly as Aurora does (pure: no I/O).

inner document --orjson--> JSON --gzip--> Encryption SDK message --base64--> outer document::

    {"type": "DatabaseActivityMonitoringRecords", "version": "1.1",
     "databaseActivityEvents": "<base64 message>", "key": "<base64 KMS data key blob>"}

The message is what Aurora writes and what the consumer must open: one encrypted data key
wrapped by a raw AES-256-GCM master key, provider "BC", key id "DataKey" (the plaintext KMS data
key), framed with 4096-byte frames, in one of the two algorithm suites seen in the wild
(:data:`SUITES`): AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384 (0x0378: non-committing,
signed; Aurora MySQL reports it, and its ESDK encryption context holds only the signature's
public key) or AES_256_GCM_IV12_TAG16_HKDF_SHA256 (0x0178: non-committing, unsigned, with an
empty ESDK encryption context, as a captured Aurora PostgreSQL record has). The SDK refuses to
*encrypt* with a non-committing suite except under ``FORBID_ENCRYPT_ALLOW_DECRYPT``, so that is
the policy here (the consumer decrypts with ``REQUIRE_ENCRYPT_ALLOW_DECRYPT``).

:func:`encode_batch` is what producer worker processes run: plain bytes in and out, and one
encryptor per process, so nothing heavy crosses the process boundary.
"""

from __future__ import annotations

import base64
import gzip
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import aws_encryption_sdk
import orjson
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.identifiers import Algorithm

from ingest.decode.esdk import DataKeyProvider

OUTER_TYPE = "DatabaseActivityMonitoringRecords"
#: Algorithm suite ids as the message header carries them.
SIGNED_SUITE = 0x0378
UNSIGNED_SUITE = 0x0178
SUITES: dict[int, Algorithm] = {
    SIGNED_SUITE: Algorithm.AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384,
    UNSIGNED_SUITE: Algorithm.AES_256_GCM_IV12_TAG16_HKDF_SHA256,
}
ALGORITHM = SUITES[SIGNED_SUITE]


def default_suite(record_version: str) -> int:
    """The suite of the wild for a record version: Aurora PostgreSQL (1.0, 1.1) 0x0178, Aurora
    MySQL (1.2) 0x0378. The RDS engines (1.3, 1.4) are not documented either way: signed."""
    return UNSIGNED_SUITE if record_version in ("1.0", "1.1") else SIGNED_SUITE


FRAME_LENGTH = 4096
#: zlib's default level: what a stock gzip stream (JVM, Go, Python) writes when nobody tunes it.
GZIP_LEVEL = 6


class Encryptor(Protocol):
    """Seals plaintext into an Encryption SDK message under a raw AES data key."""

    def encrypt(self, plaintext: bytes, data_key: bytes) -> bytes: ...


class EsdkEncryptor:
    """The AWS Encryption SDK, set up as Aurora uses it; key providers cached per data key.

    Building a provider is cheap but not free, and Aurora reuses a data key for many records,
    so a small LRU keeps the current few warm.
    """

    def __init__(self, *, provider_cache_size: int = 16, suite: int = SIGNED_SUITE) -> None:
        self._client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT
        )
        self.suite = suite
        self._algorithm = SUITES[suite]
        self._providers: OrderedDict[bytes, DataKeyProvider] = OrderedDict()
        self._cache_size = provider_cache_size

    def _provider(self, data_key: bytes) -> DataKeyProvider:
        provider = self._providers.get(data_key)
        if provider is None:
            provider = self._providers[data_key] = DataKeyProvider(data_key)
            if len(self._providers) > self._cache_size:
                self._providers.popitem(last=False)
        else:
            self._providers.move_to_end(data_key)
        return provider

    def encrypt(self, plaintext: bytes, data_key: bytes) -> bytes:
        if len(data_key) != 32:
            raise ValueError(f"data key is {len(data_key)} bytes, expected 32 (AES-256)")
        message, _header = self._client.encrypt(
            source=plaintext,
            key_provider=self._provider(data_key),
            algorithm=self._algorithm,
            frame_length=FRAME_LENGTH,
        )
        return bytes(message)


def encode_payload(
    inner_json: bytes,
    version: str,
    data_key_plaintext: bytes,
    data_key_blob: bytes,
    encryptor: Encryptor,
) -> bytes:
    """The outer record for an already serialized inner document."""
    # mtime=0: the gzip header then carries no clock, so equal inputs compress to equal bytes.
    compressed = gzip.compress(inner_json, compresslevel=GZIP_LEVEL, mtime=0)
    message = encryptor.encrypt(compressed, data_key_plaintext)
    return orjson.dumps(
        {
            "type": OUTER_TYPE,
            "version": version,
            "databaseActivityEvents": base64.b64encode(message).decode("ascii"),
            "key": base64.b64encode(data_key_blob).decode("ascii"),
        }
    )


def encode_record(
    inner_doc: dict[str, Any],
    version: str,
    data_key_plaintext: bytes,
    data_key_blob: bytes,
    encryptor: Encryptor,
) -> bytes:
    """The Kinesis record data Aurora would write for ``inner_doc``."""
    return encode_payload(
        orjson.dumps(inner_doc), version, data_key_plaintext, data_key_blob, encryptor
    )


class EncodeItem(NamedTuple):
    """One record to encode, as shipped to a worker process (bytes only: cheap to pickle)."""

    inner_json: bytes
    version: str
    data_key_plaintext: bytes
    data_key_blob: bytes
    suite: int = SIGNED_SUITE


#: One encryptor per suite per worker process, by design.
_worker_encryptors: dict[int, EsdkEncryptor] = {}


def encryptor_for(suite: int, cache: dict[int, EsdkEncryptor]) -> EsdkEncryptor:
    encryptor = cache.get(suite)
    if encryptor is None:
        encryptor = cache[suite] = EsdkEncryptor(suite=suite)
    return encryptor


def encode_batch(items: Sequence[EncodeItem]) -> list[bytes]:
    """Encode many records with this process's encryptors (the process-pool entry point)."""
    return [
        encode_payload(
            item.inner_json,
            item.version,
            item.data_key_plaintext,
            item.data_key_blob,
            encryptor_for(item.suite, _worker_encryptors),
        )
        for item in items
    ]
