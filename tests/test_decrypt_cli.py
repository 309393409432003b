"""`das-ingest decrypt` through real KMS: events as JSON lines, clear per-line errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from ingest.emulate.producer import DataKey, EmulateOptions, build_records
from ingest.emulate.traffic import record_keys
from tests.cli_helpers import das_ingest
from tests.faults import AwsError, ErrorRule, FaultProxy, HttpFaults
from tests.sealing import outer_record, seal_payload

pytestmark = pytest.mark.usefixtures("aws_env")
STREAM = "aws-rds-das-cluster-DECRYPTME"


def records(aws_env: dict[str, str], count: int = 30) -> list[Any]:
    kms = boto3.client("kms", endpoint_url=aws_env["AWS_ENDPOINT_URL_KMS"])
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]

    def data_key(_: int) -> DataKey:
        response = kms.generate_data_key(
            KeyId=key_id,
            KeySpec="AES_256",
            EncryptionContext={"aws:rds:dbc-id": "cluster-DECRYPTME"},
        )
        return DataKey(response["Plaintext"], response["CiphertextBlob"])

    options = EmulateOptions(
        stream=STREAM, count=count, events_per_record=5, rotate_every=3, heartbeat_every=2
    )
    return build_records(options, data_key)


async def test_prints_every_event_and_reports_bad_lines(
    tmp_path: Path, aws_env: dict[str, str]
) -> None:
    built = records(aws_env)
    lines = [r.data for r in built]
    lines.insert(2, b"this is not a record")
    lines.insert(5, base64.b64encode(built[0].data))  # as `aws kinesis get-records` prints
    lines.insert(7, b"")
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    result = await das_ingest("decrypt", "--stream", STREAM, str(path))
    assert result.returncode == 1  # one line failed
    assert "line 3: json: record is not JSON" in result.stderr
    assert "not a DAS record" in result.stderr
    assert "1 record(s) failed" in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    want = [k for r in built for k in record_keys(r.inner)]
    first_record = list(record_keys(built[0].inner))
    assert len(events) == len(want) + len(first_record)  # record 0 appears twice
    assert {e["type"] for e in events} == {"record"}
    got = {
        (e["instance_id"], e["session_id"], e["statement_id"], e["substatement_id"], e["class"])
        for e in events
    }
    assert got == {
        (k.instance_id, k.session_id, k.statement_id, k.substatement_id, k.class_) for k in want
    }
    assert {e["cluster_id"] for e in events} == {"cluster-DECRYPTME"}
    assert all(e["line"] >= 1 for e in events)


async def test_heartbeats_raw_and_the_sdk_decryptor(
    tmp_path: Path, aws_env: dict[str, str]
) -> None:
    built = records(aws_env, count=20)
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(r.data for r in built) + b"\n")
    beats = sum(r.inner.heartbeats for r in built)
    assert beats > 0

    with_beats = await das_ingest(
        "decrypt", "--resource-id", "cluster-DECRYPTME", "--include-heartbeats", str(path)
    )
    assert with_beats.returncode == 0, with_beats.stderr
    kinds = [json.loads(line)["type"] for line in with_beats.stdout.splitlines()]
    assert kinds.count("heartbeat") == beats
    assert kinds.count("record") == 20

    raw = await das_ingest("decrypt", "--stream", STREAM, "--raw", str(path))
    assert raw.returncode == 0, raw.stderr
    docs = [json.loads(line) for line in raw.stdout.splitlines()]
    assert docs == [r.inner.doc for r in built]

    sdk = await das_ingest("decrypt", "--stream", STREAM, "--decryptor", "esdk", str(path))
    lean = await das_ingest("decrypt", "--stream", STREAM, str(path))
    assert sdk.returncode == lean.returncode == 0
    assert sdk.stdout == lean.stdout


async def test_wrong_resource_id_names_the_likely_cause(
    tmp_path: Path, aws_env: dict[str, str]
) -> None:
    built = records(aws_env, count=5)
    path = tmp_path / "one.jsonl"
    path.write_bytes(built[0].data + b"\n")
    result = await das_ingest("decrypt", "--resource-id", "cluster-WRONG", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "line 1: kms:" in result.stderr
    assert "InvalidCiphertextException" in result.stderr
    assert "resource id" in result.stderr


async def test_needs_a_resource_id_or_stream() -> None:
    result = await das_ingest("decrypt")
    assert result.returncode == 2
    assert "one of the arguments --resource-id --stream is required" in result.stderr


async def test_skip_signature_verification_needs_the_lean_decryptor(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    result = await das_ingest(
        "decrypt",
        "--stream",
        STREAM,
        "--decryptor",
        "esdk",
        "--skip-signature-verification",
        str(path),
    )
    assert result.returncode == 2
    assert "needs --decryptor lean" in result.stderr
    assert "Traceback" not in result.stderr


def with_events(aws_env: dict[str, str], count: int) -> list[Any]:
    """Built records that carry events (records() mixes in heartbeat-only ones)."""
    return [r for r in records(aws_env, count=count) if r.inner.record_events]


async def test_reads_records_piped_to_stdin(aws_env: dict[str, str]) -> None:
    built = with_events(aws_env, 20)
    assert len(built) >= 3
    piped = b"\n".join([built[0].data, b"not a record", *(r.data for r in built[1:])]) + b"\n"
    result = await das_ingest("decrypt", "--stream", STREAM, stdin=piped)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("line 2: json: record is not JSON")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == sum(r.inner.record_events for r in built)
    assert all("file" not in e for e in events)  # stdin has no name
    assert {e["line"] for e in events} == {1, *range(3, len(built) + 2)}


async def test_several_files_name_the_file_and_its_own_line_numbers(
    tmp_path: Path, aws_env: dict[str, str]
) -> None:
    built = with_events(aws_env, 20)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_bytes(b"\n".join([built[0].data, built[1].data, b"garbage one"]) + b"\n")
    second.write_bytes(b"\n".join([built[2].data, b"garbage two", built[3].data]) + b"\n")
    missing = tmp_path / "missing.jsonl"
    result = await das_ingest("decrypt", "--stream", STREAM, str(first), str(missing), str(second))
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert f"{first}: line 3: json: record is not JSON" in errors[0]
    assert f"{missing}: cannot read: No such file or directory" in errors[1]
    assert f"{second}: line 2: json: record is not JSON" in errors[2]  # not line 5
    assert "3 record(s) failed" in result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted({(e["file"], e["line"]) for e in events}) == [
        (str(first), 1),
        (str(first), 2),
        (str(second), 1),
        (str(second), 3),
    ]


async def test_a_disabled_kms_key_is_named(tmp_path: Path, aws_env: dict[str, str]) -> None:
    """KMS answers Decrypt under a disabled key with DisabledException. moto 5.2.5 records
    DisableKey but its Decrypt ignores the key state, so the project's fault proxy gives that
    answer in front of moto, exactly as KMS sends it (HTTP 400, AWS JSON error)."""
    built = records(aws_env, count=2)
    path = tmp_path / "one.jsonl"
    path.write_bytes(built[0].data + b"\n")
    disabled = AwsError(
        "DisabledException",
        "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab is disabled.",
    )
    faults = HttpFaults([ErrorRule("Decrypt", disabled, probability=1.0)])
    async with FaultProxy.for_url(
        aws_env["AWS_ENDPOINT_URL_KMS"], name="kms", http_faults=faults
    ) as proxy:
        result = await das_ingest(
            "decrypt", "--stream", STREAM, str(path), env={"AWS_ENDPOINT_URL_KMS": proxy.url}
        )
    assert proxy.stats.injected["Decrypt:DisabledException"] >= 1
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        "line 1: kms: KMS Decrypt refused: DisabledException "
        "(the KMS key that encrypted the data key is disabled)"
    ) in result.stderr


async def test_a_payload_that_is_not_gzip_is_named(tmp_path: Path, aws_env: dict[str, str]) -> None:
    """A record that decrypts fine (a real KMS data key, the signed suite) but whose plaintext
    is the JSON itself, not gzip."""
    kms = boto3.client("kms", endpoint_url=aws_env["AWS_ENDPOINT_URL_KMS"])
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    made = kms.generate_data_key(
        KeyId=key_id, KeySpec="AES_256", EncryptionContext={"aws:rds:dbc-id": "cluster-DECRYPTME"}
    )
    built = records(aws_env, count=1)
    plain = orjson.dumps(built[0].inner.doc)
    message = seal_payload(plain, made["Plaintext"], gzip_it=False)
    path = tmp_path / "plain.jsonl"
    path.write_bytes(outer_record(message, made["CiphertextBlob"], "1.2") + b"\n")
    result = await das_ingest("decrypt", "--stream", STREAM, str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        "line 1: decompress: decrypted payload is not gzip (bad magic bytes) "
        "(the payload decrypted but is not a DAS event list)"
    ) in result.stderr
