"""The records client's GetRecords parser (ingest.records_parser) gives what botocore gives.

Against kinesalite: the same page read through a stock client and through the fast one is the
same page, byte for byte. Without a server: answers with every kind of member, and answers the
fast path does not take (botocore's own parser then decides, errors included).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import secrets
from typing import Any

import orjson
import pytest
from aiobotocore.parsers import AioResponseParserFactory
from botocore.session import get_session

from das_dev.devstack import LocalStack
from ingest.aws import aws_client, session
from ingest.kinesis import KinesisReader
from ingest.records_parser import RecordsJSONParser, RecordsParserFactory

OUTPUT = get_session().get_service_model("kinesis").operation_model("GetRecords").output_shape


async def _both(body: bytes) -> tuple[Any, Any]:
    response = {"status_code": 200, "headers": {}, "body": body}
    stock = AioResponseParserFactory().create_parser("json")
    fast = RecordsParserFactory().create_parser("json")
    assert isinstance(fast, RecordsJSONParser)
    return await stock.parse(response, OUTPUT), await fast.parse(response, OUTPUT)


def _record(i: int, data: bytes) -> dict[str, Any]:
    return {
        "SequenceNumber": str(49_600_000_000_000_000_000_000 + i),
        "ApproximateArrivalTimestamp": 1_764_768_000.125 + i,
        "Data": base64.b64encode(data).decode(),
        "PartitionKey": f"pk-{i}",
        "EncryptionType": "KMS",
    }


async def test_every_member_is_parsed_as_botocore_parses_it() -> None:
    records = [_record(i, os.urandom(50 + i)) for i in range(20)]
    records[3]["PartitionKey"] = None  # null members are left out, as botocore leaves them
    records[4]["SomethingNew"] = {"a": 1}  # members the model does not know are dropped
    records[5]["ApproximateArrivalTimestamp"] = 1_764_768_000  # an integer epoch
    body = orjson.dumps(
        {
            "Records": records,
            "NextShardIterator": "AAAA" * 50,
            "MillisBehindLatest": 1200,
            "ChildShards": [
                {
                    "ShardId": "shardId-000000000002",
                    "ParentShards": ["shardId-000000000000"],
                    "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "99"},
                }
            ],
            "Unmodelled": True,
        }
    )
    stock, fast = await _both(body)
    assert fast == stock
    assert fast["Records"][0]["Data"] == base64.b64decode(records[0]["Data"])
    assert "PartitionKey" not in fast["Records"][3]
    assert "SomethingNew" not in fast["Records"][4]
    arrival = fast["Records"][5]["ApproximateArrivalTimestamp"]
    assert arrival.utcoffset() is not None
    assert arrival.timestamp() == 1_764_768_000


async def test_a_closed_shard_and_an_empty_page_are_parsed_alike() -> None:
    docs: list[dict[str, Any]] = [
        {"Records": [], "MillisBehindLatest": 0},
        {"Records": [], "NextShardIterator": None},
    ]
    for doc in docs:
        stock, fast = await _both(orjson.dumps(doc))
        assert fast == stock


async def test_answers_the_fast_path_does_not_take_get_botocores_answer() -> None:
    # Not base64: botocore raises, and so does the fast client (through botocore's parser).
    bad = orjson.dumps({"Records": [dict(_record(1, b"x"), Data="abc")]})
    response = {"status_code": 200, "headers": {}, "body": bad}
    for factory in (AioResponseParserFactory(), RecordsParserFactory()):
        with pytest.raises(binascii.Error):
            await factory.create_parser("json").parse(response, OUTPUT)
    # Base64 that is not strict (a line break, no padding) leaves the fast path: botocore's
    # lenient decoding gives both clients the same bytes.
    for loose in ("YWJj\nZGVm", "YWJjZA"):
        page = {"Records": [dict(_record(1, b"x"), Data=loose)]}
        response = {"status_code": 200, "headers": {}, "body": orjson.dumps(page)}
        found = []
        for factory in (AioResponseParserFactory(), RecordsParserFactory()):
            try:
                parsed = await factory.create_parser("json").parse(response, OUTPUT)
                found.append(parsed["Records"][0]["Data"])
            except binascii.Error as exc:
                found.append(type(exc))
        assert found[0] == found[1], loose
    # A record that is not an object, records that are not a list: botocore decides.
    for doc in ({"Records": [1]}, {"Records": {"a": 1}}, {"MillisBehindLatest": 5}):
        response = {"status_code": 200, "headers": {}, "body": orjson.dumps(doc)}
        outcomes = []
        for factory in (AioResponseParserFactory(), RecordsParserFactory()):
            try:
                outcomes.append(await factory.create_parser("json").parse(response, OUTPUT))
            except Exception as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1], doc


async def test_an_error_answer_is_botocores_error() -> None:
    body = orjson.dumps({"__type": "ExpiredIteratorException", "message": "Iterator expired"})
    response = {"status_code": 400, "headers": {}, "body": body}
    stock = await AioResponseParserFactory().create_parser("json").parse(response, OUTPUT)
    fast = await RecordsParserFactory().create_parser("json").parse(response, OUTPUT)
    assert fast == stock
    assert fast["Error"]["Code"] == "ExpiredIteratorException"


async def test_a_kinesalite_page_reads_the_same_through_both_clients(
    stack: LocalStack, aws_env: dict[str, str]
) -> None:
    stream = f"records-parser-{secrets.token_hex(4)}"
    payloads = [os.urandom(n) for n in (1, 100, 3000)] + [b'{"type": "x"}', b"\x00\xff" * 40]
    shared = session()  # as the worker shares one between its clients
    async with (
        aws_client("kinesis", session=shared) as stock,
        aws_client("kinesis", fast_records=True, session=shared) as fast,
        aws_client("kinesis", session=shared) as after,
    ):
        # The fast parser is the records client's alone, on a shared session too.
        parsers = [type(c._endpoint._response_parser_factory) for c in (stock, fast, after)]
        assert parsers == [AioResponseParserFactory, RecordsParserFactory, AioResponseParserFactory]
        await stock.create_stream(StreamName=stream, ShardCount=1)
        for _ in range(100):
            summary = await stock.describe_stream_summary(StreamName=stream)
            if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                break
            await asyncio.sleep(0.1)
        for i, data in enumerate(payloads):
            await stock.put_record(StreamName=stream, Data=data, PartitionKey=f"pk-{i}")
        shard = (await stock.list_shards(StreamName=stream))["Shards"][0]["ShardId"]
        iterator = (
            await stock.get_shard_iterator(
                StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        slow_page = await KinesisReader(stock, stream).get_records(iterator, 100)
        fast_page = await KinesisReader(fast, stream).get_records(iterator, 100)
        raw_slow = await stock.get_records(ShardIterator=iterator, Limit=100)
        raw_fast = await fast.get_records(ShardIterator=iterator, Limit=100)
        await stock.delete_stream(StreamName=stream)
    assert [r.data for r in fast_page.records] == payloads
    assert fast_page.records == slow_page.records
    assert fast_page.millis_behind_latest == slow_page.millis_behind_latest
    assert fast_page.next_iterator is not None
    assert slow_page.next_iterator is not None
    for answer in (raw_slow, raw_fast):
        answer.pop("ResponseMetadata")
        answer.pop("NextShardIterator")
    assert raw_fast == raw_slow
