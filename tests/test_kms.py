"""The KMS data-key cache against a real KMS API server (moto)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ingest.aws import aws_client
from ingest.errors import KmsError, KmsUnavailableError, Stage
from ingest.kms import (
    REFUSAL_MESSAGE,
    DataKeyCache,
    classify,
    encryption_context,
    resource_id_from_stream,
)

pytestmark = pytest.mark.usefixtures("aws_env")
CONTEXT = encryption_context("cluster-ABC")


@pytest.fixture
async def kms() -> AsyncIterator[Any]:
    async with aws_client("kms") as client:
        yield client


async def data_key(kms: Any, context: dict[str, str] = CONTEXT) -> tuple[bytes, bytes]:
    key_id = (await kms.create_key())["KeyMetadata"]["KeyId"]
    response = await kms.generate_data_key(
        KeyId=key_id, KeySpec="AES_256", EncryptionContext=context
    )
    return response["Plaintext"], response["CiphertextBlob"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_resource_id_comes_from_the_stream_name() -> None:
    assert resource_id_from_stream("aws-rds-das-cluster-ABCD123456") == "cluster-ABCD123456"
    assert resource_id_from_stream("my-own-stream") == "my-own-stream"
    assert encryption_context("cluster-X") == {"aws:rds:dbc-id": "cluster-X"}
    # RDS DB instances (RDS for Oracle, RDS for SQL Server) bind data keys to their DbiResourceId.
    assert encryption_context("db-ABC123") == {"aws:rds:db-id": "db-ABC123"}
    assert encryption_context("database-1") == {"aws:rds:dbc-id": "database-1"}


async def test_decrypts_once_then_serves_from_the_cache(kms: Any) -> None:
    plaintext, blob = await data_key(kms)
    cache = DataKeyCache(kms)
    assert await cache.get(blob, CONTEXT) == plaintext
    assert await cache.get(blob, CONTEXT) == plaintext
    assert (cache.stats.calls, cache.stats.hits, cache.stats.misses) == (1, 1, 1)
    assert "entries=1" in repr(cache)
    assert plaintext.hex() not in repr(cache)


async def test_concurrent_misses_make_a_single_call(kms: Any) -> None:
    plaintext, blob = await data_key(kms)
    cache = DataKeyCache(kms)
    keys = await asyncio.gather(*(cache.get(blob, CONTEXT) for _ in range(20)))
    assert keys == [plaintext] * 20
    assert cache.stats.calls == 1


async def test_one_lookup_for_many_records_counts_each_record(kms: Any) -> None:
    """The consumer looks a data key up once for all of a chunk's records under it (uses=n):
    the statistics (das_kms_cache_hits_total, das_kms_refused_total) still count records."""
    plaintext, blob = await data_key(kms)
    cache = DataKeyCache(kms)
    assert await cache.get(blob, CONTEXT, uses=5) == plaintext
    assert (cache.stats.calls, cache.stats.misses, cache.stats.hits) == (1, 1, 4)
    assert await cache.get(blob, CONTEXT, uses=3) == plaintext
    assert (cache.stats.calls, cache.stats.misses, cache.stats.hits) == (1, 1, 7)
    together = await asyncio.gather(
        cache.get(blob, encryption_context("cluster-OTHER"), uses=4),
        cache.get(blob, encryption_context("cluster-OTHER"), uses=2),
        return_exceptions=True,
    )
    assert all(isinstance(e, KmsError) and not e.retriable for e in together)
    # one refusal from KMS (shared by both lookups), five records refused from memory
    assert (cache.stats.calls, cache.stats.refused, cache.stats.refused_cached) == (2, 1, 5)
    with pytest.raises(KmsError):
        await cache.get(blob, encryption_context("cluster-OTHER"), uses=3)
    assert (cache.stats.calls, cache.stats.refused, cache.stats.refused_cached) == (2, 1, 8)


async def test_wrong_context_is_permanent_and_remembered_briefly(kms: Any) -> None:
    _, blob = await data_key(kms)
    clock = Clock()
    cache = DataKeyCache(kms, clock=clock, negative_ttl_seconds=30)
    wrong = encryption_context("cluster-OTHER")
    with pytest.raises(KmsError) as info:
        await cache.get(blob, wrong)
    assert not info.value.retriable
    assert info.value.stage is Stage.KMS
    assert "InvalidCiphertextException" in str(info.value)
    assert info.value.hint is not None
    assert "resource id" in info.value.hint
    with pytest.raises(KmsError):
        await cache.get(blob, wrong)
    assert cache.stats.calls == 1  # the refusal was remembered
    clock.now += 31
    with pytest.raises(KmsError):
        await cache.get(blob, wrong)
    assert cache.stats.calls == 2


async def test_refusals_are_bounded_logged_once_per_key_and_counted(
    kms: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong resource id for an instance's stream (db-…, aws:rds:db-id): each refused data
    key costs one KMS call and one log line naming the likely cause, however many records use
    it; the memory of refusals is bounded (least recently used forgotten first)."""
    clock = Clock()
    right = encryption_context("db-RIGHT")
    wrong = encryption_context("db-WRONG")
    assert wrong == {"aws:rds:db-id": "db-WRONG"}
    cache = DataKeyCache(kms, max_refused=2, negative_ttl_seconds=60, clock=clock)
    blobs = [(await data_key(kms, right))[1] for _ in range(3)]
    caplog.set_level("WARNING", logger="ingest")
    for _ in range(50):  # 50 records sharing the first data key
        with pytest.raises(KmsError):
            await cache.get(blobs[0], wrong)
    assert (cache.stats.calls, cache.stats.refused, cache.stats.refused_cached) == (1, 1, 49)
    refusals = [r for r in caplog.records if r.getMessage() == REFUSAL_MESSAGE]
    assert len(refusals) == 1
    logged = refusals[0].__dict__
    assert "resource id" in logged["likely_cause"]
    assert logged["encryption_context"] == {"aws:rds:db-id": "db-WRONG"}
    assert "InvalidCiphertextException" in logged["error"]
    for blob in blobs[1:]:
        with pytest.raises(KmsError):
            await cache.get(blob, wrong)
    assert cache.stats.calls == 3
    assert cache.refused_keys == 2  # bounded: the first key's refusal was forgotten
    with pytest.raises(KmsError):
        await cache.get(blobs[0], wrong)
    assert cache.stats.calls == 4
    # ... but not logged a second time: once per key.
    assert len([r for r in caplog.records if r.getMessage() == REFUSAL_MESSAGE]) == 3
    # The right context still decrypts (a refusal never poisons another context).
    assert len(await cache.get(blobs[0], right)) == 32
    clock.now += 61
    assert cache.refused_keys == 0


async def test_entries_expire_and_the_cache_is_bounded(kms: Any) -> None:
    clock = Clock()
    cache = DataKeyCache(kms, max_entries=2, ttl_seconds=60, clock=clock)
    keys = [await data_key(kms) for _ in range(3)]
    for plaintext, blob in keys:
        assert await cache.get(blob, CONTEXT) == plaintext
    assert len(cache) == 2
    assert cache.stats.calls == 3
    await cache.get(keys[2][1], CONTEXT)  # newest: still cached
    assert cache.stats.calls == 3
    await cache.get(keys[0][1], CONTEXT)  # evicted: decrypted again
    assert cache.stats.calls == 4
    clock.now += 61
    await cache.get(keys[0][1], CONTEXT)
    assert cache.stats.calls == 5


async def test_the_digest_covers_blob_and_context() -> None:
    a = DataKeyCache.digest(b"blob", {"aws:rds:dbc-id": "x"})
    assert a == DataKeyCache.digest(b"blob", {"aws:rds:dbc-id": "x"})
    assert a != DataKeyCache.digest(b"blob", {"aws:rds:dbc-id": "y"})
    assert a != DataKeyCache.digest(b"blob2", {"aws:rds:dbc-id": "x"})
    # Length-prefixed: no ambiguity between where the blob ends and the context begins.
    assert DataKeyCache.digest(b"ab", {"c": "d"}) != DataKeyCache.digest(b"a", {"bc": "d"})


async def test_unreachable_kms_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once we leave: connections are refused
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", f"http://127.0.0.1:{port}")
    async with aws_client("kms") as kms:
        cache = DataKeyCache(kms)
        with pytest.raises(KmsUnavailableError) as info:
            await cache.get(b"blob", CONTEXT)
    assert info.value.retriable


@pytest.mark.parametrize(
    ("code", "status", "retriable"),
    [
        ("ThrottlingException", 400, True),
        ("KMSInternalException", 500, True),
        ("DependencyTimeoutException", 503, True),
        ("SomethingNew", 503, True),
        ("InvalidCiphertextException", 400, False),
        ("IncorrectKeyException", 400, False),
        ("AccessDeniedException", 400, False),
        ("DisabledException", 400, False),
    ],
)
def test_classification_of_kms_answers(code: str, status: int, retriable: bool) -> None:
    exc = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Decrypt",
    )
    error = classify(exc)
    assert error.retriable is retriable
    assert isinstance(error, KmsUnavailableError) is retriable
    assert code in str(error)
