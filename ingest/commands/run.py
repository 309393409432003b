"""``das-ingest run``: the ingester. Start the same command on as many hosts as you like; they
share the stream through leases in the warehouse."""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from ingest.commands.alerts import add_notify_argument, notifier_specs
from ingest.commands.decrypt import add_decryptor_arguments
from ingest.commands.options import (
    add_dsn_argument,
    add_hidden_alias,
    add_log_argument,
    available_cpus,
    env_default,
    env_flag,
)
from ingest.commands.rules import add_rules_argument
from ingest.moments import parse_utc

if TYPE_CHECKING:
    from ingest.consumer.pool import DecodePool
    from ingest.consumer.service import ServeSettings
    from ingest.decode.batch import DecoderConfig

EPILOG = """\
Every option can also be set by the environment variable in brackets; AWS settings come from
the standard sources (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL_KINESIS, AWS_ENDPOINT_URL_KMS,
AWS_ENDPOINT_URL_RDS, instance and task roles).

exit codes: 0 after a graceful stop (SIGTERM, SIGINT, or --stop-when-idle), 2 for a
configuration error (unknown stream, schema not migrated, refused login), 1 otherwise.

example:
  das-ingest migrate --dsn postgresql://admin@db/audit
  das-ingest run --cluster my-aurora-cluster --dsn postgresql://ingester@db/audit \\
      --metrics-port 9108
  das-ingest run --instance my-oracle-instance --dsn postgresql://ingester@db/audit
"""

#: --chunk-kib: pages are decoded and committed in chunks of at most this many KiB (the default
#: is CommitSettings', which a test checks) and chunk_records() records.
DEFAULT_CHUNK_KIB = 512
MIN_CHUNK_KIB = 16
MAX_CHUNK_KIB = 4096


def chunk_records(kib: int) -> int:
    """The record limit of a chunk of ``kib`` KiB: 400 per 512 KiB (25 per 32 KiB)."""
    return kib * 25 // 32


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="consume an activity stream into the warehouse (exactly once, as a fleet)",
        description="Consume a Database Activity Stream into the audit warehouse.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--stream",
        default=env_default("DAS_STREAM"),
        help="Kinesis stream name, aws-rds-das-<resource id> [DAS_STREAM]",
    )
    source.add_argument(
        "--cluster",
        default=env_default("DAS_CLUSTER"),
        help="Aurora DB cluster identifier: stream and resource id are discovered with "
        "rds:DescribeDBClusters [DAS_CLUSTER]",
    )
    source.add_argument(
        "--instance",
        default=env_default("DAS_INSTANCE"),
        help="RDS for Oracle or RDS for SQL Server DB instance identifier: stream and resource "
        "id (DbiResourceId) are discovered with rds:DescribeDBInstances [DAS_INSTANCE]",
    )
    parser.add_argument(
        "--resource-id",
        default=env_default("DAS_RESOURCE_ID"),
        help="resource id for the KMS encryption context: cluster-... (Aurora, under "
        "aws:rds:dbc-id) or db-... (RDS instance, under aws:rds:db-id) (default: from the "
        "stream name) [DAS_RESOURCE_ID]",
    )
    add_dsn_argument(parser)
    parser.add_argument(
        "--worker-id",
        default=env_default("DAS_WORKER_ID", f"{socket.gethostname()}:{os.getpid()}"),
        help="this worker's name in the lease table (default: host:pid) [DAS_WORKER_ID]",
    )
    parser.add_argument(
        "--initial-position",
        default=env_default("DAS_INITIAL_POSITION", "trim_horizon"),
        metavar="trim_horizon|latest|at_timestamp:ISO",
        help="where shards without a checkpoint start (default: trim_horizon, the oldest "
        "record kept) [DAS_INITIAL_POSITION]",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=env_default("DAS_PROCESSES", available_cpus()),
        help="decode processes; 0 decodes in the main process (default: the CPUs this "
        "process may use, container limits included) [DAS_PROCESSES]",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=env_default("DAS_METRICS_PORT", None),
        help="serve /metrics, /healthz and /readyz on this port [DAS_METRICS_PORT]",
    )
    parser.add_argument(
        "--stop-when-idle-seconds",
        dest="stop_when_idle",
        type=float,
        default=env_default("DAS_STOP_WHEN_IDLE_SECONDS", env_default("DAS_STOP_WHEN_IDLE")),
        metavar="SECONDS",
        help="exit 0 once every shard this worker holds has been caught up and empty for this "
        "long and every other shard is held by a live worker (backfills, tests) "
        "[DAS_STOP_WHEN_IDLE_SECONDS]",
    )
    add_hidden_alias(parser, "--stop-when-idle", dest="stop_when_idle", type=float)
    tuning = parser.add_argument_group("tuning")
    tuning.add_argument(
        "--lease-seconds",
        type=float,
        default=env_default("DAS_LEASE_SECONDS", 10.0),
        help="lease duration: a dead worker's shards move within this (default: 10) "
        "[DAS_LEASE_SECONDS]",
    )
    tuning.add_argument(
        "--shard-sync-seconds",
        type=float,
        default=env_default("DAS_SHARD_SYNC_SECONDS", 30.0),
        help="how often the shard list is refreshed (default: 30) [DAS_SHARD_SYNC_SECONDS]",
    )
    tuning.add_argument(
        "--max-records",
        type=int,
        default=env_default("DAS_MAX_RECORDS", 1000),
        help="GetRecords limit per call; a shard holds up to two pages, each taking a few "
        "times its size in memory (default: 1000) [DAS_MAX_RECORDS]",
    )
    tuning.add_argument(
        "--queue-batches",
        type=int,
        default=env_default("DAS_QUEUE_BATCHES", None),
        help="batches in or waiting for the decode pool (default: 2 per process, at least 2) "
        "[DAS_QUEUE_BATCHES]",
    )
    tuning.add_argument(
        "--queue-mib",
        dest="queue_mib",
        type=int,
        default=env_default("DAS_QUEUE_MIB", env_default("DAS_QUEUE_MB", 64)),
        metavar="MIB",
        help="MiB of records in or waiting for the decode pool (default: 64) [DAS_QUEUE_MIB]",
    )
    add_hidden_alias(tuning, "--queue-mb", dest="queue_mib", type=int)
    tuning.add_argument(
        "--chunk-kib",
        dest="chunk_kib",
        type=int,
        default=env_default("DAS_CHUNK_KIB", DEFAULT_CHUNK_KIB),
        metavar="KIB",
        help="each page is decoded and committed in chunks of at most KIB KiB and KIB x 25/32 "
        f"records, {MIN_CHUNK_KIB} to {MAX_CHUNK_KIB}: bigger chunks cost less CPU per event "
        f"and more memory (default: {DEFAULT_CHUNK_KIB}, "
        f"{chunk_records(DEFAULT_CHUNK_KIB)} records) [DAS_CHUNK_KIB]",
    )
    tuning.add_argument(
        "--db-pool-size",
        type=int,
        default=env_default("DAS_DB_POOL_SIZE", 16),
        help="warehouse connections, at least 2 (default: 16) [DAS_DB_POOL_SIZE]",
    )
    tuning.add_argument(
        "--db-command-timeout-seconds",
        dest="db_command_timeout",
        type=float,
        default=env_default(
            "DAS_DB_COMMAND_TIMEOUT_SECONDS", env_default("DAS_DB_COMMAND_TIMEOUT", 20.0)
        ),
        metavar="SECONDS",
        help="a warehouse statement or connection attempt that takes longer fails and is "
        "retried, so a stalled connection cannot hang the worker; 0 for none (default: 20) "
        "[DAS_DB_COMMAND_TIMEOUT_SECONDS]",
    )
    add_hidden_alias(tuning, "--db-command-timeout", dest="db_command_timeout", type=float)
    tuning.add_argument(
        "--unready-after-seconds",
        dest="unready_after",
        type=float,
        default=env_default("DAS_UNREADY_AFTER_SECONDS", env_default("DAS_UNREADY_AFTER", 5.0)),
        metavar="SECONDS",
        help="report not ready (/readyz, das_ready) while a call to Kinesis, KMS or the "
        "warehouse has been failing or hanging this long (default: 5) "
        "[DAS_UNREADY_AFTER_SECONDS]",
    )
    add_hidden_alias(tuning, "--unready-after", dest="unready_after", type=float)
    tuning.add_argument(
        "--shutdown-deadline-seconds",
        dest="shutdown_deadline",
        type=float,
        default=env_default(
            "DAS_SHUTDOWN_DEADLINE_SECONDS", env_default("DAS_SHUTDOWN_DEADLINE", 20.0)
        ),
        metavar="SECONDS",
        help="how long to drain in-flight batches on SIGTERM before cancelling (default: 20) "
        "[DAS_SHUTDOWN_DEADLINE_SECONDS]",
    )
    add_hidden_alias(tuning, "--shutdown-deadline", dest="shutdown_deadline", type=float)
    integrity = parser.add_argument_group("integrity (see docs/integrity.md)")
    integrity.add_argument(
        "--anchor-key-id",
        default=env_default("DAS_ANCHOR_KEY_ID"),
        help="KMS HMAC or signing key to anchor the chain heads of held shards with, "
        "periodically and at shutdown; without it the chains are not anchored "
        "[DAS_ANCHOR_KEY_ID]",
    )
    integrity.add_argument(
        "--anchor-seconds",
        type=float,
        default=env_default("DAS_ANCHOR_SECONDS", 300.0),
        help="how often to anchor (default: 300) [DAS_ANCHOR_SECONDS]",
    )
    integrity.add_argument(
        "--no-integrity-chain",
        action="store_true",
        help="do not extend the hash chains (only to measure their cost: `verify` then "
        "reports every event stored meanwhile as inserted)",
    )
    policies = parser.add_argument_group(
        "policies", "detection rules, alerts, redaction and noise filtering (docs/policies.md)"
    )
    add_rules_argument(policies)
    policies.add_argument(
        "--no-policies",
        action="store_true",
        default=env_flag("DAS_NO_POLICIES"),
        help="evaluate no rule at all: no alert, no redaction, no drop (fingerprints stay) "
        "[DAS_NO_POLICIES]",
    )
    add_notify_argument(policies)
    add_decryptor_arguments(parser)
    add_log_argument(parser)
    parser.set_defaults(func=run)


def initial_checkpoint(position: str, now: datetime | None = None) -> str:
    """The lease checkpoint for ``--initial-position``.

    LATEST is pinned to AT_TIMESTAMP:<now> when the lease is created, so a restart before the
    first record arrives does not skip what was written while the worker was down.
    """
    text = position.strip()
    lowered = text.lower()
    if lowered == "trim_horizon":
        return "TRIM_HORIZON"
    if lowered == "latest":
        stamp = now or datetime.now(UTC)
        return f"AT_TIMESTAMP:{stamp.isoformat()}"
    if lowered.startswith("at_timestamp:"):
        value = text.split(":", 1)[1]
        try:
            stamp = parse_utc(value)
        except ValueError:
            raise ValueError(f"--initial-position: {value!r} is not an ISO 8601 time") from None
        return f"AT_TIMESTAMP:{stamp.isoformat()}"
    raise ValueError(
        f"--initial-position must be trim_horizon, latest or at_timestamp:<ISO 8601>, not {text!r}"
    )


def run(args: argparse.Namespace) -> int:
    from ingest.exitcodes import UsageError
    from ingest.logs import setup_logging
    from ingest.runtime import run_async

    setup_logging(args.log_level, args.log_format)
    if not args.stream and not args.cluster and not args.instance:
        raise UsageError("give --stream NAME, --cluster ID or --instance ID (or $DAS_STREAM)")
    try:
        args.initial_checkpoint = initial_checkpoint(args.initial_position)
    except ValueError as exc:
        raise UsageError(f"{exc}") from None
    if args.processes < 0:
        raise UsageError("--processes must be 0 or more")
    if args.db_pool_size < 2:
        raise UsageError("--db-pool-size must be at least 2")
    if args.lease_seconds <= 0 or args.shutdown_deadline < 0:
        raise UsageError("--lease-seconds must be > 0, --shutdown-deadline-seconds >= 0")
    if args.db_command_timeout < 0 or args.unready_after <= 0:
        raise UsageError("--db-command-timeout-seconds must be >= 0, --unready-after-seconds > 0")
    if not MIN_CHUNK_KIB <= args.chunk_kib <= MAX_CHUNK_KIB:
        raise UsageError(f"--chunk-kib must be from {MIN_CHUNK_KIB} to {MAX_CHUNK_KIB}")
    args.rules_text = _rules_text(args)
    _check_notifiers(args)
    # The decode processes start first: each imports the decode stack and compiles the rules
    # on the other core while this process imports the AWS SDK, connects to the warehouse and
    # Kinesis and takes its leases (serve closes the pool, as does the worker's shutdown).
    pool = _decode_pool(args)
    try:
        from ingest.consumer.service import serve

        return run_async(serve(serve_settings(args), pool=pool))
    finally:
        pool.close()


def _decode_pool(args: argparse.Namespace) -> DecodePool:
    """The worker's decode pool (--processes), started (DecodePool.prestart)."""
    from ingest.consumer.budget import WorkBudget
    from ingest.consumer.pool import DecodePool

    budget = WorkBudget(max_batches=_queue_batches(args), max_bytes=args.queue_mib * 1024 * 1024)
    pool = DecodePool(args.processes, budget)
    pool.prestart(decoder_config(args))
    return pool


def _queue_batches(args: argparse.Namespace) -> int:
    return int(args.queue_batches or max(2, 2 * args.processes))


def decoder_config(args: argparse.Namespace) -> DecoderConfig:
    """What the decode processes decode with (--decryptor, --skip-signature-verification,
    --max-decompressed-mb, --no-integrity-chain, the policy options)."""
    from ingest.decode.batch import DecoderConfig

    return DecoderConfig(
        decryptor=args.decryptor,
        verify_signatures=not args.skip_signature_verification,
        max_decompressed=args.max_decompressed_mb * 1024 * 1024,
        chain=not args.no_integrity_chain,
        policy=not args.no_policies,
        rules=getattr(args, "rules_text", None),
        builtin_rules=not args.no_builtin_rules,
    )


def _rules_text(args: argparse.Namespace) -> str | None:
    """The rules file's text, validated here so a bad file stops run at once (exit 2, every
    error with its line) instead of in a decode process."""
    from ingest.policy.rules import RulesError, load_rules

    if args.no_policies:
        return None
    text = None
    if args.rules:
        try:
            with open(args.rules, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            _usage(f"das-ingest run: cannot read --rules {args.rules}: {exc.strerror}")
    try:
        load_rules(text, args.rules or "rules", builtins=not args.no_builtin_rules)
    except RulesError as exc:
        _usage("\n".join(exc.errors))
    return text


def _usage(message: str) -> NoReturn:
    """A usage error: its message on stderr, exit 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _check_notifiers(args: argparse.Namespace) -> None:
    from ingest.alerts.notifiers import parse_notifier
    from ingest.errors import ConfigError
    from ingest.exitcodes import UsageError

    for spec in notifier_specs(args):
        try:
            parse_notifier(spec)
        except ConfigError as exc:
            raise UsageError(f"--notify: {exc}") from None


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The frozen settings of ``run`` from its parsed, validated options."""
    from ingest.consumer.committer import CommitSettings
    from ingest.consumer.fetcher import FetchSettings
    from ingest.consumer.service import ServeSettings
    from ingest.consumer.shard import ShardSettings
    from ingest.consumer.worker import WorkerSettings

    processes = args.processes
    chain = not args.no_integrity_chain
    worker = WorkerSettings(
        stream_name=args.stream or "",
        resource_id=args.resource_id or "",
        worker_id=args.worker_id,
        initial_position=args.initial_checkpoint,
        lease_seconds=args.lease_seconds,
        shard_sync_seconds=args.shard_sync_seconds,
        anchor_key_id=args.anchor_key_id,
        anchor_seconds=args.anchor_seconds,
        chain=chain,
        stop_when_idle=args.stop_when_idle,
        unready_after=args.unready_after,
        shutdown_deadline=args.shutdown_deadline,
        processes=processes,
        queue_batches=_queue_batches(args),
        queue_bytes=args.queue_mib * 1024 * 1024,
        shard=ShardSettings(
            fetch=FetchSettings(max_records=args.max_records),
            commit=CommitSettings(
                chunk_bytes=args.chunk_kib * 1024,
                chunk_records=chunk_records(args.chunk_kib),
                decoder=decoder_config(args),
            ),
        ),
    )
    worker = dataclasses.replace(
        worker,
        notify=tuple(notifier_specs(args)),
        syslog_cafile=args.syslog_cafile,
    )
    return ServeSettings(
        worker=worker,
        cluster=args.cluster,
        instance=args.instance,
        resource_id=args.resource_id,
        dsn=args.dsn,
        db_pool_size=args.db_pool_size,
        db_command_timeout=args.db_command_timeout or None,
        metrics_port=args.metrics_port,
    )
