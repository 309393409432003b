"""Option helpers shared by commands: CLI flag, then environment variable, then default."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, NoReturn


class EnvText(str):
    """An option's default as read from an environment variable, which it remembers so that
    an error in it can name the variable."""

    variable: str

    def __new__(cls, text: str, variable: str = "") -> EnvText:
        value = super().__new__(cls, text)
        value.variable = variable
        return value


def env_default(name: str, default: Any = None) -> Any:
    """The default for an option: ``$name`` if set, else ``default``.

    The variable's text is returned as is (an :class:`EnvText`): argparse converts string
    defaults with the option's ``type`` only when the option's command runs, so a bad value
    fails that one command with a usage error (exit 2) naming the option and the variable (see
    :class:`ArgumentParser`), and other commands and ``--help`` keep working.
    """
    value = os.environ.get(name)
    return default if value is None or value == "" else EnvText(value, name)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, where a bad value from the environment is an error that names the variable
    (``argument --processes: invalid int value: 'abc' (from $DAS_PROCESSES)``) and is checked
    against the option's choices, as a value on the command line is.

    Subcommand parsers are of the same class (``add_subparsers`` uses the parent's).
    """

    def error(self, message: str) -> NoReturn:
        """One line naming the cause (not argparse's usage block), exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        variable = arg_string.variable if isinstance(arg_string, EnvText) else None
        try:
            value = super()._get_value(action, str(arg_string))
        except argparse.ArgumentError as exc:
            if variable is None:
                raise
            raise argparse.ArgumentError(action, f"{exc.message} (from ${variable})") from None
        if variable is not None and action.choices is not None and value not in action.choices:
            choices = ", ".join(repr(choice) for choice in action.choices)
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r} (from ${variable}; choose from {choices})"
            )
        return value


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


def add_hidden_alias(parser: Any, old: str, *, dest: str, **kwargs: Any) -> None:
    """``old``, a former spelling of an option, still accepted but not shown in ``--help``
    (the new spelling's default applies when neither is given)."""
    parser.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=env_default("DAS_DSN"),
        help="warehouse DSN, e.g. postgresql://user@host/db (default: libpq's PG* variables); "
        "passwords are better kept in PGPASSWORD or ~/.pgpass [DAS_DSN]",
    )
    parser.add_argument(
        "--dsn-secret",
        default=env_default("DAS_DSN_SECRET"),
        metavar="ARN",
        help="read the warehouse DSN from this AWS Secrets Manager secret: a DSN, or the JSON "
        "of an RDS secret (host, port, username, password, dbname) [DAS_DSN_SECRET]",
    )
    parser.add_argument(
        "--iam-auth",
        action="store_true",
        default=env_flag("DAS_IAM_AUTH"),
        help="log in with RDS IAM database authentication: a token from the standard AWS "
        "credentials, renewed before it expires, over sslmode=verify-full [DAS_IAM_AUTH]",
    )


def env_flag(name: str) -> bool:
    """A boolean option's default from ``$name``: 1, true, yes or on (any case) are true."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_argument(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """--log-level and --log-format, given before the command or after it (after wins).

    Their parsed default is None (a command's default would overwrite the value given before
    the command): the CLI resolves them, then the variables, then info and auto.
    """
    prefix = "global_" if top_level else ""
    parser.add_argument(
        "--log-level",
        dest=f"{prefix}log_level",
        default=None if top_level else env_default("DAS_LOG_LEVEL"),
        choices=LOG_LEVELS,
        help="log level of the logs on stderr (default: info) [DAS_LOG_LEVEL]",
    )
    parser.add_argument(
        "--log-format",
        dest=f"{prefix}log_format",
        default=None if top_level else env_default("DAS_LOG_FORMAT"),
        choices=("auto", "text", "json"),
        help="text for people, json (one JSON object per line) for machines (default: auto, "
        "text on a terminal, else json) [DAS_LOG_FORMAT]",
    )
