"""Policies in decode_batch: evaluated beside normalize, in the decode processes."""

from __future__ import annotations

import orjson

from ingest.decode.batch import BatchInput, BatchOutput, DecoderConfig, KeyedRecord
from ingest.decode.fingerprint import of_statement
from ingest.policy.hook import decode_with_policy
from tests.sealing import seal

KEY = bytes(range(32))
RULES = """
rules:
  - {name: noise, where: {user: rdsadmin}, action: drop}
  - {name: pii, where: {database: hr}, action: redact}
"""


def _batch(config: DecoderConfig) -> tuple[BatchOutput, str]:
    events = [
        {"type": "record", "class": "READ", "logTime": "2026-11-25 12:00:00+00",
         "dbUserName": "rdsadmin", "commandText": "SELECT 1"},
        {"type": "record", "class": "READ", "logTime": "2026-11-25 12:00:01+00",
         "dbUserName": "alice", "databaseName": "hr",
         "commandText": "SELECT * FROM people WHERE ssn = '123-45-6789'",
         "paramList": ["123-45-6789"]},
        {"type": "record", "class": "MISC", "logTime": "2026-11-25 12:00:02+00",
         "dbUserName": "mallory", "command": "AUTH FAILURE", "exitCode": "28P01",
         "remoteHost": "10.6.6.6"},
    ]  # fmt: skip
    doc = orjson.dumps(
        {"type": "DatabaseActivityMonitoringRecord", "clusterId": "c", "instanceId": "i",
         "databaseActivityEventList": events}
    )  # fmt: skip
    out = decode_with_policy(
        BatchInput(
            "shardId-1", [KeyedRecord(0, "7", seal(doc, KEY, "1.1"), KEY)], config, stream_name="s"
        )
    )
    assert out.failures == []
    return out, out.events.decode()


def test_drop_redact_and_tallies_happen_in_decode() -> None:
    out, text = _batch(DecoderConfig("esdk", rules=RULES))
    assert out.event_count == 2  # the rdsadmin statement was dropped...
    assert out.policy is not None
    assert out.policy.dropped == {"noise": 1}  # ...and counted for the chain link
    assert "123-45-6789" not in text  # redacted in command_text and param_list
    assert "SELECT * FROM people WHERE ssn = ?" in text
    # the fingerprint survives redaction: it is the original statement's
    fingerprint = of_statement("SELECT * FROM people WHERE ssn = '123-45-6789'")
    assert fingerprint is not None
    assert f"\t{fingerprint[0]}\t{fingerprint[1]}" in text
    # the failed login was tallied for brute_force_login (built-in pack), by user and host
    keys = {(k[0], k[1]) for k in out.policy.tallies}
    assert ("brute_force_login", "user=mallory") in keys
    assert ("brute_force_login", "remote_host=10.6.6.6") in keys


def test_policies_off_store_everything_as_received() -> None:
    out, text = _batch(DecoderConfig("esdk", rules=RULES, policy=False))
    assert out.event_count == 3
    assert out.policy is None
    assert "123-45-6789" in text
