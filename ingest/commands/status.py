"""``das-ingest status``: shards, owners, checkpoints, lag, workers, heartbeats, dead letters."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from ingest.commands.options import add_dsn_argument, add_log_argument, env_default


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show leases, checkpoints, lag, workers, instance heartbeats and dead letters",
        description="Report the state of ingestion from the warehouse (and, for lag, from "
        "Kinesis: one GetRecords call per open shard; --no-lag skips it).",
    )
    parser.add_argument(
        "--stream", default=env_default("DAS_STREAM"), help="only this stream [DAS_STREAM]"
    )
    add_dsn_argument(parser)
    parser.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    parser.add_argument("--no-lag", action="store_true", help="do not ask Kinesis for the lag")
    add_log_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ingest.runtime import run_async

    return run_async(_status(args))


async def gather(conn: Any, stream: str | None) -> dict[str, Any]:
    """Everything ``status`` shows, from the warehouse."""
    leases = await conn.fetch(
        """
        SELECT stream_name, shard_id, owner, lease_counter, expires_at, checkpoint,
               checkpoint_at, parent_shard_ids,
               (owner IS NOT NULL AND expires_at > now()) AS live
        FROM das.leases WHERE $1::text IS NULL OR stream_name = $1
        ORDER BY stream_name, shard_id
        """,
        stream,
    )
    workers = await conn.fetch(
        """
        SELECT w.stream_name, w.worker_id, w.started_at, w.last_seen, w.ready,
               (SELECT count(*) FROM das.leases l WHERE l.stream_name = w.stream_name
                  AND l.owner = w.worker_id AND l.expires_at > now()) AS leases
        FROM das.workers w WHERE $1::text IS NULL OR w.stream_name = $1
        ORDER BY w.stream_name, w.worker_id
        """,
        stream,
    )
    heartbeats = await conn.fetch(
        "SELECT cluster_id, instance_id, log_time, seen_at FROM das.heartbeats "
        "WHERE $1::text IS NULL OR stream_name = $1 ORDER BY cluster_id, instance_id",
        stream,
    )
    dead = await conn.fetch(
        "SELECT stage, count(*) AS count, min(first_seen) AS oldest FROM das.dead_letters "
        "WHERE $1::text IS NULL OR stream_name = $1 GROUP BY stage ORDER BY stage",
        stream,
    )
    # Data keys KMS refused (wrong resource id or context, disabled or missing key): what the
    # workers logged once per key, from the dead letters every worker of the fleet wrote.
    refusals = await conn.fetch(
        "SELECT stream_name, error, count(*) AS count, min(first_seen) AS oldest, "
        "max(last_attempt) AS latest FROM das.dead_letters "
        "WHERE stage = 'kms' AND ($1::text IS NULL OR stream_name = $1) "
        "GROUP BY stream_name, error ORDER BY count(*) DESC, error LIMIT 10",
        stream,
    )
    estimate = await conn.fetchval(
        """
        SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'das.activity_events'::regclass
        """
    )
    # "events" is exact up to a million rows, a planner estimate above (of every stream's).
    if (estimate or 0) < 1_000_000:
        # Planner statistics lag behind on small or fresh tables: count exactly.
        estimate = await conn.fetchval(
            "SELECT count(*) FROM das.activity_events WHERE $1::text IS NULL OR stream_name = $1",
            stream,
        )
    now = datetime.now(UTC)
    return {
        "generated_at": now.isoformat(),
        "shards": [
            {
                "stream": r["stream_name"],
                "shard": r["shard_id"],
                "owner": r["owner"] if r["live"] else None,
                "state": _state(r),
                "checkpoint": r["checkpoint"],
                "checkpoint_at": _iso(r["checkpoint_at"]),
                "lease_expires_at": _iso(r["expires_at"]),
                "parents": list(r["parent_shard_ids"]),
                "lag_ms": None,
            }
            for r in leases
        ],
        "workers": [
            {
                "stream": r["stream_name"],
                "worker": r["worker_id"],
                "started_at": _iso(r["started_at"]),
                "last_seen": _iso(r["last_seen"]),
                "ready": r["ready"],
                "leases": r["leases"],
            }
            for r in workers
        ],
        "heartbeats": [
            {
                "cluster": r["cluster_id"],
                "instance": r["instance_id"],
                "last_heartbeat": _iso(r["log_time"]),
                "seen_at": _iso(r["seen_at"]),
                "age_seconds": round((now - r["seen_at"]).total_seconds(), 1),
            }
            for r in heartbeats
        ],
        "dead_letters": [
            {"stage": r["stage"], "count": r["count"], "oldest": _iso(r["oldest"])} for r in dead
        ],
        "kms_refusals": [
            {
                "stream": r["stream_name"],
                "error": r["error"],
                "records": r["count"],
                "oldest": _iso(r["oldest"]),
                "latest": _iso(r["latest"]),
            }
            for r in refusals
        ],
        "events": int(estimate or 0),
    }


def _state(row: Any) -> str:
    if row["checkpoint"] == "SHARD_END":
        return "finished"
    if row["live"]:
        return "held"
    return "expired" if row["owner"] else "free"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


async def _lags(report: dict[str, Any]) -> None:
    from ingest.aws import aws_client
    from ingest.kinesis import KinesisError, KinesisReader

    open_shards = [s for s in report["shards"] if s["state"] != "finished"]
    if not open_shards:
        return
    async with aws_client("kinesis") as client:
        for shard in open_shards:
            reader = KinesisReader(client, shard["stream"])
            try:
                iterator = await reader.iterator(shard["shard"], shard["checkpoint"])
                if iterator is None:
                    continue
                page = await reader.get_records(iterator, 1)
            except KinesisError as exc:
                shard["lag_error"] = str(exc)[:200]
                continue
            shard["lag_ms"] = page.millis_behind_latest


async def _status(args: argparse.Namespace) -> int:
    import orjson

    from ingest.warehouse.db import connect, resolve_dsn

    conn = await connect(resolve_dsn(args.dsn))
    try:
        report = await gather(conn, args.stream)
    finally:
        await conn.close()
    if not args.no_lag:
        await _lags(report)
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print_tables(report)
    return 0


def print_tables(report: dict[str, Any]) -> None:
    print("SHARDS")
    _table(
        ["stream", "shard", "state", "owner", "checkpoint", "lag_ms"],
        [
            [
                s["stream"],
                s["shard"],
                s["state"],
                s["owner"] or "-",
                _short(s["checkpoint"]),
                "-" if s["lag_ms"] is None else s["lag_ms"],
            ]
            for s in report["shards"]
        ],
    )
    print("\nWORKERS")
    _table(
        ["stream", "worker", "ready", "leases", "last_seen"],
        [
            [w["stream"], w["worker"], w["ready"], w["leases"], w["last_seen"]]
            for w in report["workers"]
        ],
    )
    print("\nINSTANCE HEARTBEATS")
    _table(
        ["cluster", "instance", "last_heartbeat", "age_s"],
        [
            [h["cluster"], h["instance"], h["last_heartbeat"], h["age_seconds"]]
            for h in report["heartbeats"]
        ],
    )
    print("\nDEAD LETTERS")
    _table(
        ["stage", "count", "oldest"],
        [[d["stage"], d["count"], d["oldest"]] for d in report["dead_letters"]],
    )
    if report["kms_refusals"]:
        print("\nKMS REFUSALS (dead letters at stage kms; fix the cause, then re-drive them)")
        _table(
            ["stream", "records", "latest", "error (likely cause)"],
            [[k["stream"], k["records"], k["latest"], k["error"]] for k in report["kms_refusals"]],
        )
    print(f"\nevents stored: {report['events']}")


def _short(checkpoint: str) -> str:
    return checkpoint if len(checkpoint) <= 24 else f"{checkpoint[:10]}…{checkpoint[-10:]}"


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    if not rows:
        print("  (none)")
        return
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
