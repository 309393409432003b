"""The outer DAS document, exactly as it sits in the Kinesis record.

{"type": "DatabaseActivityMonitoringRecords", "version": "1.1",
 "databaseActivityEvents": "<base64 Encryption SDK message>", "key": "<base64 KMS blob>"}
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

import orjson
import pybase64

from ingest.errors import Base64Error, EnvelopeJsonError

OUTER_TYPE = "DatabaseActivityMonitoringRecords"
#: Record versions documented in the seed: 1.0 and 1.1 (Aurora PostgreSQL), 1.2 (Aurora MySQL).
KNOWN_VERSIONS = frozenset({"1.0", "1.1", "1.2"})

_NOT_DAS = "not a DAS record: expected the Database Activity Streams outer JSON document"


@dataclass(frozen=True, slots=True)
class Envelope:
    version: str
    payload_b64: str
    key_b64: str

    def key_blob(self) -> bytes:
        """The encrypted data key, as KMS Decrypt takes it."""
        return b64decode(self.key_b64, "key")

    def payload(self) -> bytes:
        """The Encryption SDK message."""
        return b64decode(self.payload_b64, "databaseActivityEvents")

    def __reduce__(self) -> tuple[type[Envelope], tuple[str, str, str]]:
        # Every record crosses to the decode pool as an Envelope: pickled as its constructor's
        # arguments, not through dataclasses' per-field __getstate__/__setstate__ (which cost
        # more per record, each way, than parsing the document again).
        return (Envelope, (self.version, self.payload_b64, self.key_b64))


def read_envelope(raw: bytes) -> Envelope:
    """Parse the outer document. Raises :class:`EnvelopeJsonError` for anything else."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise EnvelopeJsonError(f"record is not JSON ({len(raw)} bytes)", hint=_NOT_DAS) from None
    if not isinstance(doc, dict):
        raise EnvelopeJsonError(
            f"record is a JSON {type(doc).__name__}, not an object", hint=_NOT_DAS
        )
    kind = doc.get("type")
    if kind != OUTER_TYPE:
        raise EnvelopeJsonError(
            f"record type is {_describe(kind)}, not {OUTER_TYPE}", hint=_NOT_DAS
        )
    version = doc.get("version")
    if not isinstance(version, str):
        raise EnvelopeJsonError(f"record version is {_describe(version)}, not a string")
    if version.split(".", 1)[0] != "1":
        # Minor versions only add fields (kept in `extra`); a new major version may change
        # meaning, so it is dead-lettered until someone teaches us about it.
        raise EnvelopeJsonError(f"unsupported record version {version[:20]!r}")
    payload = doc.get("databaseActivityEvents")
    key = doc.get("key")
    if not isinstance(payload, str):
        raise EnvelopeJsonError(
            f"databaseActivityEvents is {_describe(payload)}, not a base64 string",
            hint="this looks like an already decrypted document"
            if isinstance(payload, dict)
            else None,
        )
    if not isinstance(key, str):
        raise EnvelopeJsonError(f"key is {_describe(key)}, not a base64 string")
    return Envelope(version=version, payload_b64=payload, key_b64=key)


def b64decode(text: str, what: str) -> bytes:
    try:
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Base64Error(f"{what} is not valid base64 ({len(text)} characters)") from None
    if not data:
        raise Base64Error(f"{what} is empty")
    return data


def _describe(value: object) -> str:
    if value is None:
        return "missing or null"
    if isinstance(value, str):
        return repr(value[:40])
    return f"a JSON {type(value).__name__}"
