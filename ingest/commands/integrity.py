"""``das-ingest verify`` and ``das-ingest anchor``: tamper evidence for the warehouse."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from ingest.commands.options import (
    add_dsn_argument,
    add_hidden_alias,
    add_log_argument,
    env_default,
    env_flag,
)
from ingest.moments import parse_utc

VERIFY_EPILOG = """\
verify recomputes every event's digest from the stored rows (trusting no function or digest
stored in the database), walks each shard's hash chain, checks every anchor through KMS, and
reports what was altered, deleted, inserted or reordered, with stream, shard, link and sequence
range. Whole UTC days that a believable das.retention_log record accounts for are legitimately
gone; anything else missing is a finding. Links after the last anchor (the unanchored tail) are
listed: they are only as safe as the warehouse itself.

Give --anchor-key-id (the key the workers anchor with) to pin it: an anchor made with another
key is then a finding, and so is an unanchored tail older than --max-unanchored-seconds. Give
--anchors FILE (from `das-ingest anchor --export`, kept outside the warehouse) so that deleted
anchors are found too.

Incremental verify: with --verify-key-id (a KMS HMAC key that only the auditors may use:
GenerateMac and VerifyMac; never the ingester or the warehouse's administrators) and the pinned
--anchor-key-id, verify records in das.verify_progress how far each clean chain was verified
(up to its newest valid anchor), MACed with that key. The next run is then routine: per chain it
recomputes the links and events added since, plus --sample older links chosen at random
(--seed makes the choice reproducible; the report gives the seed it used), so its cost follows
what is new. A recorded point is believed only if its MAC checks out and a valid anchor still
vouches for the link it names; otherwise that is a PROGRESS_INVALID finding and the chain is
verified in full. --full recomputes everything (run it periodically: tampering with events that
were already verified is found by --full, or by a sample that happens to hit it).

--archive s3://BUCKET/PREFIX verifies an archive written by `das-ingest archive` without the
warehouse: each file's SHA-256, each event's digest recomputed from the Parquet values against
the links in the day's manifest, the links' hashes up to the anchor, the anchor through KMS;
findings name the stream, day, file and row.

exit codes: 0 clean, 1 findings, 2 configuration error (with --archive: the bucket missing or
refused), 3 no other finding but KMS could not check the anchors (refused or unreachable); with
--archive also S3 unreachable, throttling or failing (5xx).

das.statements is derived from the chained events and not chained itself: after restoring or
repairing events, rebuild it with `das-ingest rebuild-statements`.
"""


def add_parser(subparsers: Any) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check the warehouse for altered, deleted, inserted or reordered events",
        description="Verify the hash chains and their KMS anchors against the stored events.",
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument(
        "--stream", default=env_default("DAS_STREAM"), help="only this stream [DAS_STREAM]"
    )
    verify.add_argument(
        "--shard", action="append", dest="shards", metavar="SHARD", help="only this shard (repeat)"
    )
    verify.add_argument(
        "--since",
        metavar="ISO",
        help="only recompute the events of links created since this time (chain "
        "continuity and anchors are always checked in full)",
    )
    verify.add_argument(
        "--full",
        action="store_true",
        default=env_flag("DAS_VERIFY_FULL"),
        help="recompute every chain from its start, whatever progress was recorded "
        "[DAS_VERIFY_FULL]",
    )
    verify.add_argument(
        "--verify-key-id",
        default=env_default("DAS_VERIFY_KEY_ID"),
        metavar="KEY",
        help="KMS key (HMAC or SIGN_VERIFY) only the auditors may use: record and check "
        "how far each chain was verified, for incremental runs [DAS_VERIFY_KEY_ID]",
    )
    verify.add_argument(
        "--sample",
        type=_count,
        default=env_default("DAS_VERIFY_SAMPLE", 16),
        metavar="N",
        help="older links a routine run recomputes per chain, chosen at random (default: 16) "
        "[DAS_VERIFY_SAMPLE]",
    )
    verify.add_argument(
        "--seed",
        type=_count,
        default=None,
        metavar="N",
        help="the seed of the sample (default: random; the report names it)",
    )
    verify.add_argument("--json", action="store_true", help="a JSON report on stdout")
    verify.add_argument(
        "--no-anchors",
        action="store_true",
        help="do not check anchors (no KMS access); the report says so",
    )
    verify.add_argument(
        "--anchor-key-id",
        default=env_default("DAS_ANCHOR_KEY_ID"),
        metavar="KEY",
        help="the KMS key every anchor must be made with (id, ARN or alias); anchors are "
        "checked with it whatever key they name [DAS_ANCHOR_KEY_ID]",
    )
    verify.add_argument(
        "--max-unanchored-seconds",
        type=float,
        default=env_default("DAS_MAX_UNANCHORED_SECONDS"),
        metavar="SECONDS",
        help="with --anchor-key-id: an unanchored tail older than this is a finding "
        "(default: twice $DAS_ANCHOR_SECONDS, i.e. 600) [DAS_MAX_UNANCHORED_SECONDS]",
    )
    verify.add_argument(
        "--anchors",
        metavar="FILE",
        help="anchors exported by `das-ingest anchor --export` (JSON lines): each must still "
        "be in the warehouse and match its chain",
    )
    verify.add_argument(
        "--retention-keep",
        default=env_default("DAS_RETENTION_KEEP"),
        metavar="PERIOD",
        help="the retention policy (90d, 12w, 36h): a retention record that removed newer "
        "days is not believed (default: the period each record says it ran with) "
        "[DAS_RETENTION_KEEP]",
    )
    verify.add_argument(
        "--archive",
        metavar="s3://BUCKET/PREFIX",
        help="verify an archive (das-ingest archive) instead of the warehouse: every event's "
        "digest from the Parquet files against the manifests' links and anchors",
    )
    verify.add_argument(
        "--day", metavar="YYYY-MM-DD", help="with --archive: only this day (default: every day)"
    )
    add_dsn_argument(verify)
    add_log_argument(verify)
    verify.set_defaults(func=_verify)

    anchor = subparsers.add_parser(
        "anchor",
        help="anchor the chain heads with a KMS key now, or export the anchors",
        description="Authenticate the head of every shard chain with a KMS HMAC key "
        "(GenerateMac) or asymmetric key (Sign) the warehouse's administrators do not hold; "
        "workers do this periodically with --anchor-key-id. --export writes all anchors as "
        "JSON lines, for safekeeping outside the warehouse.",
    )
    anchor.add_argument(
        "--anchor-key-id",
        dest="key_id",
        default=env_default("DAS_ANCHOR_KEY_ID"),
        metavar="KEY",
        help="KMS key id, ARN or alias to anchor with [DAS_ANCHOR_KEY_ID]",
    )
    add_hidden_alias(anchor, "--key-id", dest="key_id")
    anchor.add_argument(
        "--stream", default=env_default("DAS_STREAM"), help="only this stream [DAS_STREAM]"
    )
    anchor.add_argument(
        "--export", metavar="FILE", help="write every anchor as JSON lines to FILE ('-': stdout)"
    )
    add_dsn_argument(anchor)
    add_log_argument(anchor)
    anchor.set_defaults(func=_anchor)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _verify(args: argparse.Namespace) -> int:
    from datetime import timedelta

    if args.archive or args.day:
        from ingest.commands.archive import verify_archive_command

        return verify_archive_command(args)

    from ingest.exitcodes import UsageError
    from ingest.warehouse.retention import parse_keep

    since = None
    if args.since:
        try:
            since = parse_utc(args.since)
        except ValueError:
            raise UsageError(f"--since {args.since!r} is not ISO 8601") from None
    keep = None
    if args.retention_keep:
        try:
            keep = parse_keep(args.retention_keep)
        except ValueError as exc:
            raise UsageError(f"--retention-keep: {exc}") from None
    seconds = args.max_unanchored_seconds
    if seconds is None:
        try:
            seconds = 2 * float(env_default("DAS_ANCHOR_SECONDS", "300"))
        except ValueError:
            raise UsageError("DAS_ANCHOR_SECONDS is not a number") from None
    from ingest.runtime import run_async

    return run_async(_do_verify(args, since, keep, timedelta(seconds=seconds)))


async def _do_verify(
    args: argparse.Namespace, since: datetime | None, keep: Any, max_unanchored: Any
) -> int:
    import contextlib

    import orjson

    from ingest.aws import aws_client
    from ingest.integrity.anchor import read_exported_anchors
    from ingest.integrity.verify import verify_warehouse
    from ingest.progress import Progress
    from ingest.warehouse.db import connect, resolve_dsn

    exported = read_exported_anchors(args.anchors) if args.anchors else None
    conn = await connect(resolve_dsn(args.dsn))
    try:
        async with contextlib.AsyncExitStack() as stack:
            progress = stack.enter_context(Progress("verify: chains checked", unit="chains"))
            kms = None if args.no_anchors else await stack.enter_async_context(aws_client("kms"))
            report = await verify_warehouse(
                conn,
                kms=kms,
                stream=args.stream,
                shards=args.shards,
                since=since,
                anchor_key_id=args.anchor_key_id,
                exported_anchors=exported,
                max_unanchored_age=max_unanchored,
                retention_keep=keep,
                routine=not args.full,
                verify_key_id=args.verify_key_id,
                sample=args.sample,
                seed=args.seed,
                progress=progress,
            )
        if not args.shards:
            await _record_run(conn, args.stream, report)
    finally:
        await conn.close()
    if args.json:
        sys.stdout.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_report(report)
    return report.exit_code


async def _record_run(conn: Any, stream: str | None, report: Any) -> None:
    """Record the outcome in das.verify_runs, which the workers export as metrics (alerts on
    a verify that found something or stopped running). A role that may not is warned about."""
    import asyncpg

    try:
        await conn.execute(
            "SELECT das.record_verify_run($1, $2::smallint, $3, $4, $5)",
            stream,
            report.exit_code,
            len(report.findings),
            report.links,
            report.events,
        )
    except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFunctionError) as exc:
        print(f"das-ingest verify: the outcome was not recorded: {exc}", file=sys.stderr)


def _print_report(report: Any) -> None:
    from ingest.integrity.verify import REBUILD_HINT

    print(
        f"checked {report.chains} chains, {report.links} links, {report.events} events, "
        f"{report.anchors_checked} anchors"
    )
    if report.anchors_skipped:
        print("anchors NOT checked (--no-anchors): a consistent rewrite would go unnoticed")
    elif report.anchor_key:
        print(f"anchor key pinned: {report.anchor_key}")
    else:
        print(
            "anchor key NOT pinned (give --anchor-key-id): each anchor was checked with the "
            "key it names"
        )
    if report.mode == "routine":
        print(
            f"routine run: {report.routine_chains} chains from their recorded progress, "
            f"{report.sampled_links} older links sampled (seed {report.sample_seed}); "
            "--full recomputes everything"
        )
    elif report.full_because:
        print(f"full run ({report.full_because})")
    for point in report.progress_recorded:
        print(
            f"progress recorded: {point['stream']} {point['shard']} verified up to link "
            f"{point['link']}"
        )
    if report.progress_error:
        print(f"progress NOT recorded: {report.progress_error}")
    if report.retained_days:
        days = report.retained_days
        print(f"removed by retention (recorded): {len(days)} days, {days[0]} .. {days[-1]}")
    if report.archived_days:
        days = sorted(report.archived_days)
        print(
            f"of which archived before removal: {len(days)} days, {days[0]} .. {days[-1]} "
            "(check them with verify --archive)"
        )
    for tail in report.unanchored:
        print(
            f"unanchored tail: {tail['stream']} {tail['shard']} links {tail['first_link']}.."
            f"{tail['last_link']} (up to sequence {tail['last_sequence']}, since {tail['since']})"
        )
    if report.clean:
        print("no findings: nothing altered, deleted, inserted or reordered")
        return
    print(f"{len(report.findings)} FINDINGS:")
    for f in report.findings:
        where = f"{f.stream} {f.shard}"
        if f.link_no is not None:
            where += f" link {f.link_no}"
        if f.first_sequence is not None:
            where += f" sequence {f.first_sequence}..{f.last_sequence}"
        print(f"  {f.kind.upper():<21} {where}: {f.detail}")
    print(REBUILD_HINT)


def _anchor(args: argparse.Namespace) -> int:
    from ingest.exitcodes import UsageError

    if not args.key_id and not args.export:
        raise UsageError("give --anchor-key-id (to anchor) and/or --export FILE")
    from ingest.runtime import run_async

    return run_async(_do_anchor(args))


async def _do_anchor(args: argparse.Namespace) -> int:
    import orjson

    from ingest.aws import aws_client
    from ingest.integrity.anchor import AnchorKey, anchor_alert_head, anchor_heads, load_anchors
    from ingest.warehouse.db import connect, resolve_dsn

    conn = await connect(resolve_dsn(args.dsn))
    try:
        if args.key_id:
            async with aws_client("kms") as kms:
                key = AnchorKey(kms, args.key_id)
                streams = (
                    [args.stream]
                    if args.stream
                    else [
                        r[0]
                        for r in await conn.fetch(
                            "SELECT DISTINCT stream_name FROM das.chain_links ORDER BY 1"
                        )
                    ]
                )
                made = 0
                for stream in streams:
                    made += len(await anchor_heads(conn, key, stream))
                alerts = await anchor_alert_head(conn, key)
            print(
                f"anchored {made} chain heads"
                + (" and the alert chain's head" if alerts is not None else ""),
                file=sys.stderr,
            )
        if args.export:
            lines = [
                orjson.dumps(a.as_json()) + b"\n" for a in await load_anchors(conn, args.stream)
            ]
            if args.export == "-":
                sys.stdout.buffer.write(b"".join(lines))
            else:
                with open(args.export, "wb") as out:  # noqa: ASYNC230 - a small, local file
                    out.write(b"".join(lines))
                print(f"exported {len(lines)} anchors to {args.export}", file=sys.stderr)
    finally:
        await conn.close()
    return 0
