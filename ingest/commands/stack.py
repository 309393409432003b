"""``das-ingest stack``: run the local stack (kinesalite, moto KMS, PostgreSQL) for manual use."""

from __future__ import annotations

import argparse
from typing import Any

from ingest.commands.options import add_log_argument


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stack",
        help="run a local stack (Kinesis, KMS, PostgreSQL on loopback) until Ctrl-C",
        description="Start kinesalite (Kinesis), moto (KMS, RDS) and a throwaway PostgreSQL "
        "on free loopback ports, print `export` lines for their endpoints, and stop them all "
        "on Ctrl-C or SIGTERM. For trying das-ingest by hand: eval the exports in a shell.",
    )
    parser.add_argument(
        "--services", default=None, help="comma-separated subset of kinesis,kms,postgres"
    )
    add_log_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ingest.devstack import main

    return main(["--services", args.services] if args.services else [])
