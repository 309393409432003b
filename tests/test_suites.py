"""Both Encryption SDK suites seen in the wild, through both decryptors.

A captured Aurora PostgreSQL record uses 0x0178 (AES-256-GCM, HKDF-SHA256, no signature) with
an empty ESDK encryption context; Aurora MySQL reports 0x0378 (HKDF-SHA384, ECDSA P-384 signed,
the context holding only the public key). The emulator writes each engine's suite by default;
``--suite`` (EmulateOptions.suite) chooses one for all.
"""

from __future__ import annotations

import base64
import os

import orjson
import pytest

from bench.encoder import FastEncryptor
from ingest.decode.decryptors import make_decryptor
from ingest.decode.pipeline import decode_record
from ingest.emulate.encoder import SIGNED_SUITE, UNSIGNED_SUITE, EsdkEncryptor, encode_payload
from ingest.emulate.producer import DataKey, EmulateOptions, build_records
from ingest.errors import ConfigError, DecryptError
from tests.rds_examples import inner_document, oracle_event, sqlserver_event
from tests.test_emulate_encoder import parse_header

KEY = os.urandom(32)
DECRYPTORS = ("esdk", "lean")


def _suite_and_context(raw: bytes) -> tuple[int, list[bytes]]:
    message = base64.b64decode(orjson.loads(raw)["databaseActivityEvents"])
    header = parse_header(message)
    return header.algorithm, list(header.context)


def _key(_n: int) -> DataKey:
    return DataKey(KEY, b"blob")


@pytest.mark.parametrize(
    ("engine", "suite"), [("postgres", UNSIGNED_SUITE), ("mysql", SIGNED_SUITE)]
)
def test_the_emulator_writes_each_engines_suite_of_the_wild(engine: str, suite: int) -> None:
    options = EmulateOptions(stream="aws-rds-das-cluster-S", engine=engine, count=30)  # type: ignore[arg-type]
    records = build_records(options, _key)
    assert records
    for record in records:
        found, context = _suite_and_context(record.data)
        assert found == suite
        # 0x0178: an empty ESDK context; 0x0378: only the signature's public key.
        assert context == ([] if suite == UNSIGNED_SUITE else [b"aws-crypto-public-key"])


@pytest.mark.parametrize("suite", [UNSIGNED_SUITE, SIGNED_SUITE])
@pytest.mark.parametrize("decryptor", DECRYPTORS)
def test_both_suites_decode_through_both_decryptors(suite: int, decryptor: str) -> None:
    """Every engine's records, in either suite, decode alike through the SDK and the lean
    decryptor; the emulator's --suite applies to every engine."""
    options = EmulateOptions(stream="aws-rds-das-cluster-S", engine="both", count=60, suite=suite)
    built = build_records(options, _key)
    opener = make_decryptor(decryptor)
    for record in built:
        assert _suite_and_context(record.data)[0] == suite
        decoded = decode_record(record.data, KEY, opener)
        assert len(decoded.events) + len(decoded.heartbeats) == len(record.inner.events)
        assert decoded.record_version == record.inner.version
    # The RDS engines' documents too (the record version says which).
    for version, event in (("1.3", oracle_event()), ("1.4", sqlserver_event())):
        raw = encode_payload(
            inner_document("db-X", event), version, KEY, b"blob", EsdkEncryptor(suite=suite)
        )
        (stored,) = decode_record(raw, KEY, opener).events
        assert stored.anomalies == ()


@pytest.mark.parametrize("suite", [UNSIGNED_SUITE, SIGNED_SUITE])
def test_the_bench_encryptor_writes_both_suites_as_the_sdk_reads_them(suite: int) -> None:
    encryptor = FastEncryptor(suite=suite)
    raw = encode_payload(inner_document("db-X", oracle_event()), "1.3", KEY, b"b", encryptor)
    found, context = _suite_and_context(raw)
    assert found == suite
    assert context == ([] if suite == UNSIGNED_SUITE else [b"aws-crypto-public-key"])
    for decryptor in DECRYPTORS:
        (event,) = decode_record(raw, KEY, make_decryptor(decryptor)).events
        assert event.command == "CREATE TABLE"


@pytest.mark.parametrize("decryptor", DECRYPTORS)
def test_a_tampered_unsigned_message_is_refused(decryptor: str) -> None:
    """No signature, but GCM still authenticates every frame and the header."""
    raw = encode_payload(
        inner_document("db-X", oracle_event()),
        "1.3",
        KEY,
        b"b",
        FastEncryptor(suite=UNSIGNED_SUITE),
    )
    outer = orjson.loads(raw)
    message = bytearray(base64.b64decode(outer["databaseActivityEvents"]))
    message[-5] ^= 1
    outer["databaseActivityEvents"] = base64.b64encode(bytes(message)).decode()
    with pytest.raises(DecryptError):
        decode_record(orjson.dumps(outer), KEY, make_decryptor(decryptor))


def test_an_unknown_suite_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="suite must be one of 0x0378, 0x0178"):
        EmulateOptions(stream="aws-rds-das-cluster-S", suite=0x0214)
