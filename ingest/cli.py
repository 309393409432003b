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
    archive,
    decrypt,
    integrity,
    migrate,
    rules,
    run,
    status,
    warehouse_admin,
)
from ingest.commands.options import ArgumentParser, add_log_argument
from ingest.emulate import cli as emulate
from ingest.exitcodes import EXIT_CODES

#: What adds each command to the parser, in the order ``--help`` lists them.
COMMANDS: tuple[Callable[[Any], None], ...] = (
    run.add_parser,
    status.add_parser,
    migrate.add_parser,
    decrypt.add_parser,
    warehouse_admin.add_parser,
    integrity.add_parser,
    archive.add_parser,
    rules.add_parser,
    alerts.add_parser,
    emulate.add_parser,
)

DESCRIPTION = f"""\
Decrypt Amazon Aurora Database Activity Streams and store every event exactly once in a
PostgreSQL audit warehouse.

AWS settings come from the standard sources (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL_KINESIS,
AWS_ENDPOINT_URL_KMS, instance roles, ...); the warehouse DSN from --dsn, DAS_DSN, or libpq's
PG* variables.

{EXIT_CODES}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="das-ingest",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"das-ingest {__version__}")
    add_log_argument(parser, top_level=True)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(subparsers)
    _name_commands(subparsers)
    return parser


def _name_commands(subparsers: Any) -> None:
    """Each command's parser records its name (``das-ingest dead-letters retry``), for errors."""
    for command in subparsers.choices.values():
        command.set_defaults(command_name=command.prog)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _name_commands(action)


def log_settings(args: argparse.Namespace) -> tuple[str, str]:
    """(level, format): given after the command, else before it, else from DAS_LOG_LEVEL and
    DAS_LOG_FORMAT (which the command's parser read), else info and auto."""
    level = getattr(args, "log_level", None) or getattr(args, "global_log_level", None)
    fmt = getattr(args, "log_format", None) or getattr(args, "global_log_format", None)
    return str(level or "info"), str(fmt or "auto")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        print("das-ingest: error: give a command (see above)", file=sys.stderr)
        return 2
    # Given after the command, else before it, else the variable (read by the command's
    # parser), else the default. Every command logs through our formatters and their
    # allow-list of fields; without this, Python's last-resort handler would print library
    # warnings verbatim.
    args.log_level, args.log_format = log_settings(args)
    from ingest.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    from ingest.errors import ConfigError
    from ingest.exitcodes import USAGE

    if hasattr(args, "dsn_secret"):
        from ingest.warehouse.auth import configure

        configure(args.dsn_secret, args.iam_auth)
    try:
        return func(args)
    except ConfigError as exc:
        # Found after parsing (a bad combination, an unreadable value): one line, exit 2.
        print(f"{getattr(args, 'command_name', 'das-ingest')}: error: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
