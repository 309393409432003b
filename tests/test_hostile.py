"""Hostile input at every layer, through a real Kinesis stream, real KMS and a real worker.

Records are crafted by hand and by Hypothesis and sealed the way Aurora seals them (gzip, then
an Encryption SDK message under a real KMS data key bound to the cluster resource id) wherever
the layer under attack is inside the encryption. Each one must be dead-lettered with the stage
that refused it, or stored safely (NUL bytes, invalid UTF-8 and wrong types escaped or moved to
``extra`` and listed in ``anomalies``), and the shard must never stall: a good record follows
every bad one and must arrive. While a stream of gzip bombs and huge records passes, the
worker's memory (its own RSS plus its decode processes', from /proc) stays under a bound.

The pure layer gets the same treatment without any I/O: ``decode_batch`` on Hypothesis mixes of
good and hostile records never raises, and fails exactly the hostile ones.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import os
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import boto3
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode.batch import BatchInput, DecoderConfig, KeyedRecord, decode_batch
from ingest.decode.envelope import read_envelope
from ingest.errors import DecodeError, Stage
from ingest.kms import encryption_context
from tests.faults import rss_bytes
from tests.fleet import Fleet, WorkerProcess, migrated
from tests.logscan import MIN_SQL_NEEDLE, assert_no_leaks, key_needles
from tests.sealing import outer_record, seal_payload

log = logging.getLogger(__name__)

STAGES = {s.value for s in Stage}


# -- building records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataKey:
    plaintext: bytes
    blob: bytes


def inner(events: list[Any], **fields: Any) -> bytes:
    doc: dict[str, Any] = {
        "type": "DatabaseActivityMonitoringRecord",
        "clusterId": "cluster-HOSTILE",
        "instanceId": "db-hostile-1",
        "databaseActivityEventList": events,
    }
    doc.update(fields)
    return orjson.dumps(doc)


#: Every commandText put in an event: what the workers' logs are scanned for.
SQL_TEXTS: set[str] = set()


def event(text: str, **fields: Any) -> dict[str, Any]:
    SQL_TEXTS.add(text)
    base: dict[str, Any] = {
        "type": "record",
        "class": "MISC",
        "command": "SELECT",
        "commandText": text,
        "logTime": datetime.now(UTC).isoformat(),
        "dbUserName": "app",
        "databaseName": "postgres",
        "pid": 4242,
        "sessionId": "66f0a1b2.1092",
        "statementId": 1,
        "substatementId": 1,
    }
    base.update(fields)
    return base


def sealed(doc: bytes, key: DataKey, *, version: str = "1.1", gzip_it: bool = True) -> bytes:
    return outer_record(seal_payload(doc, key.plaintext, gzip_it=gzip_it), key.blob, version)


def envelope(**fields: Any) -> bytes:
    doc: dict[str, Any] = {
        "type": "DatabaseActivityMonitoringRecords",
        "version": "1.1",
        "databaseActivityEvents": base64.b64encode(b"x" * 64).decode(),
        "key": base64.b64encode(b"k" * 64).decode(),
    }
    doc.update(fields)
    return orjson.dumps({k: v for k, v in doc.items() if v is not _MISSING})


_MISSING = object()


def with_payload(record: bytes, change: Callable[[bytes], bytes]) -> bytes:
    doc = orjson.loads(record)
    message = base64.b64decode(doc["databaseActivityEvents"])
    doc["databaseActivityEvents"] = base64.b64encode(change(message)).decode()
    return orjson.dumps(doc)


def gzip_bomb(decompressed: int) -> bytes:
    """A gzip stream of ``decompressed`` zero bytes, built without holding them in memory."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    parts = [packer.compress(block) for _ in range(decompressed >> 20)]
    parts.append(packer.flush())
    return b"".join(parts)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


# -- the stack side -----------------------------------------------------------------------------


@dataclass
class Setup:
    stream: str
    resource_id: str
    key: DataKey
    #: A second data key of the same cluster.
    other_key: DataKey
    #: A data key bound to another cluster (a wrong encryption context for this stream).
    foreign_key: DataKey
    kinesis: Any


@pytest.fixture
async def setup(aws_env: dict[str, str]) -> Setup:
    resource_id = f"cluster-{secrets.token_hex(6).upper()}"
    stream = f"aws-rds-das-{resource_id}"
    kms = boto3.client("kms")
    kinesis = boto3.client("kinesis")

    def prepare() -> tuple[DataKey, DataKey, DataKey]:
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]

        def data_key(context: str) -> DataKey:
            made = kms.generate_data_key(
                KeyId=key_id, KeySpec="AES_256", EncryptionContext=encryption_context(context)
            )
            return DataKey(made["Plaintext"], made["CiphertextBlob"])

        kinesis.create_stream(StreamName=stream, ShardCount=1)
        waiter = kinesis.get_waiter("stream_exists")
        waiter.wait(StreamName=stream, WaiterConfig={"Delay": 0.1, "MaxAttempts": 300})
        return data_key(resource_id), data_key(resource_id), data_key("cluster-ELSEWHERE")

    key, other, foreign = await asyncio.to_thread(prepare)
    return Setup(stream, resource_id, key, other, foreign, kinesis)


async def put_all(setup: Setup, records: list[bytes]) -> list[str]:
    """Put records one by one (in order, one shard); their sequence numbers."""

    def put() -> list[str]:
        return [
            setup.kinesis.put_record(StreamName=setup.stream, Data=data, PartitionKey="db-1")[
                "SequenceNumber"
            ]
            for data in records
        ]

    return await asyncio.to_thread(put)


async def ingest_all(fleet: Fleet, setup: Setup, dsn: str, *extra: str) -> WorkerProcess:
    worker = await fleet.start(
        "hostile",
        setup.stream,
        dsn,
        "--processes",
        "1",
        "--stop-when-idle",
        "2",
        "--log-level",
        "debug",  # every log line the error paths have, for the scan for SQL and keys
        *extra,
    )
    assert await worker.wait(240) == 0
    return worker


@dataclass(frozen=True)
class Outcome:
    dead: dict[str, tuple[str, str]]  # sequence number -> (stage, error)
    events: dict[str, list[asyncpg.Record]]  # sequence number -> stored events


async def outcome(dsn: str) -> Outcome:
    conn = await asyncpg.connect(dsn)
    try:
        letters = await conn.fetch(
            "SELECT sequence_number::text AS seq, stage, error FROM das.dead_letters"
        )
        rows = await conn.fetch(
            """
            SELECT sequence_number::text AS seq, event_index, command_text, anomalies, extra,
                   pid, statement_id, log_time, length(command_text) AS text_length
            FROM das.activity_events ORDER BY sequence_number, event_index
            """
        )
    finally:
        await conn.close()
    events: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        events.setdefault(row["seq"], []).append(row)
    return Outcome({r["seq"]: (r["stage"], r["error"]) for r in letters}, events)


def assert_logs_clean(worker: WorkerProcess, setup: Setup) -> None:
    """The worker's log has none of the SQL put in events, nor any data key of the stream
    (hostile records fail at every stage, so every error path had its chance to leak)."""
    needles: dict[str, str] = {}
    for text in SQL_TEXTS:
        # Long and varied enough not to turn up in a log by chance (Hypothesis draws texts
        # such as sixteen zeros, which a sequence number contains).
        if isinstance(text, str) and len(text) >= MIN_SQL_NEEDLE and len(set(text)) >= 6:
            needles[text[:256]] = "SQL (commandText)"
    for key in (setup.key, setup.other_key, setup.foreign_key):
        needles.update(key_needles([key.plaintext]))
    assert any(what.startswith("SQL") for what in needles.values())
    assert_no_leaks({worker.name: worker.output}, needles)


# -- hand-written hostile records ---------------------------------------------------------------


Check = Callable[[list[asyncpg.Record]], None]


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    #: The stage that must dead-letter it, or None: stored, and ``check`` holds for its events.
    stage: str | None
    check: Check | None = None


def anomalies_include(*flags: str) -> Check:
    def check(rows: list[asyncpg.Record]) -> None:
        assert len(rows) == 1
        assert set(flags) <= set(rows[0]["anomalies"]), rows[0]["anomalies"]

    return check


def hand_written_cases(s: Setup) -> list[Case]:
    key = s.key
    good = sealed(inner([event("select 1")]), key)
    message = seal_payload(inner([event("select 2")]), key.plaintext)
    deep = 5000
    nested: Any = "bottom"
    for _ in range(200):
        nested = {"n": nested}

    def wrong_types(rows: list[asyncpg.Record]) -> None:
        assert len(rows) == 1
        row = rows[0]
        assert {"pid:type", "statementId:type", "logTime:type"} <= set(row["anomalies"])
        assert row["pid"] is None
        assert row["log_time"] is None
        extra = orjson.loads(row["extra"])
        assert extra["pid"] == "not-a-pid"
        assert extra["statementId"] == {"x": 1}

    def nul(rows: list[asyncpg.Record]) -> None:
        anomalies_include("commandText:nul")(rows)
        assert rows[0]["command_text"] == "select '\\x00\\x00' -- nul"

    def utf8(rows: list[asyncpg.Record]) -> None:
        anomalies_include("commandText:utf8")(rows)
        assert rows[0]["command_text"] == "select '\\xff\\xfe' -- bad utf-8"

    def huge(rows: list[asyncpg.Record]) -> None:
        assert len(rows) == 1
        assert rows[0]["text_length"] == 4 * 1024 * 1024 + len("select ")
        assert list(rows[0]["anomalies"]) == []

    def unknown_fields(rows: list[asyncpg.Record]) -> None:
        assert len(rows) == 1
        assert orjson.loads(rows[0]["extra"]) == {"brandNew": [1, 2, {"x": None}]}

    invalid_utf8 = orjson.dumps(
        {
            "type": "DatabaseActivityMonitoringRecord",
            "clusterId": "c",
            "instanceId": "i",
            "databaseActivityEventList": [event("PLACEHOLDER")],
        }
    ).replace(b"PLACEHOLDER", b"select '\xff\xfe' -- bad utf-8")
    big_int = inner([event("select 'big'", pid=1)]).replace(
        b'"pid":1', b'"pid":123456789012345678901234567890'
    )

    def out_of_range(rows: list[asyncpg.Record]) -> None:
        anomalies_include("pid:range", "extra.pid:bignum")(rows)
        assert rows[0]["pid"] is None
        # The exact number (orjson alone would have rounded it to 1.2345678901234568e+29).
        assert orjson.loads(rows[0]["extra"]) == {"pid": "123456789012345678901234567890"}

    def infinite(rows: list[asyncpg.Record]) -> None:
        anomalies_include("pid:range", "extra.pid:bignum")(rows)
        assert orjson.loads(rows[0]["extra"]) == {"pid": "1e400"}

    def untyped(flag: str, extra: dict[str, Any]) -> Check:
        def check(rows: list[asyncpg.Record]) -> None:
            assert len(rows) == 1
            assert list(rows[0]["anomalies"]) == [flag]
            assert orjson.loads(rows[0]["extra"]) == extra

        return check

    def untyped_clean(rows: list[asyncpg.Record]) -> None:
        """A documented shape pushed to an extreme: stored as is, no anomaly."""
        assert len(rows) == 1
        assert list(rows[0]["anomalies"]) == []
        assert rows[0]["log_time"] is not None

    return [
        # The outer document (no cryptography needed to reach it).
        Case("not json", b"\x00\xff\x10 definitely not json", "json"),
        Case("json array", b"[1, 2, 3]", "json"),
        Case("json string", b'"DatabaseActivityMonitoringRecords"', "json"),
        Case("version is a number", envelope(version=1.1), "json"),
        Case("unknown record type", envelope(type="SomethingElse"), "json"),
        Case("unknown major version", envelope(version="2.0"), "json"),
        Case("missing key", envelope(key=_MISSING), "json"),
        Case("missing payload", envelope(databaseActivityEvents=_MISSING), "json"),
        Case("payload already decrypted", envelope(databaseActivityEvents={"a": 1}), "json"),
        Case("key is a list", envelope(key=[1, 2]), "json"),
        Case("bad base64 key", envelope(key="!!not base64!!"), "base64"),
        Case("empty key", envelope(key=""), "base64"),
        Case(
            "bad base64 payload",
            outer_record(b"placeholder", key.blob).replace(
                base64.b64encode(b"placeholder"), b"@@@@"
            ),
            "base64",
        ),
        # KMS: the data key blob.
        Case("random key blob", outer_record(message, os.urandom(len(key.blob))), "kms"),
        Case("altered key blob", outer_record(message, flip(key.blob, 60)), "kms"),
        Case("wrong encryption context", sealed(inner([event("x")]), s.foreign_key), "kms"),
        # The Encryption SDK message.
        Case("truncated ciphertext", with_payload(good, lambda m: m[: len(m) // 2]), "decrypt"),
        Case("altered ciphertext", with_payload(good, lambda m: flip(m, len(m) // 2)), "decrypt"),
        Case("altered header", with_payload(good, lambda m: flip(m, 30)), "decrypt"),
        Case("trailing bytes", with_payload(good, lambda m: m + b"\0" * 16), "decrypt"),
        Case("not an ESDK message", with_payload(good, lambda m: os.urandom(len(m))), "decrypt"),
        Case(
            "wrong data key",
            outer_record(seal_payload(inner([event("x")]), s.other_key.plaintext), key.blob),
            "decrypt",
        ),
        # gzip.
        Case("not gzip", sealed(inner([event("x")]), key, gzip_it=False), "decompress"),
        Case(
            "truncated gzip",
            sealed(gzip.compress(inner([event("x")]))[:-12], key, gzip_it=False),
            "decompress",
        ),
        Case("gzip bomb", sealed(gzip_bomb(100 << 20), key, gzip_it=False), "decompress"),
        # The inner document.
        Case("inner not json", sealed(b"<xml>no</xml>", key), "parse"),
        Case("deeply nested json", sealed(b"[" * deep + b"]" * deep, key), "parse"),
        Case("inner is a list", sealed(b"[]", key), "normalize"),
        Case("unknown inner type", sealed(inner([], type="Other"), key), "normalize"),
        Case(
            "event list missing",
            sealed(inner([], databaseActivityEventList=None), key),
            "normalize",
        ),
        Case("event is a string", sealed(inner(["select 1"]), key), "normalize"),
        Case("clusterId is a number", sealed(inner([], clusterId=7), key), "normalize"),
        Case(
            "nested too deep in an event",
            sealed(inner([event("x", deep=nested)]), key),
            "normalize",
        ),
        # Stored safely.
        Case(
            "unknown event type",
            sealed(inner([{"type": "surprise"}]), key),
            None,
            untyped("type:unknown", {"type": "surprise"}),
        ),
        Case(
            "event of no type",
            sealed(inner([{"commandText": "x"}]), key),
            None,
            untyped("type:missing", {}),
        ),
        Case(
            "infinite number",
            sealed(inner([event("x")]).replace(b"4242", b"1e400"), key),
            None,
            infinite,
        ),
        Case("integer beyond 64 bits", sealed(big_int, key), None, out_of_range),
        Case("nul bytes", sealed(inner([event("select '\0\0' -- nul")]), key), None, nul),
        Case("invalid utf-8", sealed(invalid_utf8, key), None, utf8),
        Case(
            "wrong types",
            sealed(inner([event("x", pid="not-a-pid", statementId={"x": 1}, logTime=5)]), key),
            None,
            wrong_types,
        ),
        Case(
            "huge commandText",
            sealed(inner([event("select " + "x" * (4 * 1024 * 1024))]), key),
            None,
            huge,
        ),
        Case("unknown minor version", sealed(inner([event("y")]), key, version="1.9"), None, None),
        # Hostile variants of the RDS for Oracle (1.3) and RDS for SQL Server (1.4) shapes.
        Case(
            "engine-native fields not an object",
            sealed(inner([event("o", engineNativeAuditFields="DBID=1")]), key, version="1.3"),
            None,
            untyped("engineNativeAuditFields:type", {"engineNativeAuditFields": "DBID=1"}),
        ),
        Case(
            "engine-native fields nested too deep",
            sealed(inner([event("o", engineNativeAuditFields=nested)]), key, version="1.3"),
            "normalize",
        ),
        Case(
            "hex statementId with nul bytes",
            sealed(inner([event("s", statementId="0x\u0000ff")]), key, version="1.4"),
            None,
            anomalies_include("statementId:nul"),
        ),
        Case(
            "zone-less time that is no time",
            sealed(inner([event("o", logTime="2021-13-45 99:99:99.1234567")]), key, version="1.3"),
            None,
            anomalies_include("logTime:time"),
        ),
        Case(
            "time with twenty fraction digits",
            sealed(
                inner([event("s", logTime="2022-10-06 21:44:38.41206771234567890123+00")]),
                key,
                version="1.4",
            ),
            None,
            untyped_clean,
        ),
        Case(
            "unknown fields",
            sealed(inner([event("z", brandNew=[1, 2, {"x": None}])]), key),
            None,
            unknown_fields,
        ),
    ]


def sentinel(setup: Setup, n: int) -> bytes:
    return sealed(inner([event(f"select 'sentinel {n}'")]), setup.other_key)


async def test_every_hostile_record_is_dead_lettered_or_stored_and_the_shard_goes_on(
    fleet: Fleet, pg_dsn: str, setup: Setup
) -> None:
    await migrated(pg_dsn)
    cases = await asyncio.to_thread(hand_written_cases, setup)
    records: list[bytes] = []
    for n, case in enumerate(cases):
        records += [case.data, sentinel(setup, n)]
    sequence_numbers = await put_all(setup, records)
    worker = await ingest_all(fleet, setup, pg_dsn)
    got = await outcome(pg_dsn)
    assert_logs_clean(worker, setup)
    for n, case in enumerate(cases):
        seq, after = sequence_numbers[2 * n], sequence_numbers[2 * n + 1]
        if case.stage is not None:
            assert seq in got.dead, f"{case.name}: not dead-lettered"
            assert got.dead[seq][0] == case.stage, f"{case.name}: {got.dead[seq]}"
            assert seq not in got.events, f"{case.name}: events stored"
        else:
            assert seq not in got.dead, f"{case.name}: dead-lettered: {got.dead.get(seq)}"
            assert seq in got.events, f"{case.name}: nothing stored"
            if case.check is not None:
                case.check(got.events[seq])
        # The good record right after it arrived: the shard did not stall.
        assert [r["command_text"] for r in got.events.get(after, [])] == [
            f"select 'sentinel {n}'"
        ], f"after {case.name}"
    assert len(got.dead) == sum(c.stage is not None for c in cases)
    # Each dead letter was logged (stage and reason: what the scan above read), once.
    logged = {e["sequence"]: e["stage"] for e in worker.logged("record dead-lettered")}
    assert logged == {seq: stage for seq, (stage, _) in got.dead.items()}
    log.warning("hostile records tried: %d hand-written", len(cases))


async def test_a_partition_key_postgresql_cannot_store_does_not_stall_the_shard(
    fleet: Fleet, pg_dsn: str, setup: Setup
) -> None:
    """A poison record whose partition key holds a NUL (Kinesis keys are any Unicode) is
    dead-lettered with the key escaped; the record after it is stored."""
    await migrated(pg_dsn)

    def put() -> list[str]:
        return [
            setup.kinesis.put_record(StreamName=setup.stream, Data=data, PartitionKey=key)[
                "SequenceNumber"
            ]
            for data, key in ((b"not a record", "db-1\x00evil"), (sentinel(setup, 0), "db-1"))
        ]

    poison, after = await asyncio.to_thread(put)
    await ingest_all(fleet, setup, pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        letters = await conn.fetch(
            "SELECT sequence_number::text AS seq, partition_key, stage, error FROM das.dead_letters"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in letters] == [(poison, "db-1\\x00evil", "json", letters[0]["error"])]
    assert letters[0]["error"].endswith("(partition key stored escaped: nul)")
    got = await outcome(pg_dsn)
    assert [r["command_text"] for r in got.events[after]] == ["select 'sentinel 0'"]


# -- memory stays bounded -----------------------------------------------------------------------

#: The worker's main process plus one decode process, with gzip bombs (each would inflate to
#: 600 MiB without the cap) and 30 MiB commandTexts passing through.
RSS_BOUND = 900 * 1024 * 1024


async def test_memory_stays_bounded_under_gzip_bombs_and_huge_records(
    fleet: Fleet, pg_dsn: str, setup: Setup
) -> None:
    await migrated(pg_dsn)

    def build() -> list[bytes]:
        bomb = sealed(gzip_bomb(600 << 20), setup.key, gzip_it=False)
        assert len(bomb) < 1024 * 1024  # fits a Kinesis record
        huge = sealed(inner([event("select " + "y" * (30 << 20))]), setup.key)
        out: list[bytes] = []
        for n in range(8):
            out += [bomb, huge if n % 2 else bomb, sentinel(setup, n)]
        return out

    records = await asyncio.to_thread(build)
    await put_all(setup, records)
    worker = await fleet.start(
        "bounded",
        setup.stream,
        pg_dsn,
        "--processes",
        "1",
        "--stop-when-idle",
        "2",
        "--log-level",
        "debug",
    )
    peak = 0
    samples = 0
    while worker.process.returncode is None:
        peak = max(peak, rss_bytes(worker.process.pid))
        samples += 1
        try:
            await asyncio.wait_for(asyncio.shield(worker.process.wait()), 0.05)
        except TimeoutError:
            continue
    assert await worker.wait(240) == 0
    log.warning("worker RSS peak %.0f MiB over %d samples", peak / 2**20, samples)
    assert samples > 10
    assert 0 < peak < RSS_BOUND, f"peak RSS {peak / 2**20:.0f} MiB"
    got = await outcome(pg_dsn)
    stages = [stage for stage, _ in got.dead.values()]
    assert stages == ["decompress"] * 12
    texts = [r["command_text"] for rows in got.events.values() for r in rows]
    assert [t for t in texts if t.startswith("select 'sentinel")] == [
        f"select 'sentinel {n}'" for n in range(8)
    ]
    lengths = sorted(r["text_length"] for rows in got.events.values() for r in rows)
    assert lengths[-4:] == [len("select ") + (30 << 20)] * 4
    assert_logs_clean(worker, setup)


# -- Hypothesis, through the stream ---------------------------------------------------------------


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner_values: (
        st.lists(inner_values, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner_values, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "type",
        "class",
        "command",
        "commandText",
        "logTime",
        "pid",
        "statementId",
        "substatementId",
        "sessionId",
        "paramList",
        "exitCode",
        "rowCount",
        "somethingNew",
    ]
)
hostile_events = st.one_of(
    st.builds(lambda text: event(text), st.text(max_size=40)),
    st.builds(
        lambda name, value: event("x", **{name: value}),
        field_names,
        json_values,
    ),
    json_values,
)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, Any]:
    """A description of how to spoil a record (applied later, with the stack's keys)."""
    kind = draw(
        st.sampled_from(
            [
                "outer-field",
                "base64",
                "key-blob",
                "ciphertext-flip",
                "ciphertext-cut",
                "plaintext",
                "inner",
                "random-bytes",
            ]
        )
    )
    if kind == "outer-field":
        name = draw(st.sampled_from(["type", "version", "databaseActivityEvents", "key"]))
        return kind, (name, draw(json_values))
    if kind == "base64":
        return kind, (draw(st.sampled_from(["databaseActivityEvents", "key"])), draw(st.text()))
    if kind == "key-blob":
        return kind, draw(st.binary(min_size=1, max_size=300))
    if kind in ("ciphertext-flip", "ciphertext-cut"):
        return kind, draw(st.floats(min_value=0, max_value=0.999))
    if kind == "plaintext":
        # Whatever is inside the encryption: maybe gzip, maybe JSON, maybe neither.
        body = draw(st.one_of(st.binary(max_size=300), json_values.map(orjson.dumps)))
        return kind, (body, draw(st.booleans()))
    if kind == "inner":
        events = draw(st.lists(hostile_events, max_size=4))
        top = draw(st.dictionaries(st.sampled_from(["clusterId", "instanceId", "x"]), json_values))
        return kind, (events, top)
    return kind, draw(st.binary(max_size=200))


def apply_mutation(mutation: tuple[str, Any], key: DataKey) -> bytes:
    kind, arg = mutation
    good = sealed(inner([event("select 'base'")]), key)
    if kind == "outer-field":
        name, value = arg
        doc = orjson.loads(good)
        doc[name] = value
        return orjson.dumps(doc)
    if kind == "base64":
        name, text = arg
        doc = orjson.loads(good)
        doc[name] = text
        return orjson.dumps(doc)
    if kind == "key-blob":
        doc = orjson.loads(good)
        doc["key"] = base64.b64encode(arg).decode()
        return orjson.dumps(doc)
    if kind == "plaintext":
        body, gzip_it = arg
        return sealed(body, key, gzip_it=gzip_it)
    if kind == "ciphertext-flip":
        return with_payload(good, lambda m: flip(m, int(arg * len(m))))
    if kind == "ciphertext-cut":
        return with_payload(good, lambda m: m[: int(arg * len(m))] or b"\0")
    if kind == "inner":
        events, top = arg
        return sealed(inner(events, **top), key)
    return bytes(arg)


def predict(raw: bytes, key: DataKey) -> tuple[str | None, int]:
    """What the pure layer says: (stage or None, events) for a record of this stream."""
    try:
        blob = read_envelope(raw).key_blob()
    except DecodeError as exc:
        return exc.stage.value, 0
    if blob != key.blob:
        return "kms", 0
    return decoded_alone(raw, key.plaintext)


def decoded_alone(raw: bytes, data_key: bytes) -> tuple[str | None, int]:
    """(stage or None, events) of decoding this one record in a batch of its own."""
    out = decode_batch(
        BatchInput("s", [KeyedRecord(0, "1", raw, data_key)], DecoderConfig(), stream_name="s")
    )
    if out.failures:
        return out.failures[0].stage, 0
    return None, out.event_count


async def test_hypothesis_records_through_the_stream_match_the_pure_layer(
    fleet: Fleet, pg_dsn: str, setup: Setup
) -> None:
    await migrated(pg_dsn)
    drawn: list[tuple[str, Any]] = []

    @settings(
        max_examples=80,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations())
    def collect(mutation: tuple[str, Any]) -> None:
        drawn.append(mutation)

    collect()
    assert len(drawn) >= 30

    def build() -> list[tuple[tuple[str, Any], bytes]]:
        return [(m, apply_mutation(m, setup.key)) for m in drawn]

    built = await asyncio.to_thread(build)
    records: list[bytes] = []
    for n, (_, data) in enumerate(built):
        records += [data, sentinel(setup, n)]
    sequence_numbers = await put_all(setup, records)
    worker = await ingest_all(fleet, setup, pg_dsn)
    got = await outcome(pg_dsn)
    assert_logs_clean(worker, setup)
    stages: dict[str | None, int] = {}
    for n, (mutation, data) in enumerate(built):
        seq = sequence_numbers[2 * n]
        stage, events = predict(data, setup.key)
        stages[stage] = stages.get(stage, 0) + 1
        where = f"example {n} {mutation!r:.300}"
        if stage is None:
            assert seq not in got.dead, f"{where}: dead-lettered {got.dead.get(seq)}"
            assert len(got.events.get(seq, [])) == events, where
        else:
            assert got.dead.get(seq, ("-", ""))[0] == stage, f"{where}: {got.dead.get(seq)}"
            assert seq not in got.events, where
        after = sequence_numbers[2 * n + 1]
        assert len(got.events.get(after, [])) == 1, f"stalled after {where}"
    log.warning("hostile records tried: %d from Hypothesis, outcomes %s", len(built), stages)
    assert set(stages) - {None} <= STAGES


# -- the pure layer -----------------------------------------------------------------------------

PURE_KEY = DataKey(os.urandom(32), b"blob")
PURE_GOOD = [sealed(inner([event(f"select {n}")] * (n + 1)), PURE_KEY) for n in range(3)]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(range(len(PURE_GOOD))).map(lambda i: ("good", i)),
            mutations().map(lambda m: ("bad", m)),
            st.binary(max_size=64).map(lambda b: ("key", b)),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_decode_batch_never_raises_and_fails_exactly_the_hostile_records(
    items: list[tuple[str, Any]],
) -> None:
    """A batch fails exactly the records that fail alone, whatever surrounds them, and never
    raises; good records keep every event (the key field is the parent's business: KMS)."""
    batch: list[KeyedRecord] = []
    want_events = 0
    want_failed: set[int] = set()
    for index, (kind, arg) in enumerate(items):
        if kind == "good":
            batch.append(KeyedRecord(index, str(index), PURE_GOOD[arg], PURE_KEY.plaintext))
            want_events += arg + 1
        elif kind == "key":
            # A good record with a wrong (maybe not even 32-byte) data key.
            batch.append(KeyedRecord(index, str(index), PURE_GOOD[0], arg))
            want_failed.add(index)
        else:
            raw = apply_mutation(arg, PURE_KEY)
            stage, events = decoded_alone(raw, PURE_KEY.plaintext)
            batch.append(KeyedRecord(index, str(index), raw, PURE_KEY.plaintext))
            if stage is None:
                want_events += events
            else:
                want_failed.add(index)
    out = decode_batch(BatchInput("shardId-000000000000", batch, DecoderConfig(), stream_name="s"))
    assert {f.index for f in out.failures} == want_failed
    assert all(f.stage in STAGES and not f.retriable for f in out.failures)
    assert out.event_count == want_events
    assert out.records_decoded == len(batch) - len(want_failed)
    assert out.events.count(b"\n") == want_events  # one COPY line per event
