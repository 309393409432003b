"""`das-ingest decrypt` through real KMS: events as JSON lines, clear per-line errors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from ingest.emulate.producer import DataKey, EmulateOptions, build_records
from ingest.emulate.traffic import record_keys
from tests.cli_helpers import das_ingest

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
