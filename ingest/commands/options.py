"""Option helpers shared by commands: CLI flag, then environment variable, then default."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def env_default(name: str, default: Any = None, convert: Callable[[str], Any] = str) -> Any:
    """The default for an option: ``$name`` converted, else ``default``."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return convert(value)
    except ValueError:
        raise SystemExit(f"das-ingest: invalid value {value!r} in ${name}") from None


def add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=None,
        help="warehouse DSN, e.g. postgresql://user@host/db (default: $DAS_DSN, else libpq's "
        "PG* variables); passwords are better kept in PGPASSWORD or ~/.pgpass",
    )


def add_log_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=env_default("DAS_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
        help="log level of the JSON logs on stderr (default: info, $DAS_LOG_LEVEL)",
    )
