"""The archive: whole days to Parquet on the stack's S3 (moto), read back by pyarrow and DuckDB
value for value; verified from the archive alone; tampering found by file and row; a crash
mid-archive completed by a re-run; retention that drops only archived days."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import duckdb
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from das_dev.devstack import LocalStack, free_port
from ingest.archive.check import DIGEST_PREFIX, ArchiveReport, locate, verify_archive
from ingest.archive.columns import Columns, athena_ddl
from ingest.archive.export import ArchiveSettings, archive_days, days_before
from ingest.archive.location import ArchiveLocation
from ingest.archive.manifest import Manifest
from ingest.archive.s3 import S3ConfigError, S3Error, S3UnavailableError, classify
from ingest.aws import aws_client, error_code
from ingest.errors import ConfigError
from ingest.integrity.anchor import AnchorKey, anchor_heads
from ingest.integrity.canonical import EVENT_COLUMNS
from ingest.integrity.verify import AnchorChecker, stored_values, verify_warehouse
from ingest.lease import LeaseToken
from tests.cli_helpers import Result, das_ingest
from tests.rds_examples import (
    ORACLE_INSTANCE,
    SQLSERVER_INSTANCE,
    inner_document,
    oracle_event,
    sqlserver_event,
)
from tests.sealing import seal
from tests.warehouse_helpers import KEY, STREAM, commit_sealed, hold_lease, migrated_pool

DAY1, DAY2 = date(2024, 3, 1), date(2024, 3, 2)
FAR = date(999, 12, 31)
BEFORE = "2024-03-03"

#: Values whose text PostgreSQL normalizes, or that Parquet types must carry exactly.
AWKWARD: list[dict[str, Any]] = [
    {
        "type": "record",
        "logTime": "2024-03-01 10:00:00.000001+05:30",
        "pid": "12",
        "extra1": {"zz": 1e20, "a": -0.0, "é": [1.5, 100.0, 1e-7, 12345678901234567890]},
        "commandText": 'a\x00b\\c\t\n"quoted" \u2603\U0001f600',
        "paramList": ["x", None, 2.50, {"big": 100000000000000000000}],
    },
    {
        "type": "record",
        "logTime": "2024-03-01 23:59:59.999999+00",
        "startTime": "bogus",  # stored NULL, kept in extra, named in anomalies
        "exitCode": 0,
        "sessionId": 5,
        "b": True,
        "c": None,
        "d": "\u2603\U0001f600",
    },
    {"type": "record", "logTime": "0999-12-31 23:59:59.999999+00", "commandText": "far"},
    {"type": "record", "logTime": "2024-03-02 00:00:00+00", "rowCount": 9223372036854775807},
    {"type": "record", "logTime": "2024-03-02 08:00:00.5+00", "commandText": ""},
]


@dataclass
class Archive:
    dsn: str
    pool: asyncpg.Pool
    bucket: str
    location: ArchiveLocation
    key_id: str
    s3: Any  # boto3, for the test's own reads and tampering

    @property
    def url(self) -> str:
        return self.location.url

    def objects(self) -> dict[str, bytes]:
        found = {}
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.location.prefix)
        for item in listing.get("Contents", ()):
            found[item["Key"]] = self.s3.get_object(Bucket=self.bucket, Key=item["Key"])[
                "Body"
            ].read()
        return found

    def day_key(self, day: date, name: str, stream: str = STREAM) -> str:
        return self.location.day_dir(stream, day) + name


async def _commit(
    pool: asyncpg.Pool,
    token: LeaseToken,
    events: list[dict[str, Any]],
    first: int,
    previous: str,
    *,
    sealed: list[bytes] | None = None,
) -> str:
    """One batch (one link) of one record per event (or the ``sealed`` records), sequence
    numbers from ``first``."""
    # The standard library's JSON, as orjson cannot write integers beyond 64 bits.
    documents = [
        json.dumps(
            {"type": "DatabaseActivityMonitoringRecord", "clusterId": "cluster-TEST",
             "instanceId": "db-1", "databaseActivityEventList": [e]},
            ensure_ascii=False,
        ).encode()
        for e in events
    ]  # fmt: skip
    records = sealed if sealed is not None else [seal(doc, KEY) for doc in documents]
    return await commit_sealed(pool, token, records, first, previous)


def _plain(day: date, n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "record",
            "logTime": f"{day.isoformat()} {10 + i % 10:02d}:00:{i % 60:02d}.{i:06d}+00",
            "commandText": f"select {tag} {i}",
            "dbUserName": f"user{i % 3}",
            "paramList": [i, f"p{i}"],
        }
        for i in range(n)
    ]


@pytest.fixture
async def archive(
    pg_dsn: str, aws_env: dict[str, str], stack: LocalStack
) -> AsyncIterator[Archive]:
    """Two shards over two days (and a far past day in the default partition), awkward values
    included, with a batch spanning midnight; every chain head anchored with a KMS HMAC key."""
    pool = await migrated_pool(pg_dsn)
    try:
        async with pool.acquire() as conn:
            for d in (DAY1, DAY2):  # outside the on-demand window: made by hand
                await conn.execute("SELECT das.ensure_partition($1)", d)
        a = (await hold_lease(pool, "shardId-000000000000", "w", STREAM))[0]
        b = (await hold_lease(pool, "shardId-000000000001", "w", STREAM))[0]
        last_a = await _commit(pool, a, AWKWARD, 100, "TRIM_HORIZON")
        last_a = await _commit(pool, a, _plain(DAY1, 7, "a"), 200, last_a)
        last_b = await _commit(
            pool, b, _plain(DAY1, 5, "b") + _plain(DAY2, 4, "b2"), 100, "TRIM_HORIZON"
        )
        last_b = await _commit(pool, b, _plain(DAY2, 6, "b3"), 300, last_b)
        # RDS for Oracle and for SQL Server: the engine columns (jsonb, text) of migration 0006.
        engines = [
            seal(inner_document(ORACLE_INSTANCE, oracle_event(
                logTime="2024-03-02 12:00:00.123456",
                engineNativeAuditFields={"UNIFIED_AUDIT_POLICIES": "TEST_POL_EVERYTHING",
                                         "OS_USERNAME": "\u00e9 rdsadmin"},
            )), KEY, "1.3"),
            seal(inner_document(SQLSERVER_INSTANCE, sqlserver_event(
                logTime="2024-03-02 13:00:00.4120677+00",
            )), KEY, "1.4"),
        ]  # fmt: skip
        await _commit(pool, b, [], 400, last_b, sealed=engines)
        kms = boto3.client("kms", endpoint_url=stack.kms_endpoint)
        key_id = kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"][
            "KeyId"
        ]
        async with aws_client("kms") as client, pool.acquire() as conn:
            assert await anchor_heads(conn, AnchorKey(client, key_id), STREAM)
        s3 = boto3.client("s3", endpoint_url=aws_env["AWS_ENDPOINT_URL_S3"])
        bucket = f"archive-{secrets.token_hex(4)}"
        s3.create_bucket(Bucket=bucket)
        # Versioning shows any rewrite of an object as a second version.
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        location = ArchiveLocation(bucket, "audit/das")
        yield Archive(pg_dsn, pool, bucket, location, key_id, s3)
    finally:
        await pool.close()


async def _archive(
    w: Archive, *, s3: Any = None, bound: date = date(2024, 3, 3), **settings: Any
) -> list[Any]:
    async with aws_client("s3") as real_s3, aws_client("kms") as kms, w.pool.acquire() as conn:
        days = await days_before(conn, bound, None)
        return await archive_days(
            conn,
            s3 if s3 is not None else real_s3,
            ArchiveSettings(w.location, **settings),
            days,
            checker=AnchorChecker(kms, w.key_id),
        )


async def _verify(w: Archive, day: date | None = None) -> ArchiveReport:
    async with aws_client("s3") as s3, aws_client("kms") as kms:
        return await verify_archive(s3, w.location, checker=AnchorChecker(kms, w.key_id), day=day)


async def _warehouse_rows(w: Archive, day: date) -> list[list[Any]]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    rows = await w.pool.fetch(
        f"SELECT {', '.join(EVENT_COLUMNS)} FROM das.activity_events WHERE log_time >= $1 "
        "AND log_time < $2 ORDER BY shard_id, sequence_number, event_index",
        start,
        start + timedelta(days=1),
    )
    return [_normal(stored_values(r)) for r in rows]


def _normal(values: list[Any]) -> list[Any]:
    """Values comparable across sources: sequence numbers as text, times in UTC."""
    out = []
    for column, value in zip(EVENT_COLUMNS, values, strict=True):
        if column == "sequence_number" and value is not None:
            value = str(value)
        elif isinstance(value, datetime):
            value = value.astimezone(UTC)
        out.append(value)
    return out


async def _jsonb_columns(w: Archive) -> set[str]:
    rows = await w.pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'das' "
        "AND table_name = 'activity_events' AND data_type = 'jsonb'"
    )
    return {r["column_name"] for r in rows}


def _parquet_rows(table: pa.Table, jsonb: set[str]) -> list[list[Any]]:
    """Rows of an archived table (Parquet columns: jsonb as JSON text, parsed here)."""
    columns = []
    for name in EVENT_COLUMNS:
        values = table.column(name).to_pylist()
        if name in jsonb:
            values = [None if v is None else orjson.loads(v) for v in values]
        columns.append(values)
    return [_normal(list(row)) for row in zip(*columns, strict=True)]


def _read_day(w: Archive, objects: dict[str, bytes], day: date) -> pa.Table:
    prefix = w.location.day_dir(STREAM, day)
    parts = sorted(k for k in objects if k.startswith(prefix) and k.endswith(".parquet"))
    return pa.concat_tables(pq.read_table(io.BytesIO(objects[k])) for k in parts)


# -- archive, read back, verify ----------------------------------------------------------------


async def test_archived_days_read_back_equal_to_the_warehouse(
    archive: Archive, tmp_path: Path
) -> None:
    jsonb = await _jsonb_columns(archive)
    assert {"param_list", "extra"} <= jsonb
    result = await das_ingest(
        "archive", "--to", archive.url, "--before", BEFORE, env={"DAS_DSN": archive.dsn}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 days archived and verified" in result.stdout
    objects = archive.objects()
    for day in (FAR, DAY1, DAY2):
        table = _read_day(archive, objects, day)
        # Typed columns: times in UTC microseconds, jsonb as JSON text, arrays as lists.
        assert table.schema.field("log_time").type == pa.timestamp("us", tz="UTC")
        assert table.schema.field("extra").type == pa.string()
        assert table.schema.field("anomalies").type == pa.list_(pa.string())
        assert table.schema.field("pid").type == pa.int64()
        assert _parquet_rows(table, jsonb) == await _warehouse_rows(archive, day)
        manifest = Manifest.from_bytes(objects[archive.day_key(day, "_manifest.json")])
        assert manifest.rows == table.num_rows
        for f in manifest.files:
            assert hashlib.sha256(objects[archive.day_key(day, f.name)]).hexdigest() == f.sha256
    # Awkward values made it through unchanged (not just equal to each other).
    day1 = _parquet_rows(_read_day(archive, objects, DAY1), jsonb)
    text = EVENT_COLUMNS.index("command_text")
    assert any(r[text] and "\t\n" in r[text] and "\U0001f600" in r[text] for r in day1)
    anomalies = EVENT_COLUMNS.index("anomalies")
    assert any(r[anomalies] == ["startTime:time"] for r in day1)
    # The engine columns a later migration added came along (Oracle's native audit fields).
    day2 = _parquet_rows(_read_day(archive, objects, DAY2), jsonb)
    native = EVENT_COLUMNS.index("engine_native_audit_fields")
    assert any(r[native] and "UNIFIED_AUDIT_POLICIES" in r[native] for r in day2)
    # DuckDB reads the same files, through the Hive layout, value for value.
    for key, data in objects.items():
        if key.endswith(".parquet"):
            local = tmp_path / key
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
    con = duckdb.connect()
    glob = str(tmp_path / archive.location.prefix / "**" / "*.parquet")
    counted = con.execute(
        f"SELECT stream, day, count(*) FROM read_parquet('{glob}', hive_partitioning = true) "
        "GROUP BY ALL ORDER BY day"
    ).fetchall()
    assert [(s, str(d), n) for s, d, n in counted] == [
        (STREAM, FAR.isoformat(), 1),
        (STREAM, DAY1.isoformat(), 2 + 7 + 5),
        (STREAM, DAY2.isoformat(), 2 + 4 + 6 + 2),
    ]
    con.execute("SET TimeZone = 'UTC'")
    for day in (FAR, DAY1, DAY2):
        table = con.sql(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM read_parquet('{glob}', "
            f"hive_partitioning = true) WHERE day = '{day.isoformat()}' "
            "ORDER BY shard_id, length(sequence_number), sequence_number, event_index"
        ).to_arrow_table()
        assert _parquet_rows(table, jsonb) == await _warehouse_rows(archive, day)
    recorded = await archive.pool.fetch(
        "SELECT stream_name, day, manifest, manifest_sha256, rows FROM das.archived_days "
        "ORDER BY day"
    )
    assert [(r["day"], r["rows"]) for r in recorded] == [(FAR, 1), (DAY1, 14), (DAY2, 14)]
    for r in recorded:
        raw = objects[archive.day_key(r["day"], "_manifest.json")]
        assert r["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
        assert (
            r["manifest"] == f"s3://{archive.bucket}/{archive.day_key(r['day'], '_manifest.json')}"
        )
    verified = await das_ingest(
        "verify", "--archive", archive.url, "--anchor-key-id", archive.key_id
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "checked 3 days" in verified.stdout
    assert "no findings" in verified.stdout


async def test_older_than_archives_every_whole_day_before_its_bound(archive: Archive) -> None:
    result = await das_ingest(
        "archive", "--to", archive.url, "--older-than", "2d", "--stream", STREAM,
        "--anchor-key-id", archive.key_id, env={"DAS_DSN": archive.dsn},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()[:3]] == [
        f"{STREAM} {d}" for d in (FAR, DAY1, DAY2)
    ]
    other = await das_ingest(
        "archive", "--to", archive.url, "--older-than", "2d", "--stream", "another-stream",
        env={"DAS_DSN": archive.dsn},
    )  # fmt: skip
    assert other.returncode == 0
    assert "nothing to archive before" in other.stdout


async def test_files_are_bounded_and_a_rerun_rewrites_nothing(archive: Archive) -> None:
    first = await _archive(archive, max_file_rows=4)
    assert [r.status for r in first] == ["archived"] * 3, [r.detail for r in first]
    assert [r.files for r in first] == [1, 4, 4]  # 14 and 14 rows, at most 4 per file
    again = await _archive(archive, max_file_rows=4)
    assert [r.status for r in again] == ["complete"] * 3
    assert sum(r.written_files for r in again) == 0
    versions = archive.s3.list_object_versions(Bucket=archive.bucket)["Versions"]
    assert all(v["IsLatest"] for v in versions)  # one version each: nothing rewritten
    report = await _verify(archive)
    assert report.clean, report.findings
    assert (report.days, report.files, report.rows) == (3, 9, 29)


# -- tampering -----------------------------------------------------------------------------------


def _rewrite(archive: Archive, key: str, change: Any) -> None:
    table = pq.read_table(
        io.BytesIO(archive.s3.get_object(Bucket=archive.bucket, Key=key)["Body"].read())
    )
    out = io.BytesIO()
    pq.write_table(change(table), out, compression="zstd")
    archive.s3.put_object(Bucket=archive.bucket, Key=key, Body=out.getvalue())


def _found(report: ArchiveReport) -> set[tuple[str, str | None, int | None]]:
    return {(f.kind, f.file, f.row) for f in report.findings}


async def test_a_changed_value_is_found_with_its_file_and_rows(archive: Archive) -> None:
    await _archive(archive, max_file_rows=4)
    key = archive.day_key(DAY1, "part-0001.parquet")

    def change(table: pa.Table) -> pa.Table:
        i = table.schema.get_field_index("db_user_name")
        values = table.column(i).to_pylist()
        values[2] = "nobody"
        return table.set_column(i, "db_user_name", pa.array(values, pa.string()))

    _rewrite(archive, key, change)
    report = await _verify(archive)
    assert {f.kind for f in report.findings} == {"altered", "file_altered"}
    assert all(f.day == DAY1.isoformat() for f in report.findings)
    # The row digests written when the day was archived place the change at its row ...
    assert ("altered", "part-0001.parquet", 2) in _found(report)
    # ... and the chain link whose digest no longer matches proves it. The link's events span
    # three files; the finding is placed in the one whose hash changed.
    (link,) = [f for f in report.findings if f.kind == "altered" and f.link_no is not None]
    assert (link.file, link.row) == ("part-0001.parquet", 0)
    assert "part-0001.parquet rows 0..3" in link.detail
    assert "part-0000.parquet" not in link.detail
    assert ("file_altered", "part-0001.parquet", None) in _found(report)
    result = await das_ingest("verify", "--archive", archive.url, "--day", DAY1.isoformat())
    assert result.returncode == 1
    assert "ALTERED" in result.stdout
    assert "part-0001.parquet" in result.stdout


async def test_a_deleted_row_is_found(archive: Archive) -> None:
    await _archive(archive, max_file_rows=4)
    _rewrite(archive, archive.day_key(DAY2, "part-0000.parquet"), lambda t: t.slice(1))
    report = await _verify(archive, DAY2)
    kinds = {f.kind for f in report.findings}
    assert kinds == {"deleted", "file_altered"}, report.findings
    deleted = next(f for f in report.findings if f.kind == "deleted" and f.link_no is not None)
    assert "1 of" in deleted.detail
    assert deleted.day == DAY2.isoformat()
    assert deleted.file == "part-0000.parquet"
    assert ("deleted", "part-0000.parquet", 0) in _found(report)  # by the row digests


async def test_reordered_rows_are_found_at_their_row(archive: Archive) -> None:
    await _archive(archive, max_file_rows=4)
    key = archive.day_key(DAY2, "part-0001.parquet")
    _rewrite(archive, key, lambda t: pa.concat_tables([t.slice(1, 1), t.slice(0, 1), t.slice(2)]))
    report = await _verify(archive, DAY2)
    assert ("reordered", "part-0001.parquet", 1) in _found(report), report.findings
    # The row digests see the moved row too; the chain link sees its digest change.
    moved = [f for f in report.findings if "row digests" in f.detail]
    assert [(f.kind, f.row) for f in moved] == [("reordered", 1)]
    assert "archived as row 0" in moved[0].detail
    assert "altered" in {f.kind for f in report.findings}


async def test_a_removed_file_is_found(archive: Archive) -> None:
    await _archive(archive, max_file_rows=4)
    archive.s3.delete_object(Bucket=archive.bucket, Key=archive.day_key(DAY1, "part-0002.parquet"))
    report = await _verify(archive)
    assert ("file_missing", "part-0002.parquet", None) in _found(report)
    assert "deleted" in {f.kind for f in report.findings}
    assert {f.day for f in report.findings} == {DAY1.isoformat()}


async def test_an_added_row_and_a_forged_manifest_are_found(archive: Archive) -> None:
    await _archive(archive)
    key = archive.day_key(DAY2, "part-0000.parquet")
    _rewrite(archive, key, lambda t: pa.concat_tables([t, t.slice(t.num_rows - 1)]))
    # Someone updates the manifest's hashes and counts to match: the chain still refuses.
    manifest_key = archive.day_key(DAY2, "_manifest.json")
    data = orjson.loads(
        archive.s3.get_object(Bucket=archive.bucket, Key=manifest_key)["Body"].read()
    )
    body = archive.s3.get_object(Bucket=archive.bucket, Key=key)["Body"].read()
    data["files"][0].update(sha256=hashlib.sha256(body).hexdigest(), rows=15, bytes=len(body))
    archive.s3.put_object(Bucket=archive.bucket, Key=manifest_key, Body=orjson.dumps(data))
    report = await _verify(archive, DAY2)
    assert ("inserted", "part-0000.parquet", 14) in _found(report), report.findings
    assert "file_altered" not in {f.kind for f in report.findings}
    # A manifest whose links were rewritten no longer reaches its KMS-checked anchor.
    links = data["shards"]["shardId-000000000001"]["links"]
    links[-1]["days"][DAY2.isoformat()]["n"] += 1
    links[-1]["event_count"] += 1
    archive.s3.put_object(Bucket=archive.bucket, Key=manifest_key, Body=orjson.dumps(data))
    report = await _verify(archive, DAY2)
    assert "link_altered" in {f.kind for f in report.findings}


# -- crash and re-run ----------------------------------------------------------------------------


class _CrashAfter:
    """The real S3 client, but the ``n``-th completed upload of a part file crashes the run."""

    def __init__(self, s3: Any, n: int) -> None:
        self._s3, self._left = s3, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    async def complete_multipart_upload(self, **kwargs: Any) -> Any:
        self._left -= 1
        if self._left == 0:
            raise ConnectionResetError("crash mid-archive")
        return await self._s3.complete_multipart_upload(**kwargs)


async def test_a_crash_mid_archive_is_completed_by_a_rerun(archive: Archive) -> None:
    async with aws_client("s3") as s3:
        # A connection reset is S3 unavailable: the command exits 3 and a re-run completes.
        with pytest.raises(S3UnavailableError):
            await _archive(archive, s3=_CrashAfter(s3, 3), max_file_rows=4)
    # FAR was archived; DAY1 has part 0 and no manifest; the failed upload was aborted.
    keys = set(archive.objects())
    assert archive.day_key(FAR, "_manifest.json") in keys
    assert archive.day_key(DAY1, "part-0000.parquet") in keys
    assert archive.day_key(DAY1, "part-0001.parquet") not in keys
    assert archive.day_key(DAY1, "_manifest.json") not in keys
    assert not archive.s3.list_multipart_uploads(Bucket=archive.bucket).get("Uploads")
    partial = await _verify(archive, DAY1)
    assert "manifest_missing" in {f.kind for f in partial.findings}
    assert await archive.pool.fetchval("SELECT count(*) FROM das.archived_days") == 1
    rerun = await _archive(archive, max_file_rows=4)
    assert [(r.day, r.status, r.written_files) for r in rerun] == [
        (FAR, "complete", 0),
        (DAY1, "archived", 3),  # parts 1..3: part 0 was kept
        (DAY2, "archived", 4),
    ]
    versions = archive.s3.list_object_versions(Bucket=archive.bucket)["Versions"]
    assert all(v["IsLatest"] for v in versions)
    report = await _verify(archive)
    assert report.clean, report.findings
    assert await archive.pool.fetchval("SELECT count(*) FROM das.archived_days") == 3


async def test_a_part_left_from_other_events_is_not_kept(archive: Archive) -> None:
    async with aws_client("s3") as s3:
        with pytest.raises(S3UnavailableError):
            await _archive(archive, s3=_CrashAfter(s3, 3), max_file_rows=4)
    # The day changed in the warehouse since its first part was written.
    await archive.pool.execute(
        "DELETE FROM das.activity_events WHERE log_time >= $1 AND sequence_number = 100",
        datetime(2024, 3, 1, tzinfo=UTC),
    )
    rerun = await _archive(archive, max_file_rows=4)
    day1 = next(r for r in rerun if r.day == DAY1)
    assert day1.status == "skipped"
    assert "delete the day's directory" in day1.detail


async def test_a_day_whose_links_are_not_anchored_waits_for_its_anchor(archive: Archive) -> None:
    await archive.pool.execute(
        "DELETE FROM das.chain_anchors WHERE shard_id = 'shardId-000000000001'"
    )
    result = await das_ingest(
        "archive", "--to", archive.url, "--before", BEFORE, "--anchor-key-id", archive.key_id,
        env={"DAS_DSN": archive.dsn},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    # Shard 1 has events on both days; the far day is shard 0's alone.
    assert f"{STREAM} {FAR}: archived" in result.stdout
    for day in (DAY1, DAY2):
        assert f"{STREAM} {day}: skipped: the links of {STREAM} shardId-000000000001" in (
            result.stdout
        )
    assert "run `das-ingest anchor`" in result.stdout
    assert "1 of 3 days archived and verified" in result.stdout
    keys = set(archive.objects())
    assert not [k for k in keys if "/day=2024-03-0" in k]  # nothing written for them


async def test_a_day_another_run_is_archiving_is_left_to_it(archive: Archive) -> None:
    from ingest.archive.export import DAY_LOCK

    holder = await asyncpg.connect(archive.dsn)
    try:
        assert await holder.fetchval(DAY_LOCK, STREAM, DAY1.isoformat())
        results = await _archive(archive)
    finally:
        await holder.close()
    assert [(r.day, r.status) for r in results] == [
        (FAR, "archived"),
        (DAY1, "skipped"),
        (DAY2, "archived"),
    ]
    assert "another das-ingest archive" in results[1].detail
    assert archive.day_key(DAY1, "_manifest.json") not in archive.objects()
    again = await _archive(archive)  # the lock is released once the other run is gone
    assert [r.status for r in again] == ["complete", "archived", "complete"]


# -- retention -----------------------------------------------------------------------------------


async def test_retention_drops_only_archived_days_and_verify_accepts_them(
    archive: Archive,
) -> None:
    env = {"DAS_DSN": archive.dsn}
    refused = await das_ingest("retention", "--keep", "1d", env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "not archived and verified" in refused.stdout
    assert await archive.pool.fetchval("SELECT count(*) FROM das.retention_log") == 0
    assert await archive.pool.fetchval("SELECT count(*) FROM das.activity_events") == 29
    # Archive only the first two days: retention drops those and stops at the third.
    await _archive(archive, bound=DAY2)
    partly = await das_ingest("retention", "--keep", "1d", env=env)
    assert partly.returncode == 1
    assert f"kept activity_events_p{DAY2:%Y%m%d}" in partly.stdout
    assert f"dropped activity_events_p{DAY1:%Y%m%d}" in partly.stdout
    logged = await archive.pool.fetch(
        "SELECT partition_name, rows_removed, archive::text AS archive FROM das.retention_log "
        "ORDER BY id"
    )
    assert [(r["partition_name"], r["rows_removed"]) for r in logged] == [
        (f"activity_events_p{DAY1:%Y%m%d}", 14),
        ("activity_events_default", 1),
    ]
    objects = archive.objects()
    entry = orjson.loads(logged[0]["archive"])[0]
    manifest_key = archive.day_key(DAY1, "_manifest.json")
    assert entry["manifest"] == f"s3://{archive.bucket}/{manifest_key}"
    assert entry["manifest_sha256"] == hashlib.sha256(objects[manifest_key]).hexdigest()
    async with archive.pool.acquire() as conn:
        report = await verify_warehouse(conn, kms=None)
    assert report.clean, report.findings
    assert sorted(report.archived_days) == [FAR.isoformat(), DAY1.isoformat()]
    assert report.archived_days[DAY1.isoformat()] == [entry["manifest"]]
    # A record naming archives that do not hold what it removed is not believed.
    await archive.pool.execute(
        "UPDATE das.retention_log SET archive = jsonb_set(archive, '{0,rows}', '13') "
        "WHERE partition_name = $1",
        f"activity_events_p{DAY1:%Y%m%d}",
    )
    async with archive.pool.acquire() as conn:
        forged = await verify_warehouse(conn, kms=None)
    assert "retention_invalid" in {f.kind for f in forged.findings}


async def test_retention_refuses_a_day_that_changed_after_archiving(archive: Archive) -> None:
    await _archive(archive)
    await archive.pool.execute(
        "DELETE FROM das.activity_events WHERE log_time >= $1 AND log_time < $2 "
        "AND sequence_number = 200",
        datetime(2024, 3, 1, tzinfo=UTC),
        datetime(2024, 3, 2, tzinfo=UTC),
    )
    result = await das_ingest("retention", "--keep", "1d", env={"DAS_DSN": archive.dsn})
    assert result.returncode == 1
    assert "13 events but its verified archive has 14" in result.stdout
    dropped = await das_ingest(
        "retention", "--keep", "1d", "--no-archive", env={"DAS_DSN": archive.dsn}
    )
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert await archive.pool.fetchval("SELECT count(*) FROM das.activity_events") == 0


# -- options, DDL, usage -------------------------------------------------------------------------


async def test_object_lock_and_sse_kms_apply_to_every_object(
    archive: Archive, stack: LocalStack
) -> None:
    locked = f"locked-{secrets.token_hex(4)}"
    archive.s3.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    kms = boto3.client("kms", endpoint_url=stack.kms_endpoint)
    sse_key = kms.create_key()["KeyMetadata"]["KeyId"]
    until = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    result = await das_ingest(
        "archive", "--to", f"s3://{locked}/x", "--before", "2024-03-02",
        "--object-lock-mode", "GOVERNANCE", "--object-lock-retain-until", until.isoformat(),
        "--sse-kms-key-id", sse_key, "--anchor-key-id", archive.key_id,
        env={"DAS_DSN": archive.dsn},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    keys = [o["Key"] for o in archive.s3.list_objects_v2(Bucket=locked)["Contents"]]
    assert len(keys) == 6  # two days: a part, its row digests and a manifest each
    for key in keys:
        head = archive.s3.head_object(Bucket=locked, Key=key)
        assert head["ObjectLockMode"] == "GOVERNANCE"
        assert head["ObjectLockRetainUntilDate"] == until
        assert head["ServerSideEncryption"] == "aws:kms"
        assert sse_key in head["SSEKMSKeyId"]
        with pytest.raises(archive.s3.exceptions.ClientError, match="AccessDenied"):
            archive.s3.delete_object(Bucket=locked, Key=key, VersionId=head["VersionId"])


async def test_the_shipped_athena_ddl_is_the_warehouse_s(archive: Archive) -> None:
    shipped = Path(__file__).parents[1] / "deploy" / "athena" / "das_archive.sql"
    result = await das_ingest(
        "archive", "--athena-ddl", "--to", "s3://your-archive-bucket/das",
        env={"DAS_DSN": archive.dsn},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout in shipped.read_text()
    async with archive.pool.acquire() as conn:
        columns = await Columns.from_warehouse(conn)
    assert columns.names == list(EVENT_COLUMNS)


async def test_an_unmigrated_warehouse_is_a_one_line_configuration_error(pg_dsn: str) -> None:
    result = await das_ingest(
        "archive", "--to", "s3://bucket/p", "--before", BEFORE, env={"DAS_DSN": pg_dsn}
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "run `das-ingest migrate` first" in result.stderr
    assert "Traceback" not in result.stderr


def _one_line(result: Result, code: int, cause: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert cause in line, line


async def test_an_unreachable_s3_is_a_dependency_unavailable(archive: Archive) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    result = await das_ingest(
        "archive", "--to", archive.url, "--before", BEFORE,
        env={"DAS_DSN": archive.dsn, "AWS_ENDPOINT_URL_S3": closed},
    )  # fmt: skip
    _one_line(result, 3, "S3 unavailable (S3 unreachable (EndpointConnectionError))")
    assert "run it again" in result.stderr
    verified = await das_ingest(
        "verify", "--archive", archive.url, env={"AWS_ENDPOINT_URL_S3": closed}
    )
    _one_line(verified, 3, "S3 unavailable")
    # Nothing was recorded as archived.
    assert await archive.pool.fetchval("SELECT count(*) FROM das.archived_days") == 0


async def test_a_missing_bucket_is_a_configuration_error(archive: Archive) -> None:
    missing = f"archive-missing-{secrets.token_hex(4)}"
    result = await das_ingest(
        "archive", "--to", f"s3://{missing}/das", "--before", BEFORE, env={"DAS_DSN": archive.dsn}
    )
    _one_line(result, 2, f"cannot use bucket {missing}: 404")
    verified = await das_ingest("verify", "--archive", f"s3://{missing}/das")
    _one_line(verified, 2, f"cannot use bucket {missing}: 404")


class _FailingS3(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint whose bucket exists (HeadBucket answers 200) but that answers every other
    request 503 SlowDown: S3 throttling a run after it started, beyond botocore's retries."""

    def _slow_down(self) -> None:
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        if self.path.strip("/").count("/") == 0 and "?" not in self.path:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._slow_down()

    def do_GET(self) -> None:
        self._slow_down()

    do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def throttling_s3() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_s3_throttling_mid_run_is_a_dependency_unavailable(
    archive: Archive, throttling_s3: str
) -> None:
    result = await das_ingest(
        "archive", "--to", archive.url, "--before", BEFORE,
        env={"DAS_DSN": archive.dsn, "AWS_ENDPOINT_URL_S3": throttling_s3},
    )  # fmt: skip
    _one_line(result, 3, "S3 unavailable (S3 503)")
    verified = await das_ingest(
        "verify", "--archive", archive.url, env={"AWS_ENDPOINT_URL_S3": throttling_s3}
    )
    _one_line(verified, 3, "S3 unavailable")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (_client_error("SlowDown", 503), S3UnavailableError),
        (_client_error("InternalError", 500), S3UnavailableError),
        (_client_error("ServiceUnavailable", 503), S3UnavailableError),
        (_client_error("503", 503), S3UnavailableError),  # a HEAD answer has no body
        (_client_error("SomethingNew", 502), S3UnavailableError),  # any 5xx
        (_client_error("RequestTimeout", 400), S3UnavailableError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), S3UnavailableError),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), S3UnavailableError),
        (ConnectionResetError("reset"), S3UnavailableError),
        (_client_error("NoSuchBucket", 404), S3ConfigError),
        (_client_error("AccessDenied", 403), S3ConfigError),
        (_client_error("403", 403), S3ConfigError),
        (_client_error("InvalidAccessKeyId", 403), S3ConfigError),
        (_client_error("PermanentRedirect", 301), S3ConfigError),
        (NoCredentialsError(), S3ConfigError),
        (_client_error("InvalidPart", 400), S3Error),
    ],
    ids=lambda v: (
        v.__name__ if isinstance(v, type) else type(v).__name__ + str(error_code(v) or "")
    ),
)
def test_s3_errors_are_classified_by_class_and_code(error: Exception, kind: type) -> None:
    got = classify(error)
    assert type(got) is kind, got
    assert got.retriable is (kind is S3UnavailableError)
    assert isinstance(got, ConfigError) is (kind is S3ConfigError)


def test_columns_come_from_the_chain_s_column_list() -> None:
    types = dict.fromkeys(EVENT_COLUMNS, "text")
    assert Columns.from_types(types).names == list(EVENT_COLUMNS)
    with pytest.raises(ValueError, match="lacks the chained columns"):
        Columns.from_types(dict.fromkeys(EVENT_COLUMNS[1:], "text"))
    with pytest.raises(ValueError, match="column types"):
        Columns.from_types({**types, "pid": "point"})
    ddl = athena_ddl(Columns.from_types(types), location="s3://b/p")
    assert all(f"`{c}` string" in ddl for c in EVENT_COLUMNS)
    assert "'storage.location.template' = 's3://b/p/stream=${stream}/day=${day}/'" in ddl


@pytest.mark.parametrize(
    ("recorded", "actual", "expected"),
    [
        ("abcdef", "abcdef", []),
        ("abcdef", "abXdef", [("altered", 2, 1, 2)]),
        ("abcdef", "abdef", [("deleted", 2, 1, 2)]),
        ("abcdef", "abef", [("deleted", 2, 2, 2)]),
        ("abcdef", "abcXdef", [("inserted", 3, 1, 3)]),
        ("abcdef", "abcdefX", [("inserted", 6, 1, 6)]),
        ("abcdef", "abcd", [("deleted", 4, 2, 4)]),
        ("abcdef", "bacdef", [("reordered", 1, 1, 0)]),  # a moved after b
        ("abcdef", "abdecf", [("reordered", 4, 1, 2)]),
        ("abcdef", "", [("deleted", 0, 6, 0)]),
    ],
)
def test_row_digests_place_each_change_at_its_row(
    recorded: str, actual: str, expected: list[tuple[str, int, int, int]]
) -> None:
    def digests(rows: str) -> bytes:
        return b"".join(hashlib.sha256(r.encode()).digest()[:DIGEST_PREFIX] for r in rows)

    assert locate(digests(recorded), digests(actual)) == expected


def test_archive_locations() -> None:
    loc = ArchiveLocation.parse("s3://my-bucket/a/b/")
    assert (loc.bucket, loc.prefix) == ("my-bucket", "a/b")
    assert loc.part_key("s", DAY1, 7) == "a/b/stream=s/day=2024-03-01/part-0007.parquet"
    assert loc.parse_manifest_key("a/b/stream=s/day=2024-03-01/_manifest.json") == ("s", DAY1)
    assert loc.parse_manifest_key("other/stream=s/day=2024-03-01/_manifest.json") is None
    assert ArchiveLocation.parse("s3://bucket").prefix == ""
    for bad in ("http://b/p", "s3://B/p", "s3://b", "s3://ok-bucket/a//b"):
        with pytest.raises(ValueError):
            ArchiveLocation.parse(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["archive", "--before", "2024-03-01"], "give --to"),
        (["archive", "--to", "s3://bucket/p"], "give --before"),
        (["archive", "--to", "ftp://x", "--before", "2024-03-01"], "is not an s3://"),
        (["archive", "--to", "s3://bucket/p", "--before", "2999-01-01"], "after today"),
        (["archive", "--to", "s3://bucket/p", "--older-than", "soon"], "--older-than"),
        (
            [
                "archive",
                "--to",
                "s3://bucket/p",
                "--before",
                "2024-03-01",
                "--object-lock-mode",
                "COMPLIANCE",
            ],
            "go together",
        ),
        (["verify", "--archive", "s3://bucket/p", "--day", "yesterday"], "is not a date"),
        (["verify", "--day", "2024-03-01"], "--day needs --archive"),
        (["verify", "--archive", "s3://bucket/p", "--since", "2024-03-01"], "--since checks"),
        (["verify", "--archive", "s3://bucket/p", "--anchors", "a.jsonl"], "--anchors checks"),
    ],
)
async def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    # DAS_RETENTION_KEEP is for the warehouse's verify: in the environment, it does not stop
    # verify --archive.
    result = await das_ingest(*args, env={"DAS_ARCHIVE_URL": "", "DAS_RETENTION_KEEP": "90d"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


#: The IAM action each S3 operation the archive calls needs (S3's actions are not named like
#: its operations).
S3_ACTIONS = {
    "HeadBucket": "s3:ListBucket",
    "ListObjectsV2": "s3:ListBucket",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "HeadObject": "s3:GetObject",
    "GetObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "PutObjectRetention": "s3:PutObjectRetention",
}


def test_the_archive_policy_allows_exactly_the_s3_calls_of_the_archive() -> None:
    import re

    import botocore.session
    from botocore import xform_name

    model = botocore.session.get_session().get_service_model("s3")
    by_method = {xform_name(name): name for name in model.operation_names}
    root = Path(__file__).parents[1]
    called = set()
    for path in [*(root / "ingest" / "archive").glob("*.py"), root / "ingest/commands/archive.py"]:
        for method in re.findall(r"\bawait\s+[\w.]*?(\w+)\(", path.read_text()):
            if method in by_method:
                called.add(by_method[method])
    # The scan sees what is known to be there (so it can tell).
    assert {"CreateMultipartUpload", "GetObject", "HeadBucket", "PutObjectRetention"} <= called
    # Listing goes through a paginator, which the scan cannot see.
    assert 'get_paginator("list_objects_v2")' in (root / "ingest/archive/s3.py").read_text()
    called.add("ListObjectsV2")
    needed = {S3_ACTIONS[op] for op in called}
    policy = orjson.loads((root / "deploy" / "iam-policy-archive.json").read_bytes())
    allowed = {
        action
        for statement in policy["Statement"]
        if statement["Effect"] == "Allow"
        for action in statement["Action"]
        if action.startswith("s3:")
    }
    assert allowed == needed
