"""The baseline: the Python consumer of the AWS documentation (the seed), run as written.

Per record: KMS Decrypt of the data key (no cache), a new raw master key provider, an
Encryption SDK decrypt, gunzip, JSON. Shards are read in turn with boto3, one GetRecords each
per round, exactly as ``main()`` of the seed's Python example. This is the yardstick, so it is
deliberately NOT optimized. Three departures, each needed to measure it at all:

- the shards are read from TRIM_HORIZON, not LATEST (the stream is filled before it starts);
- it stops once it has seen ``expected_records`` records (the seed's loop never ends);
- the decompressed payload is parsed with ``json.loads`` and dropped instead of printed
  (nothing is written anywhere, so no terminal or file I/O is measured).
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from dataclasses import dataclass
from typing import Any

import aws_encryption_sdk
import boto3
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

enc_client = aws_encryption_sdk.EncryptionSDKClient(
    commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT
)


class MyRawMasterKeyProvider(RawMasterKeyProvider):  # type: ignore[misc]
    provider_id = "BC"

    def __new__(cls, *args: Any, **kwargs: Any) -> MyRawMasterKeyProvider:
        obj = super(RawMasterKeyProvider, cls).__new__(cls)
        return obj  # type: ignore[no-any-return]  # noqa: RET504 - as in the seed

    def __init__(self, plain_key: bytes) -> None:
        RawMasterKeyProvider.__init__(self)
        self.wrapping_key = WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=plain_key,
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        )

    def _get_raw_key(self, key_id: Any) -> WrappingKey:
        return self.wrapping_key


def decrypt_payload(payload: bytes, data_key: bytes) -> bytes:
    my_key_provider = MyRawMasterKeyProvider(data_key)
    my_key_provider.add_master_key("DataKey")
    decrypted_plaintext, header = enc_client.decrypt(  # noqa: RUF059 - as in the seed
        source=payload,
        materials_manager=aws_encryption_sdk.materials_managers.default.DefaultCryptoMaterialsManager(
            master_key_provider=my_key_provider
        ),
    )
    return bytes(decrypted_plaintext)


def decrypt_decompress(payload: bytes, key: bytes) -> bytes:
    decrypted = decrypt_payload(payload, key)
    return zlib.decompress(decrypted, zlib.MAX_WBITS + 16)


@dataclass(frozen=True, slots=True)
class ReferenceResult:
    records: int
    events: int
    kms_calls: int
    seconds: float


def run_reference(
    stream_name: str, resource_id: str, expected_records: int, *, timeout: float = 3600.0
) -> ReferenceResult:
    """Consume ``stream_name`` from the start as the seed does, until ``expected_records``."""
    session = boto3.session.Session()
    kms = session.client("kms")
    kinesis = session.client("kinesis")
    started = time.perf_counter()
    records = events = kms_calls = 0

    response = kinesis.describe_stream(StreamName=stream_name)
    shard_iters = []
    for shard in response["StreamDescription"]["Shards"]:
        shard_iter_response = kinesis.get_shard_iterator(
            StreamName=stream_name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )
        shard_iters.append(shard_iter_response["ShardIterator"])

    while len(shard_iters) > 0 and records < expected_records:
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"reference consumer saw {records} of {expected_records} records")
        next_shard_iters = []
        for shard_iter in shard_iters:
            response = kinesis.get_records(ShardIterator=shard_iter, Limit=10000)
            for record in response["Records"]:
                record_data = record["Data"]
                record_data = json.loads(record_data)
                payload_decoded = base64.b64decode(record_data["databaseActivityEvents"])
                data_key_decoded = base64.b64decode(record_data["key"])
                data_key_decrypt_result = kms.decrypt(
                    CiphertextBlob=data_key_decoded,
                    EncryptionContext={"aws:rds:dbc-id": resource_id},
                )
                kms_calls += 1
                inner = json.loads(
                    decrypt_decompress(payload_decoded, data_key_decrypt_result["Plaintext"])
                )
                records += 1
                events += sum(
                    1 for e in inner["databaseActivityEventList"] if e.get("type") == "record"
                )
            if "NextShardIterator" in response:
                next_shard_iters.append(response["NextShardIterator"])
        shard_iters = next_shard_iters
    return ReferenceResult(records, events, kms_calls, time.perf_counter() - started)
