"""``das-ingest archive``: whole UTC days to Parquet on S3, verified, for retention to drop."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Coroutine
from datetime import UTC, date, datetime
from typing import Any

from ingest.commands.options import add_dsn_argument, add_log_argument, env_default
from ingest.moments import parse_utc

EPILOG = """\
Every whole UTC day before the bound (--before DAY, or --older-than PERIOD from now) is written,
per stream, to

  s3://BUCKET/PREFIX/stream=<name>/day=<YYYY-MM-DD>/part-NNNN.parquet  (zstd, typed)
  s3://BUCKET/PREFIX/stream=<name>/day=<YYYY-MM-DD>/_manifest.json  (files, links, anchor)

with the events in chain order. Each day is then read back from S3 and verified like
`das-ingest verify --archive` does (every event's digest against the chain links, the anchors
through KMS) and recorded in das.archived_days: only such days may `retention` drop.

Re-running is safe: a day whose manifest exists is not rewritten (only verified again), and a
day a crash interrupted keeps the files that were complete and gets the rest.

AWS credentials, region and endpoint come from the standard sources (AWS_PROFILE, roles,
AWS_REGION, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL_KMS). The caller needs s3:PutObject,
s3:GetObject, s3:ListBucket, s3:AbortMultipartUpload (and s3:PutObjectRetention with Object
Lock, kms:GenerateDataKey with SSE-KMS) and kms:VerifyMac / kms:Verify on the anchor key.

exit codes: 0 every day archived and verified; 1 a day was skipped or failed verification;
2 usage or configuration error (no such bucket, access denied, a bad --to); 3 S3 unavailable
(unreachable, throttling or 5xx after botocore's retries: run it again, it completes what is
missing) or the warehouse unreachable.
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "archive",
        help="export whole UTC days to Parquet on S3 with a verifiable manifest",
        description="Export whole UTC days of events to Parquet on S3 (Hive layout, readable "
        "by Athena, Trino, Spark and DuckDB), with a manifest carrying each day's chain links "
        "and anchor so the archive verifies without the warehouse.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--to",
        default=env_default("DAS_ARCHIVE_URL"),
        metavar="s3://BUCKET/PREFIX",
        help="where the archive lives [DAS_ARCHIVE_URL]",
    )
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--before", metavar="YYYY-MM-DD", help="archive the days before this one")
    bound.add_argument(
        "--older-than",
        default=env_default("DAS_ARCHIVE_OLDER_THAN"),
        metavar="PERIOD",
        help="archive the days ended this long ago (30d, 12w) [DAS_ARCHIVE_OLDER_THAN]",
    )
    parser.add_argument(
        "--stream", default=env_default("DAS_STREAM"), help="only this stream [DAS_STREAM]"
    )
    parser.add_argument(
        "--object-lock-mode",
        default=env_default("DAS_ARCHIVE_OBJECT_LOCK_MODE"),
        choices=("GOVERNANCE", "COMPLIANCE"),
        help="S3 Object Lock mode for every object written (the bucket must have Object Lock) "
        "[DAS_ARCHIVE_OBJECT_LOCK_MODE]",
    )
    parser.add_argument(
        "--object-lock-retain-until",
        default=env_default("DAS_ARCHIVE_RETAIN_UNTIL"),
        metavar="ISO",
        help="with --object-lock-mode: keep every object written until this date or time "
        "[DAS_ARCHIVE_RETAIN_UNTIL]",
    )
    parser.add_argument(
        "--sse-kms-key-id",
        default=env_default("DAS_ARCHIVE_SSE_KMS_KEY_ID"),
        metavar="KEY",
        help="encrypt every object written with SSE-KMS under this key (id, ARN or alias) "
        "[DAS_ARCHIVE_SSE_KMS_KEY_ID]",
    )
    parser.add_argument(
        "--anchor-key-id",
        default=env_default("DAS_ANCHOR_KEY_ID"),
        metavar="KEY",
        help="the KMS key every anchor must be made with, when verifying [DAS_ANCHOR_KEY_ID]",
    )
    parser.add_argument(
        "--max-file-mib",
        type=int,
        default=env_default("DAS_ARCHIVE_MAX_FILE_MIB", 256),
        metavar="MIB",
        help="start a new Parquet file once one reaches this size (default: 256) "
        "[DAS_ARCHIVE_MAX_FILE_MIB]",
    )
    parser.add_argument(
        "--athena-ddl",
        action="store_true",
        help="print the Athena (Glue) CREATE TABLE for this archive and the warehouse's "
        "columns, then exit",
    )
    parser.add_argument(
        "--athena-table",
        default="das_archive",
        help="table name for the DDL (default: das_archive)",
    )
    add_dsn_argument(parser)
    add_log_argument(parser)
    parser.set_defaults(func=_archive)


def _usage(message: str) -> SystemExit:
    print(f"das-ingest archive: {message}", file=sys.stderr)
    return SystemExit(2)


def parse_moment(text: str, option: str) -> datetime:
    try:
        return parse_utc(text)
    except ValueError:
        raise _usage(f"{option} {text!r} is not an ISO 8601 date or time") from None


def _archive(args: argparse.Namespace) -> int:
    from ingest.archive.location import ArchiveLocation
    from ingest.archive.s3 import WriteOptions
    from ingest.warehouse.retention import parse_keep

    if not args.to:
        raise _usage("give --to s3://BUCKET/PREFIX (or DAS_ARCHIVE_URL)")
    try:
        location = ArchiveLocation.parse(args.to)
    except ValueError as exc:
        raise _usage(f"--to: {exc}") from None
    today = datetime.now(UTC).date()
    bound: date | None = None
    if args.before:
        try:
            bound = date.fromisoformat(args.before)
        except ValueError:
            raise _usage(f"--before {args.before!r} is not a date (YYYY-MM-DD)") from None
        if bound > today:
            raise _usage(f"--before {bound} is after today ({today}): only whole days archive")
    elif args.older_than:
        try:
            bound = (datetime.now(UTC) - parse_keep(args.older_than)).date()
        except ValueError as exc:
            raise _usage(f"--older-than: {exc}") from None
    elif not args.athena_ddl:
        raise _usage("give --before YYYY-MM-DD or --older-than PERIOD")
    if bool(args.object_lock_mode) != bool(args.object_lock_retain_until):
        raise _usage("--object-lock-mode and --object-lock-retain-until go together")
    retain = (
        parse_moment(args.object_lock_retain_until, "--object-lock-retain-until")
        if args.object_lock_retain_until
        else None
    )
    if retain is not None and retain <= datetime.now(UTC):
        raise _usage("--object-lock-retain-until lies in the past")
    if args.max_file_mib < 1:
        raise _usage("--max-file-mib must be at least 1")
    write = WriteOptions(args.object_lock_mode, retain, args.sse_kms_key_id)
    from ingest.runtime import run_async

    work = _do_archive(args, location, bound, write)
    return run_async(_s3_unavailable_exits_3("archive", work, "it completes what is missing"))


async def _s3_unavailable_exits_3(
    command: str, work: Coroutine[Any, Any, int], rerun: str = ""
) -> int:
    """S3 unreachable, throttling or failing (after botocore's retries): one line, exit 3.
    Whatever was complete stays: the same command may well succeed later."""
    from ingest.archive.s3 import S3UnavailableError
    from ingest.exitcodes import UNAVAILABLE

    try:
        return await work
    except S3UnavailableError as exc:
        print(
            f"das-ingest {command}: S3 unavailable ({exc}): run it again later"
            + (f"; {rerun}" if rerun else ""),
            file=sys.stderr,
        )
        return UNAVAILABLE


async def _do_archive(
    args: argparse.Namespace, location: Any, bound: date | None, write: Any
) -> int:
    import contextlib

    from ingest.archive.columns import Columns, athena_ddl
    from ingest.archive.export import ArchiveSettings, archive_days, days_before
    from ingest.archive.s3 import check_bucket
    from ingest.aws import aws_client
    from ingest.errors import IngestError
    from ingest.integrity.verify import AnchorChecker
    from ingest.progress import Progress
    from ingest.warehouse.db import connect, resolve_dsn
    from ingest.warehouse.migrate import require_current_schema

    conn = await connect(resolve_dsn(args.dsn))
    try:
        await require_current_schema(conn)
        if args.athena_ddl:
            columns = await Columns.from_warehouse(conn)
            sys.stdout.write(athena_ddl(columns, table=args.athena_table, location=location.url))
            return 0
        assert bound is not None
        days = await days_before(conn, bound, args.stream)
        if not days:
            print(f"nothing to archive before {bound}")
            return 0
        settings = ArchiveSettings(location, write, max_file_bytes=args.max_file_mib << 20)
        async with contextlib.AsyncExitStack() as stack:
            progress = stack.enter_context(Progress("archive: events written", unit="events"))
            verified = stack.enter_context(Progress("archive: events verified", unit="events"))
            s3 = await stack.enter_async_context(aws_client("s3"))
            kms = await stack.enter_async_context(aws_client("kms"))
            checker = AnchorChecker(kms, args.anchor_key_id)
            await check_bucket(s3, location.bucket)
            try:
                results = await archive_days(
                    conn, s3, settings, days, checker=checker, progress=progress,
                    verified=verified,
                )  # fmt: skip
            except OSError as exc:
                # A local file (the Parquet being written): S3's errors are classified in
                # ingest/archive/s3.py. Whatever was complete stays, a re-run does the rest.
                raise IngestError(
                    f"archive interrupted: {type(exc).__name__}: {exc}: run it again to "
                    "complete what is missing"
                ) from None
    finally:
        await conn.close()
    failed = 0
    for r in results:
        line = f"{r.stream} {r.day}: {r.status}"
        if r.status in ("archived", "complete"):
            line += f", {r.rows} rows in {r.files} files, verified"
            line += f" (manifest sha256 {r.manifest_sha256})"
            if r.status == "archived":
                line += f"; wrote {r.written_files} files, {r.bytes:,} bytes"
        else:
            failed += 1
            line += f": {r.detail}"
        print(line)
    print(f"{len(results) - failed} of {len(results)} days archived and verified in {location.url}")
    return 1 if failed else 0


def verify_archive_command(args: argparse.Namespace) -> int:
    """``das-ingest verify --archive URL [--day D] [--stream S]``."""
    from ingest.archive.location import ArchiveLocation

    if not args.archive:
        print("das-ingest verify: --day needs --archive", file=sys.stderr)
        return 2
    # Flags without a variable: a variable such as DAS_RETENTION_KEEP is for the warehouse's
    # verify and may well be set where this one runs.
    warehouse_only = [
        flag
        for flag, given in (
            ("--shard", args.shards), ("--since", args.since), ("--anchors", args.anchors),
        )
        if given
    ]  # fmt: skip
    if warehouse_only:
        print(
            f"das-ingest verify: {warehouse_only[0]} checks the warehouse, not an archive "
            "(--archive)",
            file=sys.stderr,
        )
        return 2
    try:
        location = ArchiveLocation.parse(args.archive)
    except ValueError as exc:
        print(f"das-ingest verify: --archive: {exc}", file=sys.stderr)
        return 2
    day = None
    if args.day:
        try:
            day = date.fromisoformat(args.day)
        except ValueError:
            print(
                f"das-ingest verify: --day {args.day!r} is not a date (YYYY-MM-DD)", file=sys.stderr
            )
            return 2
    from ingest.runtime import run_async

    return run_async(_s3_unavailable_exits_3("verify", _do_verify_archive(args, location, day)))


async def _do_verify_archive(args: argparse.Namespace, location: Any, day: date | None) -> int:
    import contextlib

    import orjson

    from ingest.archive.check import verify_archive
    from ingest.archive.s3 import check_bucket
    from ingest.aws import aws_client
    from ingest.integrity.anchor import AnchorError
    from ingest.integrity.verify import AnchorChecker
    from ingest.progress import Progress

    async with contextlib.AsyncExitStack() as stack:
        progress = stack.enter_context(Progress("verify --archive: events", unit="events"))
        s3 = await stack.enter_async_context(aws_client("s3"))
        await check_bucket(s3, location.bucket)
        checker = None
        if not args.no_anchors:
            kms = await stack.enter_async_context(aws_client("kms"))
            checker = AnchorChecker(kms, args.anchor_key_id)
            try:
                await checker.prepare()
            except AnchorError as exc:
                print(f"das-ingest verify: the anchor key cannot be used: {exc}", file=sys.stderr)
                return 3
        report = await verify_archive(
            s3, location, checker=checker, stream=args.stream, day=day, progress=progress
        )
    if args.json:
        sys.stdout.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return report.exit_code
    print(
        f"checked {report.days} days, {report.files} files, {report.rows} events, "
        f"{report.anchors_checked} anchors in {location.url}"
    )
    if report.anchors_skipped:
        print("anchors NOT checked (--no-anchors): a consistent rewrite would go unnoticed")
    if report.clean:
        print("no findings: nothing altered, deleted, added or reordered")
        return 0
    print(f"{len(report.findings)} FINDINGS:")
    for f in report.findings:
        where = f"{f.stream} day {f.day}"
        if f.file is not None:
            where += f" {f.file}"
            if f.row is not None:
                where += f" row {f.row}"
        if f.shard is not None:
            where += f" ({f.shard}"
            where += f" link {f.link_no})" if f.link_no is not None else ")"
        print(f"  {f.kind.upper():<21} {where}: {f.detail}")
    return report.exit_code
