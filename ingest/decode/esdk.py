"""Decrypt a DAS payload with the AWS Encryption SDK (the reference path).

Aurora encrypts each payload as an Encryption SDK message whose one encrypted data key is
wrapped with the KMS data key by a raw AES-256-GCM keyring, provider id "BC", key id "DataKey",
using the non-committing signed suite AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384. Decrypting
non-committing messages needs the REQUIRE_ENCRYPT_ALLOW_DECRYPT commitment policy.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import aws_encryption_sdk
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError
from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider
from cryptography.exceptions import InvalidTag

from ingest.errors import DecryptError

PROVIDER_ID = "BC"
KEY_ID = b"DataKey"
#: Aurora writes one encrypted data key per message; a message with many is hostile.
MAX_ENCRYPTED_DATA_KEYS = 4

_HINT_KEY = (
    "wrong data key, or an altered message: the record's key and payload do not belong "
    "together, or the message was not written by Aurora's raw AES keyring (BC/DataKey)"
)


class DataKeyProvider(RawMasterKeyProvider):  # type: ignore[misc]
    """Raw master key provider "BC" holding one plaintext data key as "DataKey"."""

    provider_id = PROVIDER_ID

    # MasterKeyProvider.__new__ takes no arguments; bypass it as the SDK's own examples do.
    def __new__(cls, *args: Any, **kwargs: Any) -> DataKeyProvider:
        return super(RawMasterKeyProvider, cls).__new__(cls)  # type: ignore[no-any-return]

    def __init__(self, data_key: bytes) -> None:
        RawMasterKeyProvider.__init__(self)
        self._wrapping_key = WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=data_key,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )
        self.add_master_key(KEY_ID)

    def _get_raw_key(self, key_id: bytes) -> WrappingKey:
        return self._wrapping_key


class EsdkDecryptor:
    """Decrypts Encryption SDK messages; keeps a few key providers warm per process."""

    name = "esdk"

    def __init__(self, *, provider_cache_size: int = 64) -> None:
        self._client = aws_encryption_sdk.EncryptionSDKClient(
            commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT,
            max_encrypted_data_keys=MAX_ENCRYPTED_DATA_KEYS,
        )
        self._providers: OrderedDict[bytes, DataKeyProvider] = OrderedDict()
        self._cache_size = provider_cache_size

    def _provider(self, data_key: bytes) -> DataKeyProvider:
        provider = self._providers.get(data_key)
        if provider is None:
            provider = DataKeyProvider(data_key)
            self._providers[data_key] = provider
            if len(self._providers) > self._cache_size:
                self._providers.popitem(last=False)
        else:
            self._providers.move_to_end(data_key)
        return provider

    def decrypt(self, message: bytes, data_key: bytes) -> bytes:
        if len(data_key) != 32:
            raise DecryptError(f"data key is {len(data_key)} bytes, expected 32 (AES-256)")
        source = io.BytesIO(message)
        try:
            with self._client.stream(
                mode="d", source=source, key_provider=self._provider(data_key)
            ) as decryptor:
                plaintext = decryptor.read()
        except AWSEncryptionSDKClientError as exc:
            raise DecryptError(_describe_sdk_error(exc), hint=_hint_for(exc)) from None
        except InvalidTag:
            raise DecryptError("authentication failed (AES-GCM tag)", hint=_HINT_KEY) from None
        except Exception as exc:  # noqa: BLE001 - the SDK raises many types on hostile input
            raise DecryptError(f"malformed Encryption SDK message ({type(exc).__name__})") from None
        # The SDK stops reading after the footer; the message format says unprocessed bytes
        # must fail, and so does the lean decryptor.
        if source.tell() != len(message):
            raise DecryptError(
                f"{len(message) - source.tell()} bytes of trailing data after the message"
            )
        return bytes(plaintext)


def _describe_sdk_error(exc: AWSEncryptionSDKClientError) -> str:
    # SDK messages name algorithms and sizes, never plaintext; keep them short.
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _hint_for(exc: AWSEncryptionSDKClientError) -> str | None:
    name = type(exc).__name__
    if name in {"DecryptKeyError", "MasterKeyProviderError", "IncorrectMasterKeyError"}:
        return _HINT_KEY
    if name == "SerializationError":
        return "not an Encryption SDK message, or a truncated one"
    return None
