"""decode_record: bytes in, typed events out. Pure: no asyncio, no boto, no database.

The caller supplies the plaintext data key (the KMS step is I/O and lives in ``ingest.kms``), so
this function is what the process pool runs, what ``das-ingest decrypt`` prints and what the
property tests hammer.
"""

from __future__ import annotations

from typing import Protocol

from ingest.decode.envelope import Envelope, read_envelope
from ingest.decode.gunzip import DEFAULT_MAX_DECOMPRESSED, gunzip
from ingest.decode.model import DecodedRecord
from ingest.decode.normalize import decode_payload
from ingest.errors import NormalizeError


class Decryptor(Protocol):
    """Opens an Encryption SDK message with a raw AES data key ("BC"/"DataKey")."""

    name: str

    def decrypt(self, message: bytes, data_key: bytes) -> bytes: ...


def decode_envelope(
    envelope: Envelope,
    data_key: bytes,
    decryptor: Decryptor,
    *,
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
) -> DecodedRecord:
    plaintext = decryptor.decrypt(envelope.payload(), data_key)
    inner = gunzip(plaintext, max_decompressed)
    try:
        return decode_payload(inner, envelope.version)
    except RecursionError:
        # orjson refuses deep nesting itself (ParseError); only normalizing can recurse.
        raise NormalizeError("payload JSON is nested too deeply") from None


def decode_record(
    raw: bytes,
    data_key: bytes,
    decryptor: Decryptor,
    *,
    max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
) -> DecodedRecord:
    """Decode one Kinesis record whose data key the caller already decrypted."""
    return decode_envelope(
        read_envelope(raw), data_key, decryptor, max_decompressed=max_decompressed
    )
