"""Option helpers shared by commands: CLI flag, then environment variable, then default."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any


def env_default(name: str, default: Any = None) -> Any:
    """The default for an option: ``$name`` if set, else ``default``.

    The variable's text is returned as is: argparse converts string defaults with the option's
    ``type``, so a bad value fails that one command with a usage error (exit 2) naming the
    option, and ``--help`` keeps working.
    """
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (a
    container limit), so a worker on a big node does not start a process per node CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as limits:
            quota, period = limits.read().split()[:2]
    except (OSError, ValueError):
        return max(1, cpus)
    if quota != "max" and int(period) > 0:
        cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


def add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=None,
        help="warehouse DSN, e.g. postgresql://user@host/db (default: libpq's PG* variables); "
        "passwords are better kept in PGPASSWORD or ~/.pgpass [DAS_DSN]",
    )


def add_log_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=env_default("DAS_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
        help="log level of the JSON logs on stderr (default: info) [DAS_LOG_LEVEL]",
    )
