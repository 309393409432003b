"""The ``das-ingest`` command line.

Each command lives in its own module that exposes ``add_parser(subparsers)``; the parser sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
The command modules are imported here, statically, so readers and tools can follow them; each
imports its heavy dependencies (asyncio, the AWS SDK, asyncpg, the consumer) inside ``func``,
so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ingest import __version__
from ingest.commands import (
    alerts,
    decrypt,
    integrity,
    migrate,
    rules,
    run,
    status,
    warehouse_admin,
)
from ingest.commands.options import ArgumentParser
from ingest.emulate import cli as emulate

#: What adds each command to the parser, in the order ``--help`` lists them.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    run.add_parser,
    status.add_parser,
    migrate.add_parser,
    decrypt.add_parser,
    warehouse_admin.add_parser,
    integrity.add_parser,
    rules.add_parser,
    alerts.add_parser,
    emulate.add_parser,
)

DESCRIPTION = """\
Decrypt Amazon Aurora Database Activity Streams and store every event exactly once in a
PostgreSQL audit warehouse.

AWS settings come from the standard sources (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL_KINESIS,
AWS_ENDPOINT_URL_KMS, instance roles, ...); the warehouse DSN from --dsn, DAS_DSN, or libpq's
PG* variables.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="das-ingest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"das-ingest {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    level: str | None = getattr(args, "log_level", None)
    if level is not None:
        # Every command logs through the JSON formatter and its allow-list of fields; without
        # this, Python's last-resort handler would print library warnings verbatim.
        from ingest.logs import setup_logging

        setup_logging(level)
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
