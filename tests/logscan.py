"""Scanning captured output for what must never be logged: SQL text and data-key material.

The needles are real: every commandText of the traffic a test produced (the emulator puts a
unique ``das-emulator:`` comment in each statement, so even a fragment is found) and the
plaintext of every data key in the stream, fetched from KMS by decrypting the records' key blobs
and searched as base64, URL-safe base64, hex and Python bytes reprs.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable

import boto3
import orjson

from ingest.emulate.producer import EmulateOptions
from ingest.emulate.traffic import MARKER_PREFIX
from ingest.kms import encryption_context

#: Shorter command texts ("BEGIN", "select 1") would also match harmless words.
MIN_SQL_NEEDLE = 16


def key_texts(plaintext: bytes) -> list[str]:
    return [
        base64.b64encode(plaintext).decode(),
        base64.urlsafe_b64encode(plaintext).decode(),
        plaintext.hex(),
        plaintext.hex().upper(),
        repr(plaintext)[2:-1],
    ]


def stream_records(stream: str) -> list[bytes]:
    """Every record in the stream, read with a plain boto3 client."""
    kinesis = boto3.client("kinesis")
    out: list[bytes] = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while iterator:
            page = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            out += [r["Data"] for r in page["Records"]]
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")
    return out


def data_keys(records: list[bytes], resource_ids: list[str], *, every: bool = True) -> list[bytes]:
    """The plaintext data keys of the records, asked of KMS with each possible context; with
    ``every``, each record's key blob must decrypt (no hostile records in the stream)."""
    kms = boto3.client("kms")
    blobs = set()
    for record in records:
        try:
            blobs.add(base64.b64decode(orjson.loads(record)["key"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a hostile record
    keys = []
    for blob in blobs:
        for resource_id in resource_ids:
            try:
                answer = kms.decrypt(
                    CiphertextBlob=blob, EncryptionContext=encryption_context(resource_id)
                )
            except (kms.exceptions.InvalidCiphertextException, kms.exceptions.NotFoundException):
                continue
            keys.append(answer["Plaintext"])
            break
    if every:
        assert len(keys) == len(blobs), f"{len(blobs) - len(keys)} key blobs did not decrypt"
    return keys


def key_needles(keys: Iterable[bytes]) -> dict[str, str]:
    return {text: "data key" for key in keys for text in key_texts(key)}


def sql_needles(traffic: Iterable[EmulateOptions]) -> dict[str, str]:
    """Every commandText of the traffic (long enough to be unambiguous), and the marker."""
    needles = {MARKER_PREFIX: "SQL (emulator marker)"}
    for opts in traffic:
        for record in opts.inner_records():
            for event in record.events:
                text = event.get("commandText")
                if isinstance(text, str) and len(text) >= MIN_SQL_NEEDLE:
                    needles[text] = "SQL (commandText)"
    return needles


async def stream_needles(
    stream: str, traffic: Iterable[EmulateOptions], resource_ids: list[str], *, every: bool = True
) -> dict[str, str]:
    """SQL needles of ``traffic`` and the data keys of every record in ``stream``."""
    records = await asyncio.to_thread(stream_records, stream)
    keys = await asyncio.to_thread(data_keys, records, resource_ids, every=every)
    assert keys, "no data key found to look for"
    return {**sql_needles(traffic), **key_needles(keys)}


def leaks(text: str, needles: dict[str, str]) -> list[str]:
    """What of ``needles`` (needle -> what it is) appears in ``text``."""
    return sorted({what for needle, what in needles.items() if needle in text})


def assert_no_leaks(outputs: dict[str, str], needles: dict[str, str]) -> None:
    """No needle in any output (name -> captured text), and there was something to scan."""
    assert len(needles) > 10, "too few needles for the scan to mean anything"
    found = {name: leaks(text, needles) for name, text in outputs.items()}
    assert {name: what for name, what in found.items() if what} == {}
    assert sum(len(t) for t in outputs.values()) > 1000, "almost nothing was logged"
