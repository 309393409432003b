"""Warehouse administration: ``retention``, ``dead-letters``, ``rebuild-statements``,
``rebuild-sessions``.

These run as the schema owner (the role that ran ``migrate``), not as the ingest role.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from ingest.commands.decrypt import add_decryptor_arguments
from ingest.commands.options import (
    add_dsn_argument,
    add_hidden_alias,
    add_log_argument,
    env_default,
    env_flag,
)
from ingest.commands.rules import add_rules_argument


def add_parser(subparsers: Any) -> None:
    retention = subparsers.add_parser(
        "retention",
        help="drop day partitions older than the retention period (logged)",
        description="Drop whole day partitions of das.activity_events older than --keep, and "
        "old rows of the default partition. Every drop is recorded in das.retention_log, so "
        "rows that left by retention can be told from rows that vanished. A day is dropped "
        "only once `das-ingest archive` has archived and verified it (every stream's events "
        "of the day); the record names the archive's manifests. Exit 1 when a day had to "
        "stay for want of an archive.",
    )
    retention.add_argument(
        "--retention-keep",
        dest="keep",
        default=env_default("DAS_RETENTION_KEEP"),
        metavar="PERIOD",
        help="retention period: 90d, 12w or 36h (required) [DAS_RETENTION_KEEP]",
    )
    add_hidden_alias(retention, "--keep", dest="keep")
    retention.add_argument("--dry-run", action="store_true", help="show what would be dropped")
    retention.add_argument(
        "--no-archive",
        action="store_true",
        help="drop days whether or not they were archived (they are gone for good)",
    )
    add_dsn_argument(retention)
    add_log_argument(retention)
    retention.set_defaults(func=_retention)

    dead = subparsers.add_parser(
        "dead-letters",
        help="list or re-drive records that could not be processed",
        description="Records that could not be decoded are kept whole in das.dead_letters "
        "with the stage and reason. After fixing the cause (a key policy, a resource id, a "
        "new das-ingest version), re-drive them: each is decoded again and, on success, its "
        "events are stored and the dead letter removed in one transaction.",
    )
    actions = dead.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list dead letters")
    listing.add_argument("--stage", help="only this stage (json, kms, decrypt, ...)")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default: 100)")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    add_dsn_argument(listing)
    add_log_argument(listing)
    listing.set_defaults(func=_list_dead_letters)
    retry = actions.add_parser("retry", help="decode dead letters again and store them")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, nargs="+", dest="ids", help="dead letter ids")
    which.add_argument("--stage", help="every dead letter of this stage")
    which.add_argument("--all", action="store_true", help="every dead letter")
    retry.add_argument(
        "--resource-id",
        default=env_default("DAS_RESOURCE_ID"),
        help="encryption context resource id (default: from the stream name) [DAS_RESOURCE_ID]",
    )
    add_decryptor_arguments(retry)
    add_rules_argument(retry)
    retry.add_argument(
        "--no-policies",
        action="store_true",
        default=env_flag("DAS_NO_POLICIES"),
        help="evaluate no policy rule (run's rules must apply to re-driven events too: the "
        "redaction and drop rules above all) [DAS_NO_POLICIES]",
    )
    add_dsn_argument(retry)
    add_log_argument(retry)
    retry.set_defaults(func=_retry_dead_letters)

    rebuild = subparsers.add_parser(
        "rebuild-statements",
        help="recompute das.statements (MySQL MAIN/AUX) from the stored events",
        description="das.statements is derived from das.activity_events; this recomputes it "
        "(for example after restoring events from a backup) in batches, each its own short "
        "transaction, so it runs beside live workers without stalling them. While it runs, "
        "das.statements is incomplete.",
    )
    rebuild.add_argument(
        "--batch-events",
        type=int,
        default=env_default("DAS_BATCH_EVENTS", 10_000),
        metavar="N",
        help="events merged (and rows emptied) per transaction (default: 10000) [DAS_BATCH_EVENTS]",
    )
    rebuild.add_argument(
        "--day",
        type=_utc_day,
        default=env_default("DAS_REBUILD_DAY"),
        metavar="YYYY-MM-DD",
        help="only the statements of this UTC day (its partitions); other days are left as "
        "they are (default: the whole table) [DAS_REBUILD_DAY]",
    )
    add_dsn_argument(rebuild)
    add_log_argument(rebuild)
    rebuild.set_defaults(func=_rebuild)

    sessions = subparsers.add_parser(
        "rebuild-sessions",
        help="recompute das.session_summaries (the das.sessions view), das.activity_counts "
        "(das.privileged_activity_since) and das.object_counts (das.object_activity_since) "
        "from the stored events",
        description="das.session_summaries, das.activity_counts and das.object_counts are "
        "derived from das.activity_events; this recomputes them (for example after restoring "
        "events from a backup) in one transaction. "
        "Readers see the old rows until it commits; workers' commits wait for it.",
    )
    add_dsn_argument(sessions)
    add_log_argument(sessions)
    sessions.set_defaults(func=_rebuild_sessions)


def _retention(args: argparse.Namespace) -> int:
    from ingest.exitcodes import UsageError
    from ingest.warehouse.retention import parse_keep

    if args.keep is None:
        raise UsageError("give --retention-keep PERIOD (or $DAS_RETENTION_KEEP)")
    try:
        keep = parse_keep(args.keep)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return _run(_do_retention(args, keep))


async def _do_retention(args: argparse.Namespace, keep: Any) -> int:
    from ingest.progress import Progress
    from ingest.warehouse.db import connect, resolve_dsn
    from ingest.warehouse.retention import apply_retention

    conn = await connect(resolve_dsn(args.dsn))
    try:
        with Progress("retention: partitions", unit="partitions") as progress:
            actions = await apply_retention(
                conn,
                keep,
                dry_run=args.dry_run,
                progress=progress,
                require_archive=not args.no_archive,
            )
    finally:
        await conn.close()
    verb = "would drop" if args.dry_run else "dropped"
    refused = 0
    for action in actions:
        span = f"{action.range_start or '-inf'} .. {action.range_end}"
        if action.refused is not None:
            refused += 1
            print(f"kept {action.partition} ({span}): {action.refused}")
            continue
        where = ""
        if action.archive:
            manifests = sorted({entry["manifest"] for entry in action.archive})
            where = f", archived in {', '.join(manifests)}"
        print(f"{verb} {action.partition} ({span}): {action.rows} rows{where}")
    if not actions:
        print("nothing older than the retention period")
    return 1 if refused else 0


def _list_dead_letters(args: argparse.Namespace) -> int:
    return _run(_do_list(args))


async def _do_list(args: argparse.Namespace) -> int:
    import orjson

    from ingest.warehouse.db import connect, resolve_dsn
    from ingest.warehouse.deadletters import list_dead_letters

    conn = await connect(resolve_dsn(args.dsn))
    try:
        rows = await list_dead_letters(conn, stage=args.stage, limit=args.limit)
    finally:
        await conn.close()
    if args.json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row.as_dict()).decode() + "\n")
        return 0
    if not rows:
        print("no dead letters")
        return 0
    print(f"{'id':>6}  {'stage':<10} {'shard':<22} {'attempts':>8}  {'first seen':<19}  error")
    for r in rows:
        print(
            f"{r.id:>6}  {r.stage:<10} {r.shard_id:<22} {r.attempts:>8}  "
            f"{r.first_seen:%Y-%m-%d %H:%M:%S}  {r.error}"
        )
    return 0


def _retry_dead_letters(args: argparse.Namespace) -> int:
    return _run(_do_retry(args))


async def _do_retry(args: argparse.Namespace) -> int:
    from ingest.aws import aws_client
    from ingest.consumer.redrive import redrive
    from ingest.decode.batch import DecoderConfig, decryptor_for
    from ingest.kms import DataKeyCache
    from ingest.policy.rules import RulesError, load_rules
    from ingest.progress import Progress
    from ingest.warehouse.db import connect, resolve_dsn

    rules_text = None
    if args.rules and not args.no_policies:
        try:
            rules_text = Path(args.rules).read_text(encoding="utf-8")  # noqa: ASYNC240 - once
        except OSError as exc:
            print(f"das-ingest dead-letters retry: cannot read {args.rules}: {exc.strerror}",
                  file=sys.stderr)  # fmt: skip
            return 2
    try:
        rules = None if args.no_policies else load_rules(
            rules_text, args.rules or "rules", builtins=not args.no_builtin_rules
        )  # fmt: skip
    except RulesError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    decoder = DecoderConfig(
        decryptor=args.decryptor,
        verify_signatures=not args.skip_signature_verification,
        max_decompressed=args.max_decompressed_mb << 20,
        policy=not args.no_policies,
        rules=rules_text,
        builtin_rules=not args.no_builtin_rules,
    )
    decryptor_for(decoder)
    conn = await connect(resolve_dsn(args.dsn))
    try:
        if args.ids:
            known = await conn.fetch(
                "SELECT id FROM das.dead_letters WHERE id = ANY($1::bigint[])", args.ids
            )
            unknown = sorted(set(args.ids) - {r["id"] for r in known})
            if unknown:
                # A typo in an id list must not re-drive the rest half-way: nothing is done.
                listed = ", ".join(map(str, unknown))
                print(
                    f"das-ingest dead-letters retry: no dead letter with id {listed} "
                    "(see `das-ingest dead-letters list`); nothing was retried",
                    file=sys.stderr,
                )
                return 1
        async with aws_client("kms") as kms:
            with Progress("dead-letters retry", unit="dead letters") as progress:
                report = await redrive(
                    conn,
                    args.ids,
                    DataKeyCache(kms),
                    decoder=decoder,
                    resource_id=args.resource_id,
                    stage=None if args.all else args.stage,
                    rules=rules,
                    progress=progress,
                )
    finally:
        await conn.close()
    for letter_id in report.stored:
        print(f"dead letter {letter_id}: stored")
    for letter_id, error in report.failed.items():
        print(f"dead letter {letter_id}: failed again: {error}", file=sys.stderr)
    print(f"{len(report.stored)} re-driven ({report.events} events), {len(report.failed)} failed")
    return 1 if report.failed else 0


def _utc_day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day: {text!r} (YYYY-MM-DD)") from None


def _rebuild(args: argparse.Namespace) -> int:
    from ingest.exitcodes import UsageError

    if args.batch_events < 1:
        raise UsageError("--batch-events must be at least 1")
    return _run(_do_rebuild(args))


async def _do_rebuild(args: argparse.Namespace) -> int:
    from ingest.progress import Progress
    from ingest.warehouse.db import connect, resolve_dsn
    from ingest.warehouse.statements import rebuild_statements

    conn = await connect(resolve_dsn(args.dsn))
    bars: dict[str, Progress] = {}

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == "merged" and "emptied" in bars:
            bars.pop("emptied").close()
        bar = bars.get(phase)
        if bar is None:
            label = "rows deleted" if phase == "emptied" else "events merged"
            bar = bars[phase] = Progress(f"rebuild-statements: {label}", total=total, unit="")
        bar.update(done)

    window = None
    if args.day is not None:
        since = datetime(args.day.year, args.day.month, args.day.day, tzinfo=UTC)
        window = (since, since + timedelta(days=1))
    try:
        rows = await rebuild_statements(
            conn, batch=args.batch_events, progress=progress, window=window
        )
    finally:
        await conn.close()
    for bar in bars.values():
        bar.close()
    of = f" of {args.day.isoformat()}" if args.day is not None else ""
    print(f"das.statements rebuilt: {rows} statements{of}")
    return 0


def _rebuild_sessions(args: argparse.Namespace) -> int:
    return _run(_do_rebuild_sessions(args))


async def _do_rebuild_sessions(args: argparse.Namespace) -> int:
    from ingest.warehouse.db import connect, resolve_dsn
    from ingest.warehouse.sessions import rebuild_sessions

    conn = await connect(resolve_dsn(args.dsn))
    try:
        rows = await rebuild_sessions(conn)
    finally:
        await conn.close()
    print(
        f"das.session_summaries rebuilt: {rows} sessions "
        "(and das.activity_counts, das.object_counts)"
    )
    return 0


def _run(coro: Any) -> int:
    from ingest.runtime import run_async

    return run_async(coro)
