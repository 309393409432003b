"""The pure decode layer: bytes in, typed events out. No asyncio, no boto, no database."""

from ingest.decode.envelope import Envelope, read_envelope
from ingest.decode.model import ActivityEvent, DecodedRecord, Heartbeat
from ingest.decode.pipeline import Decryptor, decode_envelope, decode_record

__all__ = [
    "ActivityEvent",
    "DecodedRecord",
    "Decryptor",
    "Envelope",
    "Heartbeat",
    "decode_envelope",
    "decode_record",
    "read_envelope",
]
