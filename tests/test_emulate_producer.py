"""The producer against real servers (kinesalite, moto KMS): every event lands exactly once,
under the data keys KMS issued for the cluster, in production order per partition key."""

from __future__ import annotations

import io
import math
from collections import Counter, defaultdict
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from ingest.cli import main as cli_main
from ingest.decode import decode_record
from ingest.decode.envelope import read_envelope
from ingest.decode.esdk import EsdkDecryptor
from ingest.emulate.cli import ProgressPrinter
from ingest.emulate.producer import (
    EmulateError,
    EmulateOptions,
    Entry,
    Progress,
    emulate,
    split_results,
)
from ingest.emulate.traffic import EventKey, decoded_event_key, format_datetime
from ingest.errors import ConfigError
from ingest.kms import encryption_context

DECRYPTOR = EsdkDecryptor()


def read_stream(stream: str) -> list[tuple[str, dict[str, Any]]]:
    """Every record of every shard from TRIM_HORIZON: (shard id, record)."""
    kinesis = boto3.client("kinesis")
    out: list[tuple[str, dict[str, Any]]] = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while iterator:
            response = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            out.extend((shard["ShardId"], record) for record in response["Records"])
            if not response["Records"] and response.get("MillisBehindLatest", 0) == 0:
                break
            iterator = response.get("NextShardIterator")
    return out


def decode_all(
    records: list[tuple[str, dict[str, Any]]], resource_id: str
) -> tuple[list[EventKey], dict[str, list[str]], set[bytes]]:
    """Keys of all events; per partition key, each record's first logTime in stream order
    (unique per instance, so it identifies the record); the data key blobs."""
    kms = boto3.client("kms")
    keys: list[EventKey] = []
    order: dict[str, list[str]] = defaultdict(list)
    plaintexts: dict[bytes, bytes] = {}
    # One partition key lives on one shard, where sequence numbers give the stream order.
    for _shard, record in sorted(records, key=lambda r: int(r[1]["SequenceNumber"])):
        envelope = read_envelope(record["Data"])
        blob = envelope.key_blob()
        if blob not in plaintexts:
            plaintexts[blob] = kms.decrypt(
                CiphertextBlob=blob, EncryptionContext=encryption_context(resource_id)
            )["Plaintext"]
        decoded = decode_record(record["Data"], plaintexts[blob], DECRYPTOR)
        assert decoded.instance_id == record["PartitionKey"]
        keys.extend(decoded_event_key(decoded.instance_id, e) for e in decoded.events)
        first = decoded.events[0].log_time if decoded.events else decoded.heartbeats[0].log_time
        assert first is not None
        order[record["PartitionKey"]].append(format_datetime(first))
    return keys, order, set(plaintexts)


async def test_every_event_lands_exactly_once(aws_env: dict[str, str]) -> None:
    options = EmulateOptions(
        stream="aws-rds-das-cluster-EXACTLYONCE",
        create_stream=True,
        shards=2,
        count=200,
        events_per_record=5,
        rotate_every=10,
        heartbeat_every=5,
    )
    seen: list[Progress] = []
    report = await emulate(options, progress=seen.append)

    expected_records = list(options.inner_records())
    expected_keys = options.traffic().expected_keys(5, 200)
    assert report.shards == 2
    assert (report.records, report.events) == (len(expected_records), 200)
    assert report.heartbeats == sum(r.heartbeats for r in expected_records) > 0
    assert report.data_keys == math.ceil(len(expected_records) / 10)
    assert (report.retried, report.reordered) == (0, 0)
    assert report.resource_id == "cluster-EXACTLYONCE"
    assert seen[-1].events == 200
    assert seen[-1].records == report.records

    records = read_stream(options.stream)
    assert len(records) == report.records
    assert {shard for shard, _ in records} == {"shardId-000000000000", "shardId-000000000001"}
    keys, order, blobs = decode_all(records, options.resource_id)
    assert Counter(keys) == Counter(expected_keys)  # every event, exactly once
    assert len(blobs) == report.data_keys
    produced: dict[str, list[str]] = defaultdict(list)
    for record in expected_records:
        produced[record.partition_key].append(record.events[0]["logTime"])
    assert order == produced  # each instance's records in production order

    # The data keys are bound to the cluster: another resource id cannot unwrap them.
    kms = boto3.client("kms")
    with pytest.raises(ClientError) as refused:
        kms.decrypt(
            CiphertextBlob=next(iter(blobs)),
            EncryptionContext=encryption_context("cluster-SOMEONEELSE"),
        )
    assert refused.value.response["Error"]["Code"] == "InvalidCiphertextException"


async def test_worker_processes_and_an_existing_key(aws_env: dict[str, str]) -> None:
    kms = boto3.client("kms")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    options = EmulateOptions(
        stream="aws-rds-das-cluster-POOL",
        create_stream=True,
        count=120,
        events_per_record=4,
        engine="mysql",
        kms_key_id=key_id,
        processes=2,
    )
    report = await emulate(options)
    assert report.kms_key_id == key_id
    keys, _order, _blobs = decode_all(read_stream(options.stream), options.resource_id)
    assert Counter(keys) == Counter(options.traffic().expected_keys(4, 120))


async def test_rate_is_respected(aws_env: dict[str, str]) -> None:
    options = EmulateOptions(
        stream="aws-rds-das-cluster-PACED",
        create_stream=True,
        count=60,
        events_per_record=3,
        rate=100.0,
        heartbeat_every=0,
    )
    report = await emulate(options)
    assert report.events == 60
    # The last record's 3 events may leave at 57/100 s; setup time comes on top.
    assert report.elapsed >= 0.57


async def test_a_missing_stream_is_a_clear_error(aws_env: dict[str, str]) -> None:
    with pytest.raises(EmulateError, match=r"does not exist.*--create-stream"):
        await emulate(EmulateOptions(stream="aws-rds-das-cluster-MISSING", count=1))


def test_cli_summary_and_errors(
    aws_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["emulate", "--stream", "aws-rds-das-cluster-CLI", "--count", "30", "--no-progress"]
    assert cli_main(args) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "Kinesis stream 'aws-rds-das-cluster-CLI' does not exist "
            "(pass --create-stream to create it)"
        )
    )
    assert cli_main([*args, "--create-stream", "--shards", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("emulate: ")
    assert "(30 events" in out
    assert "2 shards" in out
    assert err == ""
    assert cli_main([*args, "--events-per-record", "0"]) == 2
    assert "events per record" in capsys.readouterr().err


def test_cli_reports_an_unreachable_kms(
    aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:9")
    code = cli_main(
        ["emulate", "--stream", "aws-rds-das-cluster-NOKMS", "--create-stream", "--count", "5"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "KMS CreateKey unreachable" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# --- pure parts --------------------------------------------------------------------------------


def entry(key: str, n: int) -> Entry:
    return Entry(f"{key}-{n}".encode(), key, 1, 0)


def test_split_results_re_puts_failures_in_order_and_counts_overtaking() -> None:
    entries = [entry("a", 0), entry("b", 0), entry("a", 1), entry("a", 2), entry("b", 1)]
    ok: dict[str, str] = {"SequenceNumber": "1", "ShardId": "shardId-000000000000"}
    throttled = {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow"}
    outcome = split_results(entries, [ok, throttled, throttled, ok, ok])
    assert outcome.failed == [entries[1], entries[2]]
    assert outcome.succeeded == [entries[0], entries[3], entries[4]]
    # a-2 and b-1 are in the stream ahead of a-1 and b-0: counted, never sent twice.
    assert outcome.overtaken == 2
    clean = split_results(entries, [ok] * 5)
    assert (clean.failed, clean.overtaken) == ([], 0)
    tail = split_results(entries, [ok, ok, ok, throttled, throttled])
    assert (tail.failed, tail.overtaken) == (entries[3:], 0)
    with pytest.raises(EmulateError):
        split_results(entries, [ok])


def test_options_derive_the_resource_id_and_validate() -> None:
    assert EmulateOptions(stream="aws-rds-das-cluster-ABC").resource_id == "cluster-ABC"
    assert EmulateOptions(stream="mine", resource_id="cluster-X").resource_id == "cluster-X"
    for bad in (
        {"events_per_record": 0},
        {"rotate_every": 0},
        {"processes": 0},
        {"rate": -1.0},
        {"engine": "both", "instances": 1},
        {"instances": 65},
    ):
        with pytest.raises(ConfigError):
            EmulateOptions(stream="s", **bad)


def test_progress_printer_lines() -> None:
    buffer = io.StringIO()
    printer = ProgressPrinter(buffer, interval=0.0)
    printer(Progress(records=10, events=50, heartbeats=1, target_events=100, elapsed=2.0))
    printer(Progress(records=20, events=100, heartbeats=1, target_events=100, elapsed=4.0))
    printer.close()
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith(
        "[############............]  50% 50/100 events, 10 records, 5 records/s"
    )
    assert lines[1].startswith("[########################] 100% 100/100 events")
    assert len(lines) == 2
