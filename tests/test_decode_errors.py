"""Every decode failure is a typed error naming its stage and whether it is retriable."""

from __future__ import annotations

import base64
import gzip
import os
import pickle

import orjson
import pytest

from ingest.decode import decode_record, read_envelope
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.gunzip import gunzip
from ingest.errors import (
    Base64Error,
    DecodeError,
    DecompressError,
    DecryptError,
    EnvelopeJsonError,
    KmsUnavailableError,
    NormalizeError,
    ParseError,
    Stage,
)
from tests.sealing import outer_record, seal, seal_payload

DECRYPTOR = EsdkDecryptor()
KEY = os.urandom(32)
GOOD_INNER = orjson.dumps(
    {
        "type": "DatabaseActivityMonitoringRecord",
        "clusterId": "cluster-A",
        "instanceId": "db-B",
        "databaseActivityEventList": [{"type": "record", "command": "SELECT"}],
    }
)


def decode(raw: bytes) -> object:
    return decode_record(raw, KEY, DECRYPTOR)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"type": "Something"}',
        b'{"type": "DatabaseActivityMonitoringRecords", "databaseActivityEvents": "x", "key": "y"}',
        b'{"type": "DatabaseActivityMonitoringRecords", "version": "1.1", "key": "eQ=="}',
        b'{"type": "DatabaseActivityMonitoringRecords", "version": "1.1",'
        b' "databaseActivityEvents": "eQ==", "key": 5}',
        b'{"type": "DatabaseActivityMonitoringRecords", "version": "1.1",'
        b' "databaseActivityEvents": {"type": "DatabaseActivityMonitoringRecord"}, "key": "x"}',
    ],
)
def test_not_a_das_record(raw: bytes) -> None:
    with pytest.raises(EnvelopeJsonError) as info:
        decode(raw)
    assert info.value.stage is Stage.JSON
    assert not info.value.retriable


def test_already_decrypted_document_gets_a_hint() -> None:
    raw = orjson.dumps(
        {
            "type": "DatabaseActivityMonitoringRecords",
            "version": "1.1",
            "databaseActivityEvents": {"type": "DatabaseActivityMonitoringRecord"},
            "key": "x",
        }
    )
    with pytest.raises(EnvelopeJsonError, match="already decrypted"):
        decode(raw)


@pytest.mark.parametrize("bad", ["not base64!", "QUJD=QUJD", ""])
def test_bad_base64(bad: str) -> None:
    raw = orjson.dumps(
        {
            "type": "DatabaseActivityMonitoringRecords",
            "version": "1.1",
            "databaseActivityEvents": bad,
            "key": "a2V5",
        }
    )
    with pytest.raises(Base64Error) as info:
        decode(raw)
    assert info.value.stage is Stage.BASE64
    with pytest.raises(Base64Error):
        read_envelope(raw.replace(b'"a2V5"', b'"%%%"')).key_blob()


def test_wrong_data_key() -> None:
    with pytest.raises(DecryptError) as info:
        decode_record(seal(GOOD_INNER, KEY), os.urandom(32), DECRYPTOR)
    assert info.value.stage is Stage.DECRYPT
    assert info.value.hint is not None
    assert "data key" in info.value.hint


def test_truncated_message() -> None:
    message = seal_payload(GOOD_INNER, KEY)
    with pytest.raises(DecryptError):
        decode(outer_record(message[: len(message) // 2], b"k"))


def test_not_an_esdk_message() -> None:
    with pytest.raises(DecryptError) as info:
        decode(outer_record(b"\x01\x80" + os.urandom(200), b"k"))
    assert info.value.stage is Stage.DECRYPT


def test_payload_not_gzip() -> None:
    message = seal_payload(GOOD_INNER, KEY, gzip_it=False)
    with pytest.raises(DecompressError, match="not gzip") as info:
        decode(outer_record(message, b"k"))
    assert info.value.stage is Stage.DECOMPRESS


def test_gzip_bomb_is_capped() -> None:
    bomb = gzip.compress(b"\x00" * (4 * 1024 * 1024))
    assert len(bomb) < 10_000
    with pytest.raises(DecompressError, match="cap"):
        gunzip(bomb, max_size=1024 * 1024)
    assert gunzip(bomb, max_size=4 * 1024 * 1024) == b"\x00" * (4 * 1024 * 1024)
    raw = outer_record(seal_payload(bomb, KEY, gzip_it=False), b"k")
    with pytest.raises(DecompressError, match="cap"):
        decode_record(raw, KEY, DECRYPTOR, max_decompressed=1024 * 1024)


@pytest.mark.parametrize(
    "data",
    [
        gzip.compress(b"x")[:-3],
        gzip.compress(b"x") + b"trailing",
        b"\x1f\x8b" + os.urandom(30),
    ],
)
def test_corrupt_gzip(data: bytes) -> None:
    with pytest.raises(DecompressError):
        gunzip(data)


@pytest.mark.parametrize(
    "inner",
    [b"not json", b'{"a": ', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{"],
)
def test_inner_not_json(inner: bytes) -> None:
    with pytest.raises(ParseError) as info:
        decode(seal(inner, KEY))
    assert info.value.stage is Stage.PARSE


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"type": "Other", "databaseActivityEventList": []},
        {"type": "DatabaseActivityMonitoringRecord"},
        {"type": "DatabaseActivityMonitoringRecord", "databaseActivityEventList": {}},
        {"type": "DatabaseActivityMonitoringRecord", "databaseActivityEventList": [1]},
        {
            "type": "DatabaseActivityMonitoringRecord",
            "clusterId": 5,
            "databaseActivityEventList": [],
        },
    ],
)
def test_inner_not_a_das_event_list(doc: object) -> None:
    with pytest.raises(NormalizeError) as info:
        decode(seal(orjson.dumps(doc), KEY))
    assert info.value.stage is Stage.NORMALIZE


def test_deeply_nested_unknown_field_is_refused_not_crashing() -> None:
    nested: object = "x"
    for _ in range(200):
        nested = {"a": nested}
    doc = {
        "type": "DatabaseActivityMonitoringRecord",
        "databaseActivityEventList": [{"type": "record", "deep": nested}],
    }
    with pytest.raises(NormalizeError, match="nested deeper"):
        decode(seal(orjson.dumps(doc), KEY))


def test_errors_pickle_across_the_process_pool() -> None:
    for error in (
        DecryptError("bad tag", hint="wrong key"),
        KmsUnavailableError("KMS ThrottlingException"),
    ):
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert clone.retriable == error.retriable


def test_only_unavailability_is_retriable() -> None:
    assert KmsUnavailableError.retriable
    for cls in (EnvelopeJsonError, Base64Error, DecryptError, DecompressError, ParseError):
        assert not cls.retriable
        assert issubclass(cls, DecodeError)


def test_error_messages_never_contain_the_sql() -> None:
    secret = "select password from users where name='alice'"
    doc = {
        "type": "DatabaseActivityMonitoringRecord",
        "databaseActivityEventList": [{"type": "record"}, secret],
    }
    with pytest.raises(NormalizeError) as info:
        decode(seal(orjson.dumps(doc), KEY))
    assert "alice" not in str(info.value)
    assert "event 1 is a JSON str" in str(info.value)
    raw = base64.b64encode(secret.encode())
    with pytest.raises(EnvelopeJsonError) as info2:
        decode(raw)
    assert "alice" not in str(info2.value)
