"""``das-ingest alerts list|show|ack|deliver``: the alerts policy rules raised."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.commands.options import add_dsn_argument, add_log_argument, env_default
from ingest.moments import parse_utc

LIST_KEYS = (
    "id", "rule", "severity", "title", "group_key", "first_event_time", "last_event_time",
    "event_count", "created_at", "stream", "cluster", "instance", "acked_at", "deliveries",
)  # fmt: skip


def add_notify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--notify",
        action=_AppendOverVariable,
        metavar="KIND=TARGET",
        default=env_default("DAS_NOTIFY", None),
        help="deliver alerts to a notifier (repeatable): webhook=URL, slack=URL, "
        "alertmanager=URL, sns=TOPIC_ARN, syslog=tcp://HOST:PORT or tls://HOST:PORT; the "
        "variable holds them space separated [DAS_NOTIFY]",
    )
    parser.add_argument(
        "--syslog-cafile",
        default=env_default("DAS_SYSLOG_CAFILE", None),
        help="CA bundle for syslog over TLS (default: the system's) [DAS_SYSLOG_CAFILE]",
    )


class _AppendOverVariable(argparse.Action):
    """Repeatable; the flags given replace the variable's list (the default) instead of adding
    to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = list(current) if isinstance(current, list) else []
        items.append(values)
        setattr(namespace, self.dest, items)


def notifier_specs(args: argparse.Namespace) -> list[str]:
    """The notifiers of --notify (repeated) or DAS_NOTIFY (space separated)."""
    if isinstance(args.notify, str):
        return args.notify.split()
    return list(args.notify or [])


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "alerts",
        help="list, show, acknowledge or deliver the alerts policy rules raised",
        description="Alerts are raised by the policy rules (`das-ingest rules list`) as "
        "events are ingested, stored in das.alerts with the events that triggered them, and "
        "delivered to notifiers by every `run` worker (or `alerts deliver`).",
    )
    sub = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    listing = sub.add_parser("list", help="alerts, newest first")
    listing.add_argument("--since", help="created at or after: ISO time or an age (2h, 7d)")
    listing.add_argument("--rule", help="only this rule")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default: 100)")
    listing.add_argument("--json", action="store_true", help="JSON lines: " + ", ".join(LIST_KEYS))
    add_dsn_argument(listing)
    add_log_argument(listing)
    listing.set_defaults(func=_list)

    show = sub.add_parser("show", help="one alert with its triggering events")
    show.add_argument("id", type=int)
    add_dsn_argument(show)
    add_log_argument(show)
    show.set_defaults(func=_show)

    ack = sub.add_parser("ack", help="acknowledge an alert (recorded, never changes the alert)")
    ack.add_argument("id", type=int)
    ack.add_argument("--note", help="why (kept with the acknowledgement)")
    add_dsn_argument(ack)
    add_log_argument(ack)
    ack.set_defaults(func=_ack)

    deliver = sub.add_parser(
        "deliver",
        help="deliver pending alerts to notifiers (what run does in the background)",
        description="Enqueue and deliver alerts to the notifiers, retrying with backoff; "
        "--once: one round, then exit.",
    )
    add_notify_argument(deliver)
    deliver.add_argument("--once", action="store_true", help="one round, then exit")
    add_dsn_argument(deliver)
    add_log_argument(deliver)
    deliver.set_defaults(func=_deliver)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])


def parse_since(text: str, now: datetime) -> datetime:
    """An ISO time (naive: UTC) or an age like 30m, 2h, 7d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text[-1:] in units and text[:-1].isdigit():
        return now - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        return parse_utc(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is neither an ISO time nor an age (2h, 7d)") from None


def _run(coro: Any) -> int:
    from ingest.runtime import run_async

    return run_async(coro)


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _row(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"], "rule": r["rule"], "severity": r["severity"], "title": r["title"],
        "group_key": r["group_key"], "first_event_time": _iso(r["first_event_time"]),
        "last_event_time": _iso(r["last_event_time"]), "event_count": r["event_count"],
        "created_at": _iso(r["created_at"]), "stream": r["stream_name"],
        "cluster": r["cluster_id"], "instance": r["instance_id"],
        "acked_at": _iso(r["acked_at"]),
        "deliveries": json.loads(r["deliveries"]) if r["deliveries"] else {},
    }  # fmt: skip


def _list(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        try:
            since = parse_since(args.since, datetime.now(UTC))
        except ValueError as exc:
            print(f"das-ingest alerts list: {exc}", file=sys.stderr)
            return 2
    return _run(_do_list(args, since))


async def _do_list(args: argparse.Namespace, since: datetime | None) -> int:
    from ingest.warehouse.db import connect, resolve_dsn

    conn = await connect(resolve_dsn(args.dsn))
    try:
        rows = await conn.fetch(
            "SELECT *, deliveries::text AS deliveries FROM das.alerts_overview "
            "WHERE ($1::timestamptz IS NULL OR created_at >= $1) "
            "AND ($2::text IS NULL OR rule = $2) ORDER BY id DESC LIMIT $3",
            since,
            args.rule,
            args.limit,
        )
    finally:
        await conn.close()
    for r in rows:
        row = _row(r)
        if args.json:
            print(json.dumps(row))
        else:
            acked = " acked" if row["acked_at"] else ""
            print(
                f"{row['id']:>6}  {row['created_at'][:19]}  {row['severity']:<8}  "
                f"{row['rule']:<18}  {row['title']}{acked}"
            )
    return 0


def _show(args: argparse.Namespace) -> int:
    return _run(_do_show(args))


async def _do_show(args: argparse.Namespace) -> int:
    from ingest.warehouse.db import connect, resolve_dsn

    conn = await connect(resolve_dsn(args.dsn))
    try:
        row = await conn.fetchrow(
            "SELECT *, deliveries::text AS deliveries FROM das.alerts_overview WHERE id = $1",
            args.id,
        )
        if row is None:
            print(f"das-ingest alerts show: no alert {args.id}", file=sys.stderr)
            return 1
        refs = json.loads(
            await conn.fetchval("SELECT events::text FROM das.alerts WHERE id = $1", args.id)
        )
        events = await conn.fetch(
            "SELECT e.log_time, e.stream_name, e.shard_id, e.sequence_number::text AS seq, "
            "e.event_index, e.db_user_name, e.remote_host, e.command, e.fingerprint, "
            "e.exit_code, e.row_count FROM das.activity_events e "
            "JOIN unnest($1::text[], $2::text[], $3::text[], $4::int[]) "
            "AS r(stream, shard, seq, idx) ON e.stream_name = r.stream AND e.shard_id = r.shard "
            "AND e.sequence_number = r.seq::numeric AND e.event_index = r.idx "
            "ORDER BY e.log_time",
            [r["stream_name"] or "" for r in refs],
            [r["shard_id"] or "" for r in refs],
            [str(r["sequence_number"]) for r in refs],
            [int(r["event_index"]) for r in refs],
        )
    finally:
        await conn.close()
    out = _row(row)
    out["events"] = [{k: _iso(v) for k, v in dict(e).items()} for e in events]
    out["events_referenced"] = len(refs)
    print(json.dumps(out, indent=2))
    return 0


def _ack(args: argparse.Namespace) -> int:
    return _run(_do_ack(args))


async def _do_ack(args: argparse.Namespace) -> int:
    import asyncpg

    from ingest.warehouse.db import connect, resolve_dsn

    conn = await connect(resolve_dsn(args.dsn))
    try:
        try:
            status = await conn.execute(
                "INSERT INTO das.alert_acks (alert_id, note) VALUES ($1, $2) "
                "ON CONFLICT (alert_id) DO NOTHING",
                args.id,
                args.note,
            )
        except asyncpg.ForeignKeyViolationError:
            print(f"das-ingest alerts ack: no alert {args.id}", file=sys.stderr)
            return 1
    finally:
        await conn.close()
    print(
        f"alert {args.id} "
        + ("acknowledged" if status == "INSERT 0 1" else "was acknowledged already")
    )
    return 0


def _deliver(args: argparse.Namespace) -> int:
    from ingest.alerts.notifiers import parse_notifier
    from ingest.errors import ConfigError

    try:
        notifiers = [
            parse_notifier(spec, syslog_cafile=args.syslog_cafile) for spec in notifier_specs(args)
        ]
    except ConfigError as exc:
        print(f"das-ingest alerts deliver: {exc}", file=sys.stderr)
        return 2
    if not notifiers:
        print("das-ingest alerts deliver: no notifier (--notify or DAS_NOTIFY)", file=sys.stderr)
        return 2
    return _run(_do_deliver(args, notifiers))


async def _do_deliver(args: argparse.Namespace, notifiers: list[Any]) -> int:
    import asyncio
    import signal

    from ingest.alerts.outbox import Deliverer
    from ingest.warehouse.db import create_pool, resolve_dsn

    # The warehouse's pool: --dsn-secret and --iam-auth apply, keepalives are on.
    pool = await create_pool(resolve_dsn(args.dsn), min_size=1, max_size=2)
    try:
        deliverer = Deliverer(pool, notifiers)
        if args.once:
            sent = await deliverer.run_once()
            for notifier in notifiers:
                await notifier.close()
            print(f"{sent} deliveries attempted")
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await deliverer.run(stop)
        return 0
    finally:
        await pool.close()
