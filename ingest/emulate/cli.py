"""``das-ingest emulate``: write Aurora-faithful, KMS-encrypted DAS records into a Kinesis stream.

Heavy imports (the Encryption SDK, aiobotocore) happen inside ``run`` so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from ingest.commands.options import add_log_argument

SCENARIO_NAMES = (
    "brute-force",
    "password-spray",
    "privilege-escalation",
    "mass-export",
    "off-hours-ddl",
    "audit-tampering",
    "stream-stopped",
)

if TYPE_CHECKING:
    from ingest.emulate.producer import EmulateReport, Progress

DESCRIPTION = """\
Produce a Database Activity Stream the way RDS does: seeded, realistic Aurora PostgreSQL
(record versions 1.0/1.1), Aurora MySQL (1.2), RDS for Oracle (1.3) and RDS for SQL Server (1.4)
activity (sessions, DML, DDL, grants, failed logins, MySQL MAIN/AUX pairs in any order, Oracle
audit classes, SQL Server split records, heartbeats), gzip-compressed, encrypted with the AWS
Encryption SDK under a KMS data key bound to the resource id (a db-... id for the RDS engines),
and put into Kinesis with one partition key per DB instance. The same seed always yields the
same events, so a consumer test can check that every event arrived exactly once.
"""

EPILOG = """\
AWS settings come from the usual places (AWS_REGION, AWS_ACCESS_KEY_ID, AWS_PROFILE, ...). For a
local stack, point the SDK at it with AWS_ENDPOINT_URL_KINESIS and AWS_ENDPOINT_URL_KMS
(`make stack` in a checkout of das-ingest starts one and prints them). Without --kms-key-id a
new symmetric KMS key is created first: meant for local stacks; on AWS that is a billable key
that stays.

Data keys come from KMS GenerateDataKey with encryption context
{"aws:rds:dbc-id": RESOURCE_ID} (an Aurora cluster, cluster-...) or {"aws:rds:db-id": RESOURCE_ID}
(an RDS DB instance, db-...); RESOURCE_ID defaults to the stream name without "aws-rds-das-".
Encryption (ECDSA P-384 signed messages) costs about 2 ms per record: use --processes to spread
it over cores.

examples:
  das-ingest emulate --stream aws-rds-das-cluster-DEMO --create-stream --shards 2
  das-ingest emulate --stream aws-rds-das-cluster-DEMO --count 1000000 --processes 4 \\
      --kms-key-id alias/das --rate 5000
"""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "emulate",
        help="put emulated, encrypted DAS records of the four engines into a Kinesis stream",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stream", required=True, help="Kinesis stream (aws-rds-das-<id>)")
    parser.add_argument(
        "--resource-id",
        help="resource id for the KMS encryption context (cluster-... or, for an RDS instance, "
        "db-...) and the Aurora engines' clusterId (default: the stream name without "
        "aws-rds-das-)",
    )
    parser.add_argument(
        "--create-stream", action="store_true", help="create the stream if it does not exist"
    )
    parser.add_argument(
        "--shards", type=int, default=1, metavar="N", help="shards of a created stream (default: 1)"
    )
    parser.add_argument(
        "--kms-key-id", help="KMS key for the data keys (default: create one; local stacks only)"
    )
    parser.add_argument(
        "--engine",
        choices=("postgres", "mysql", "oracle", "sqlserver", "both", "all"),
        default="both",
        help="Aurora PostgreSQL, Aurora MySQL, RDS for Oracle, RDS for SQL Server; both: the "
        "two Aurora engines, all: the four, alternating by instance (default: both)",
    )
    parser.add_argument(
        "--engine-native-audit-fields",
        action="store_true",
        help="Oracle and SQL Server: fill engineNativeAuditFields, as a stream started with "
        "--engine-native-audit-fields-included does (default: off, {})",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=2,
        metavar="N",
        help="DB instances, one partition key each; 'both' and 'all' alternate engines "
        "(default: 2)",
    )
    parser.add_argument(
        "--pg-version",
        choices=("1.0", "1.1"),
        default="1.1",
        help="PostgreSQL record version (default: 1.1)",
    )
    parser.add_argument(
        "--events-per-record",
        type=int,
        default=10,
        metavar="N",
        help="events per record (default: 10)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="record events per second; 0 = no limit (default: 0)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=1000,
        help="record events to produce, heartbeats aside (default: 1000)",
    )
    parser.add_argument("--seed", type=int, default=1, help="traffic seed (default: 1)")
    parser.add_argument(
        "--scenario",
        type=_scenario,
        metavar="NAME[,NAME...]",
        help="inject an incident with known ground truth into paced normal Aurora PostgreSQL "
        "traffic of --count events (20 events/s of log time from a Monday 09:00 UTC; the "
        f"incident 5 minutes in): {', '.join(SCENARIO_NAMES)}; several, joined by commas, are "
        "injected together; docs/policies.md lists the alerts each must raise",
    )
    parser.add_argument(
        "--rotate-every",
        type=int,
        default=100,
        metavar="K",
        help="new data key every K records (default: 100)",
    )
    parser.add_argument(
        "--heartbeat-every",
        type=int,
        default=20,
        metavar="K",
        help="heartbeat record after every K records of an instance; 0 = none (default: 20)",
    )
    parser.add_argument(
        "--processes", type=int, default=1, metavar="N", help="encoder processes (default: 1)"
    )
    parser.add_argument(
        "--suite",
        choices=("auto", "0x0178", "0x0378"),
        default="auto",
        help="Encryption SDK algorithm suite: 0x0178 (AES-256-GCM, HKDF-SHA256, unsigned, empty "
        "ESDK context), 0x0378 (HKDF-SHA384, ECDSA P-384 signed); auto: as seen in the wild, "
        "0x0178 for PostgreSQL, 0x0378 for the other engines (default: auto)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress on stderr: a bar on a terminal, else a line every few seconds (default: on)",
    )
    add_log_argument(parser)
    parser.set_defaults(func=run)


def _scenario(text: str) -> str:
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in SCENARIO_NAMES]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: one or more of {', '.join(SCENARIO_NAMES)}, joined by commas, each once"
        )
    return ",".join(names)


def run(args: argparse.Namespace) -> int:
    from ingest.emulate.producer import EmulateOptions, emulate
    from ingest.errors import ConfigError
    from ingest.runtime import run_async

    try:
        options = EmulateOptions(
            stream=args.stream,
            resource_id=args.resource_id or "",
            create_stream=args.create_stream,
            shards=args.shards,
            kms_key_id=args.kms_key_id,
            engine=args.engine,
            instances=args.instances,
            pg_version=args.pg_version,
            events_per_record=args.events_per_record,
            rate=args.rate,
            count=args.count,
            seed=args.seed,
            rotate_every=args.rotate_every,
            heartbeat_every=args.heartbeat_every,
            processes=args.processes,
            scenario=args.scenario,
            suite=None if args.suite == "auto" else int(args.suite, 16),
            native_fields=args.engine_native_audit_fields,
        )
    except ConfigError as exc:
        print(f"das-ingest emulate: {exc}", file=sys.stderr)
        return 2
    printer = ProgressPrinter(sys.stderr) if args.progress else None
    reports: list[EmulateReport] = []

    async def main() -> int:
        try:
            reports.append(await emulate(options, progress=printer))
        finally:
            if printer is not None:
                printer.close()
        return 0

    code = run_async(main())
    if reports:
        print(summary(reports[0]))
    return code


def summary(report: EmulateReport) -> str:
    retries = f", {report.retried} re-put" if report.retried else ""
    reordered = f", {report.reordered} overtook a failed record" if report.reordered else ""
    return (
        f"emulate: {report.records} records ({report.events} events, {report.heartbeats} "
        f"heartbeats) into {report.stream} ({report.shards} shards) in {report.elapsed:.1f} s: "
        f"{report.records_per_second:.0f} records/s, {report.events_per_second:.0f} events/s; "
        f"{report.data_keys} data keys, KMS key {report.kms_key_id}, "
        f"resource id {report.resource_id}{retries}{reordered}"
    )


class ProgressPrinter:
    """A one-line bar redrawn in place on a terminal; a plain line every few seconds otherwise
    (logs and CI keep a readable history instead of a wall of carriage returns)."""

    def __init__(self, stream: TextIO, *, interval: float | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self._last = time.monotonic()
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        done = progress.events >= progress.target_events
        if now - self._last < self.interval and not done:
            return
        self._last = now
        line = self.render(progress)
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    @staticmethod
    def render(progress: Progress, width: int = 24) -> str:
        target = max(progress.target_events, 1)
        fraction = min(progress.events / target, 1.0)
        filled = int(fraction * width)
        rate = progress.records / progress.elapsed if progress.elapsed > 0 else 0.0
        events_rate = progress.events / progress.elapsed if progress.elapsed > 0 else 0.0
        eta = (target - progress.events) / events_rate if events_rate > 0 else 0.0
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} "
            f"{progress.events}/{progress.target_events} events, {progress.records} records, "
            f"{rate:.0f} records/s, eta {eta:.0f} s"
        )

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
