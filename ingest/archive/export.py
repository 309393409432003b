"""``das-ingest archive``: whole UTC days of the warehouse to Parquet on S3 (docs/archive.md).

Per stream and day, in one REPEATABLE READ snapshot of the warehouse: the events in chain
order (shard, sequence number, event index) through a server-side cursor, written a row group
at a time into Parquet files of bounded size (each spooled to a local temporary file, hashed,
and sent as a multipart upload, so memory stays bounded whatever the day's size), then the
manifest with the chain evidence. A day is complete once its manifest exists; then it is read
back from S3 and verified (:mod:`ingest.archive.check`) and recorded in das.archived_days, which
retention requires.

Crash safety: a part's object appears only when its multipart upload completes, and carries
its row count, SHA-256 and last event in its metadata. A re-run keeps every part that exists
(after checking that the warehouse still has the same events up to its last one), writes the
missing ones and the manifest, and rewrites nothing of a day whose manifest exists.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq

from ingest.archive import s3 as s3io
from ingest.archive.check import ArchiveReport, verify_day
from ingest.archive.columns import Columns
from ingest.archive.location import ArchiveLocation
from ingest.archive.manifest import (
    ArchivedFile,
    ArchivedLink,
    Manifest,
    ShardEvidence,
)
from ingest.conn import Conn
from ingest.errors import IngestError
from ingest.integrity.anchor import Anchor
from ingest.integrity.canonical import LinkFields
from ingest.progress import Progress

#: Rows fetched from the cursor, and written as one Parquet row group, at a time.
BATCH_ROWS = 16384
#: A file is closed once it holds this many bytes (checked after each row group).
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_FILE_ROWS = 4_000_000
#: A session-level advisory lock per stream and day: one archive run at a time writes a day.
_DAY_KEY = "hashtextextended('das.archive:' || $1 || ':' || $2, 0)"
DAY_LOCK = f"SELECT pg_try_advisory_lock({_DAY_KEY})"
DAY_UNLOCK = f"SELECT pg_advisory_unlock({_DAY_KEY})"


class ArchiveError(IngestError):
    """A day cannot be archived as asked (the warehouse changed under a partial archive, an
    unanchored chain, ...): the message says what to do."""


@dataclass(frozen=True)
class ArchiveSettings:
    location: ArchiveLocation
    write: s3io.WriteOptions = field(default_factory=s3io.WriteOptions)
    max_file_bytes: int = MAX_FILE_BYTES
    max_file_rows: int = MAX_FILE_ROWS
    batch_rows: int = BATCH_ROWS


@dataclass
class DayResult:
    stream: str
    day: date
    #: archived | complete (already archived) | skipped (why in ``detail``) | failed
    status: str
    rows: int = 0
    files: int = 0
    bytes: int = 0
    written_files: int = 0
    manifest_sha256: str | None = None
    detail: str = ""
    report: ArchiveReport | None = None


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


async def days_before(conn: Conn, bound: date, stream: str | None) -> list[tuple[str, date]]:
    """Every (stream, UTC day) with events before ``bound``, oldest first: the day partitions'
    days and the days of the default partition's events."""
    rows = await conn.fetch(
        """
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'das.activity_events'::regclass
        """
    )
    found: set[tuple[str, date]] = set()
    for r in rows:
        name = r["relname"]
        if name.startswith("activity_events_p") and name[-8:].isdigit():
            day = datetime.strptime(name[-8:], "%Y%m%d").date()
            if day < bound:
                for s in await conn.fetch(
                    f'SELECT DISTINCT stream_name FROM das."{name}" '
                    "WHERE $1::text IS NULL OR stream_name = $1",
                    stream,
                ):
                    found.add((s["stream_name"], day))
    for r in await conn.fetch(
        """
        SELECT DISTINCT stream_name, (log_time AT TIME ZONE 'UTC')::date AS day
        FROM das.activity_events_default
        WHERE log_time < $1 AND ($2::text IS NULL OR stream_name = $2)
        """,
        datetime.combine(bound, time(), tzinfo=UTC),
        stream,
    ):
        found.add((r["stream_name"], r["day"]))
    return sorted(found, key=lambda x: (x[1], x[0]))


async def archive_days(
    conn: Conn,
    s3: Any,
    settings: ArchiveSettings,
    days: list[tuple[str, date]],
    *,
    checker: Any,
    progress: Progress | None = None,
    verified: Progress | None = None,
) -> list[DayResult]:
    columns = await Columns.from_warehouse(conn)
    results = []
    for stream, day in days:
        results.append(
            await archive_day(conn, s3, settings, columns, stream, day, checker, progress, verified)
        )
    return results


async def archive_day(
    conn: Conn,
    s3: Any,
    settings: ArchiveSettings,
    columns: Columns,
    stream: str,
    day: date,
    checker: Any,
    progress: Progress | None = None,
    verified: Progress | None = None,
) -> DayResult:
    result = DayResult(stream, day, "archived")
    # Two runs on one day would race to write its manifest: one archives it, the other waits
    # for a later run.
    if not await conn.fetchval(DAY_LOCK, stream, day.isoformat()):
        result.status = "skipped"
        result.detail = "another das-ingest archive is archiving this day"
        return result
    try:
        return await _archive_locked_day(
            conn, s3, settings, columns, stream, day, checker, progress, verified, result
        )
    finally:
        await conn.fetchval(DAY_UNLOCK, stream, day.isoformat())


async def _archive_locked_day(
    conn: Conn,
    s3: Any,
    settings: ArchiveSettings,
    columns: Columns,
    stream: str,
    day: date,
    checker: Any,
    progress: Progress | None,
    verified: Progress | None,
    result: DayResult,
) -> DayResult:
    loc = settings.location
    manifest_key = loc.manifest_key(stream, day)
    if await s3io.head(s3, loc.bucket, manifest_key) is None:
        await s3io.abort_stale_uploads(s3, loc.bucket, loc.day_dir(stream, day))
        try:
            manifest = await _export(conn, s3, settings, columns, stream, day, result, progress)
        except ArchiveError as exc:
            result.status, result.detail = "skipped", str(exc)
            return result
        raw = manifest.to_bytes()
        await s3io.put_bytes(
            s3, loc.bucket, manifest_key, raw, options=settings.write,
            content_type="application/json",
        )  # fmt: skip
    else:
        result.status = "complete"
    # Read back what S3 holds, and verify it as an auditor would, before retention may rely on it.
    report = ArchiveReport(anchors_skipped=checker is None)
    await verify_day(
        s3, loc, stream, day, report=report, checker=checker, progress=verified,
        record=settings.write,
    )  # fmt: skip
    result.report = report
    result.rows, result.files = report.rows, report.files
    sha = report.manifests.get((stream, day.isoformat()))
    if sha is None or checker is None:
        result.status = "failed"
        result.detail = "; ".join(f"{f.kind}: {f.detail}" for f in report.findings[:5]) or (
            "anchors not checked"
        )
        return result
    result.manifest_sha256 = sha
    start, end = day_bounds(day)
    held = int(
        await conn.fetchval(
            "SELECT count(*) FROM das.activity_events WHERE stream_name = $1 "
            "AND log_time >= $2 AND log_time < $3",
            stream,
            start,
            end,
        )
    )
    if held != report.rows:
        result.status = "failed"
        result.detail = (
            f"the warehouse now holds {held} events of the day, the archive {report.rows}: events "
            f"arrived after it was written; delete s3://{loc.bucket}/{loc.day_dir(stream, day)} "
            "and archive the day again"
        )
        return result
    await conn.execute(
        """
        INSERT INTO das.archived_days
            (stream_name, day, manifest, manifest_sha256, rows, files, verified_at)
        VALUES ($1, $2, $3, $4, $5, $6, now())
        ON CONFLICT (stream_name, day, manifest) DO UPDATE
        SET manifest_sha256 = EXCLUDED.manifest_sha256, rows = EXCLUDED.rows,
            files = EXCLUDED.files, verified_at = EXCLUDED.verified_at
        """,
        stream,
        day,
        loc.manifest_url(stream, day),
        sha,
        report.rows,
        report.files,
    )
    return result


async def _export(
    conn: Conn,
    s3: Any,
    settings: ArchiveSettings,
    columns: Columns,
    stream: str,
    day: date,
    result: DayResult,
    progress: Progress | None,
) -> Manifest:
    loc = settings.location
    start, end = day_bounds(day)
    existing: dict[str, dict[str, Any]] = {}
    async for key in s3io.list_keys(s3, loc.bucket, loc.day_dir(stream, day)):
        if key.endswith(".parquet"):
            head = await s3io.head(s3, loc.bucket, key)
            if head is not None:
                existing[key] = head
    # Events, links and anchors from one snapshot: the evidence matches the rows exactly.
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        now: datetime = await conn.fetchval("SELECT now()")
        evidence = await _evidence(conn, stream, day)
        for shard, (_, anchor) in sorted(evidence.items()):
            if anchor is None:  # before anything is written: the next run starts clean
                raise ArchiveError(
                    f"the links of {stream} {shard} up to {day} are not anchored yet: run "
                    "`das-ingest anchor` (or let the workers anchor), then archive again"
                )
        manifest = Manifest(stream, day, now, [c.as_json() for c in columns.columns])
        cursor = conn.cursor(
            f"""
            SELECT {", ".join(c.select for c in columns.columns)}
            FROM das.activity_events
            WHERE stream_name = $1 AND log_time >= $2 AND log_time < $3
            ORDER BY shard_id, sequence_number, event_index
            """,
            stream,
            start,
            end,
            prefetch=settings.batch_rows,
        )
        writer = _PartWriter(s3, settings, columns, stream, day, existing, result, progress)
        rows_by_shard: dict[str, int] = {}
        shard_at = columns.names.index("shard_id")
        batch: list[Any] = []
        try:
            async for row in cursor:
                batch.append(row)
                rows_by_shard[row[shard_at]] = rows_by_shard.get(row[shard_at], 0) + 1
                if len(batch) >= settings.batch_rows:
                    await writer.add(batch)
                    batch = []
            if batch:
                await writer.add(batch)
            await writer.finish()
        finally:
            writer.cleanup()
    leftover = sorted(k for k in existing if k not in writer.keys)
    if leftover:
        raise ArchiveError(
            f"{leftover[0]} is left from an earlier run with other events: delete "
            f"s3://{loc.bucket}/{loc.day_dir(stream, day)} and archive the day again"
        )
    missing = sorted(set(rows_by_shard) - set(evidence))
    if missing:
        raise ArchiveError(f"shard {missing[0]} has events of {day} but no chain links")
    manifest.files = writer.files
    for shard, (links, anchor) in evidence.items():
        if shard not in rows_by_shard:
            continue  # links that list the day, whose events are elsewhere (verify says where)
        manifest.shards[shard] = ShardEvidence(rows_by_shard[shard], links, anchor)
    return manifest


async def _evidence(
    conn: Conn, stream: str, day: date
) -> dict[str, tuple[list[ArchivedLink], Anchor | None]]:
    """Per shard: the links from the one before the day's first through the first anchored
    link at or after its last, and that anchor (None: not anchored yet)."""
    spans = await conn.fetch(
        """
        SELECT shard_id, min(link_no) AS lo, max(link_no) AS hi FROM das.chain_links
        WHERE stream_name = $1 AND days ? $2 GROUP BY shard_id
        """,
        stream,
        day.isoformat(),
    )
    found: dict[str, tuple[list[ArchivedLink], Anchor | None]] = {}
    for span in spans:
        shard = span["shard_id"]
        a = await conn.fetchrow(
            """
            SELECT stream_name, shard_id, link_no, link_hash, anchored_at, key_id, algorithm,
                   signature, version
            FROM das.chain_anchors WHERE stream_name = $1 AND shard_id = $2 AND link_no >= $3
            ORDER BY link_no, id LIMIT 1
            """,
            stream,
            shard,
            span["hi"],
        )
        anchor = (
            Anchor(
                a["stream_name"],
                a["shard_id"],
                a["link_no"],
                bytes(a["link_hash"]),
                a["anchored_at"],
                a["key_id"],
                a["algorithm"],
                bytes(a["signature"]),
                a["version"],
            )
            if a is not None
            else None
        )
        last = anchor.link_no if anchor is not None else span["hi"]
        rows = await conn.fetch(
            """
            SELECT link_no, kind, first_sequence::text AS first_text,
                   last_sequence::text AS last_text, event_count, days::text AS days_text,
                   prev_hash, link_hash, created_at, version, dead_letters::text AS letters
            FROM das.chain_links WHERE stream_name = $1 AND shard_id = $2
              AND link_no BETWEEN $3 AND $4 ORDER BY link_no
            """,
            stream,
            shard,
            max(1, span["lo"] - 1),
            last,
        )
        links = [
            ArchivedLink(
                LinkFields(
                    stream=stream,
                    shard=shard,
                    link_no=r["link_no"],
                    kind=r["kind"],
                    first_sequence=r["first_text"],
                    last_sequence=r["last_text"],
                    event_count=r["event_count"],
                    days=orjson.loads(r["days_text"]),
                    created_at=r["created_at"],
                    dead_letters=orjson.loads(r["letters"]),
                    version=r["version"],
                ),
                bytes(r["prev_hash"]),
                bytes(r["link_hash"]),
            )
            for r in rows
        ]
        found[shard] = (links, anchor)
    return found


class _PartWriter:
    """Parquet parts of bounded size, each spooled to a temporary file and uploaded whole;
    parts that a previous run completed are kept (their rows skipped, their last event checked)."""

    def __init__(
        self,
        s3: Any,
        settings: ArchiveSettings,
        columns: Columns,
        stream: str,
        day: date,
        existing: dict[str, dict[str, Any]],
        result: DayResult,
        progress: Progress | None,
    ) -> None:
        self.s3, self.settings, self.columns = s3, settings, columns
        self.stream, self.day = stream, day
        self.existing, self.result, self.progress = existing, result, progress
        self.files: list[ArchivedFile] = []
        self.keys: set[str] = set()
        self.number = 0
        self.tmp = tempfile.TemporaryDirectory(prefix="das-archive-")
        self.writer: pq.ParquetWriter | None = None
        self.path = Path(self.tmp.name) / "part.parquet"
        self.rows = 0
        self.skip = 0  # rows of an existing part still to pass over
        self.skip_last: str | None = None
        self.last_key = ""
        self.total = 0
        self._open_next()

    @property
    def key(self) -> str:
        return self.settings.location.part_key(self.stream, self.day, self.number)

    def _open_next(self) -> None:
        head = self.existing.get(self.key)
        self.rows = 0
        if head is not None:
            meta = head.get("Metadata", {})
            self.skip = int(meta.get("rows", "0"))
            self.skip_last = meta.get("last-event")
            self.files.append(
                ArchivedFile(
                    self.key.rsplit("/", 1)[-1],
                    self.skip,
                    int(head["ContentLength"]),
                    meta.get("sha256", ""),
                )
            )
            self.keys.add(self.key)
            return
        self.skip = 0
        self.writer = None

    async def add(self, rows: list[Any]) -> None:
        names = self.columns.names
        shard_at, seq_at, idx_at = (
            names.index("shard_id"), names.index("sequence_number"), names.index("event_index"),
        )  # fmt: skip
        while rows:
            if self.skip:
                taken, rows = rows[: self.skip], rows[self.skip :]
                self.skip -= len(taken)
                self.total += len(taken)
                if self.skip == 0:
                    last = taken[-1]
                    seen = f"{last[shard_at]}/{last[seq_at]}/{last[idx_at]}"
                    if seen != self.skip_last:
                        raise ArchiveError(
                            f"{self.key} was written by an earlier run from other events "
                            f"(it ends at {self.skip_last}, the warehouse at {seen}): delete "
                            f"the day's directory and archive the day again"
                        )
                    self.number += 1
                    self._open_next()
                continue
            if self.writer is None:
                self.writer = pq.ParquetWriter(
                    self.path, self.columns.schema, compression="zstd", write_statistics=True
                )
            room = self.settings.max_file_rows - self.rows
            chunk, rows = rows[:room], rows[room:]
            self.writer.write_batch(self.columns.record_batch(chunk))
            self.rows += len(chunk)
            self.total += len(chunk)
            last = chunk[-1]
            self.last_key = f"{last[shard_at]}/{last[seq_at]}/{last[idx_at]}"
            if self.progress is not None:
                self.progress.update(len(chunk))
            full = self.rows >= self.settings.max_file_rows
            if full or self.path.stat().st_size >= self.settings.max_file_bytes:
                await self._close()

    async def _close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        digest = hashlib.sha256()
        with self.path.open("rb") as data:
            while chunk := data.read(1024 * 1024):
                digest.update(chunk)
        size = self.path.stat().st_size
        await s3io.upload_file(
            self.s3,
            self.settings.location.bucket,
            self.key,
            self.path,
            metadata={
                "rows": str(self.rows),
                "sha256": digest.hexdigest(),
                "last-event": self.last_key,
            },
            options=self.settings.write,
        )
        self.files.append(
            ArchivedFile(self.key.rsplit("/", 1)[-1], self.rows, size, digest.hexdigest())
        )
        self.keys.add(self.key)
        self.result.written_files += 1
        self.result.bytes += size
        self.path.unlink()
        self.number += 1
        self._open_next()

    async def finish(self) -> None:
        if self.skip:
            raise ArchiveError(
                f"{self.key} holds more events than the warehouse has for the day: delete "
                "the day's directory and archive the day again"
            )
        await self._close()

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.tmp.cleanup()
