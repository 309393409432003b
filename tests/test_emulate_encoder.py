"""Emulated records are what Aurora writes: the project's own decode layer reads them back
exactly, and the Encryption SDK message header is Aurora's (suite, framing, key provider)."""

from __future__ import annotations

import base64
import gzip
import os
import struct
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from ingest.decode import ActivityEvent, decode_record
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.model import FIELDS, Kind
from ingest.decode.normalize import parse_time
from ingest.emulate.encoder import (
    EncodeItem,
    EsdkEncryptor,
    encode_batch,
    encode_record,
)
from ingest.emulate.producer import DataKey, EmulateOptions, build_records
from ingest.emulate.traffic import InnerRecord, Traffic, decoded_event_key, record_keys
from ingest.errors import DecryptError

DECRYPTOR = EsdkDecryptor()
ENCRYPTOR = EsdkEncryptor()
DATA_KEY = bytes(range(32))
BLOB = b"\x01\x02\x03 kms ciphertext blob"


def expected_value(kind: Kind, raw: Any) -> Any:
    """What the decode layer should make of a generated wire value."""
    if raw is None:
        return None
    if kind is Kind.TIME:
        return parse_time(raw)
    return raw


def assert_same_event(decoded: ActivityEvent, generated: dict[str, Any], index: int) -> None:
    assert decoded.event_index == index
    assert decoded.extra == {}
    assert decoded.anomalies == ()
    for spec in FIELDS:
        assert decoded.column(spec.column) == expected_value(spec.kind, generated.get(spec.wire)), (
            spec.wire
        )


def assert_decodes_to(raw: bytes, record: InnerRecord, data_key: bytes = DATA_KEY) -> None:
    decoded = decode_record(raw, data_key, DECRYPTOR)
    assert decoded.record_version == record.version
    assert decoded.cluster_id == record.doc["clusterId"]
    assert decoded.instance_id == record.instance_id
    assert decoded.record_extra == {}
    records = [(i, e) for i, e in enumerate(record.events) if e["type"] == "record"]
    beats = [(i, e) for i, e in enumerate(record.events) if e["type"] == "heartbeat"]
    assert len(decoded.events) == len(records)
    for event, (index, generated) in zip(decoded.events, records, strict=True):
        assert_same_event(event, generated, index)
    assert [(h.event_index, h.log_time) for h in decoded.heartbeats] == [
        (i, parse_time(e["logTime"])) for i, e in beats
    ]
    assert [decoded_event_key(decoded.instance_id, e) for e in decoded.events] == list(
        record_keys(record)
    )


@pytest.mark.parametrize(
    ("engine", "pg_version"), [("both", "1.1"), ("postgres", "1.0"), ("mysql", "1.1")]
)
def test_records_decode_back_to_exactly_the_generated_events(engine: str, pg_version: str) -> None:
    traffic = Traffic(3, engine, pg_version=pg_version, instances=2, heartbeat_every=3)  # type: ignore[arg-type]
    records = list(traffic.records(6, 240))
    assert any(r.heartbeats for r in records)
    for record in records:
        assert_decodes_to(
            encode_record(record.doc, record.version, DATA_KEY, BLOB, ENCRYPTOR), record
        )


def test_outer_document_is_auroras() -> None:
    record = next(Traffic(1).records(4))
    raw = encode_record(record.doc, record.version, DATA_KEY, BLOB, ENCRYPTOR)
    outer = orjson.loads(raw)
    assert list(outer) == ["type", "version", "databaseActivityEvents", "key"]
    assert outer["type"] == "DatabaseActivityMonitoringRecords"
    assert outer["version"] == record.version
    assert base64.b64decode(outer["key"], validate=True) == BLOB
    message = base64.b64decode(outer["databaseActivityEvents"], validate=True)
    compressed = DECRYPTOR.decrypt(message, DATA_KEY)
    assert compressed[:3] == b"\x1f\x8b\x08"  # gzip, deflate
    assert gzip.decompress(compressed) == orjson.dumps(record.doc)


@dataclass
class Header:
    version: int
    message_type: int
    algorithm: int
    context: dict[bytes, bytes]
    keys: list[tuple[bytes, bytes, bytes]]  # (provider id, provider info, encrypted key)
    content_type: int
    iv_length: int
    frame_length: int


def parse_header(message: bytes) -> Header:
    """The Encryption SDK message header (format version 1), read by hand."""
    at = 0

    def take(n: int) -> bytes:
        nonlocal at
        chunk = message[at : at + n]
        assert len(chunk) == n
        at += n
        return chunk

    def u8() -> int:
        return int(take(1)[0])

    def u16() -> int:
        return int(struct.unpack(">H", take(2))[0])

    def u32() -> int:
        return int(struct.unpack(">I", take(4))[0])

    version, message_type, algorithm = u8(), u8(), u16()
    take(16)  # message id
    context: dict[bytes, bytes] = {}
    aad_length = u16()
    if aad_length:
        for _ in range(u16()):
            name = take(u16())
            context[name] = take(u16())
    keys = []
    for _ in range(u16()):
        keys.append((take(u16()), take(u16()), take(u16())))
    content_type = u8()
    assert take(4) == b"\x00\x00\x00\x00"  # reserved
    iv_length = u8()
    frame_length = u32()
    return Header(
        version, message_type, algorithm, context, keys, content_type, iv_length, frame_length
    )


def test_message_header_is_auroras() -> None:
    # Big enough for several frames, so the frame length is really exercised.
    record = next(Traffic(2).records(400))
    raw = encode_record(record.doc, record.version, DATA_KEY, BLOB, ENCRYPTOR)
    message = base64.b64decode(orjson.loads(raw)["databaseActivityEvents"])
    header = parse_header(message)
    assert (header.version, header.message_type) == (1, 0x80)
    assert header.algorithm == 0x0378  # AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384
    assert list(header.context) == [b"aws-crypto-public-key"]  # the signed suite's, nothing else
    assert len(header.keys) == 1
    provider_id, provider_info, encrypted_key = header.keys[0]
    assert provider_id == b"BC"
    # Raw AES keyring: key name, tag length in bits, IV length, IV.
    assert provider_info[:7] == b"DataKey"
    assert struct.unpack(">II", provider_info[7:15]) == (128, 12)
    assert len(provider_info) == 7 + 8 + 12
    assert len(encrypted_key) == 32 + 16  # the message's data key plus the GCM tag
    assert header.content_type == 2  # framed
    assert header.iv_length == 12
    assert header.frame_length == 4096
    assert len(gzip.compress(orjson.dumps(record.doc))) > 2 * 4096


def test_the_wrong_data_key_does_not_open_a_record() -> None:
    record = next(Traffic(1).records(3))
    raw = encode_record(record.doc, record.version, DATA_KEY, BLOB, ENCRYPTOR)
    with pytest.raises(DecryptError):
        decode_record(raw, bytes(32), DECRYPTOR)


def test_every_message_is_fresh() -> None:
    record = next(Traffic(1).records(3))
    first = encode_record(record.doc, record.version, DATA_KEY, BLOB, ENCRYPTOR)
    second = encode_record(record.doc, record.version, DATA_KEY, BLOB, ENCRYPTOR)
    assert first != second  # new message id, data key and IVs each time, as the SDK does
    assert_decodes_to(first, record)
    assert_decodes_to(second, record)


def test_encryptor_rejects_a_key_that_is_not_aes_256() -> None:
    with pytest.raises(ValueError, match="32"):
        ENCRYPTOR.encrypt(b"x", bytes(16))


def test_encode_batch_is_the_worker_entry_point() -> None:
    records = list(Traffic(4).records(5, 50))
    items = [EncodeItem(orjson.dumps(r.doc), r.version, DATA_KEY, BLOB) for r in records]
    for raw, record in zip(encode_batch(items), records, strict=True):
        assert_decodes_to(raw, record)


def test_build_records_rotates_data_keys_like_the_producer() -> None:
    options = EmulateOptions(
        stream="aws-rds-das-cluster-BUILD", count=120, events_per_record=4, rotate_every=7
    )
    asked: list[int] = []

    def data_key(n: int) -> DataKey:
        asked.append(n)
        return DataKey(os.urandom(32), f"blob-{n}".encode())

    built = build_records(options, data_key)
    assert len(built) == len(list(options.inner_records()))
    assert asked == list(range((len(built) + 6) // 7))
    for index, raw in enumerate(built):
        assert raw.data_key.blob == f"blob-{index // 7}".encode()
        assert raw.partition_key == raw.inner.instance_id
        assert raw.inner.doc["clusterId"] == "cluster-BUILD"
        assert_decodes_to(raw.data, raw.inner, raw.data_key.plaintext)
