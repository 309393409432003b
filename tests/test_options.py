"""One naming of options across commands: every setting shows its DAS_* variable in --help and
really reads it, defaults are written one way, and former spellings still work unseen."""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterator

import pytest

from ingest.cli import build_parser

#: Options that select what one invocation does or prints, not settings: no variable.
PER_INVOCATION = {
    "status": {"--json", "--no-lag"},
    "migrate": {"--no-roles", "--check"},
    "decrypt": {"--resource-id", "--stream", "--include-heartbeats", "--raw"},
    "retention": {"--dry-run", "--no-archive"},
    "dead-letters list": {"--stage", "--limit", "--json"},
    "dead-letters retry": {"--id", "--stage", "--all"},
    "verify": {
        "--shard",
        "--since",
        "--json",
        "--no-anchors",
        "--anchors",
        "--archive",
        "--day",
        "--seed",
    },
    "archive": {"--before", "--athena-ddl", "--athena-table"},
    "anchor": {"--export"},
    # only to measure the chain's cost; never a deployment setting
    "run": {"--no-integrity-chain"},
    "stack": {"--services"},
    "rules list": {"--json"},
    "alerts list": {"--since", "--rule", "--limit", "--json"},
    "alerts ack": {"--note"},
    "alerts deliver": {"--once"},
}
#: The emulator is a developer's and a benchmark's tool, configured per run.
NO_VARIABLES = {"emulate"}

MINIMAL_ARGV = {
    "decrypt": ["--stream", "aws-rds-das-cluster-X"],
    "dead-letters retry": ["--all"],
    "emulate": ["--stream", "s"],
    "alerts show": ["1"],
    "alerts ack": ["1"],
    "rules check": ["rules.yml"],
}


def options() -> Iterator[tuple[str, argparse.Action]]:
    def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}".strip())
            elif action.option_strings and action.dest not in ("help", "version"):
                yield path, action

    yield from walk(build_parser(), "")


def test_every_setting_shows_its_variable() -> None:
    missing = []
    for command, action in options():
        if action.help == argparse.SUPPRESS or command in NO_VARIABLES:
            continue
        flag = action.option_strings[-1]
        if flag in PER_INVOCATION.get(command, set()):
            assert "[DAS_" not in (action.help or ""), f"{command} {flag}"
            continue
        if not re.search(r"\[DAS_[A-Z_]+\]$", action.help or ""):
            missing.append(f"{command} {flag}")
    assert not missing, f"options without a [DAS_*] variable in --help: {missing}"


def sample(action: argparse.Action) -> tuple[str, object]:
    """A value for the option's variable, and what parsing must make of it."""
    if isinstance(action, argparse._StoreTrueAction):
        return "1", True
    if action.choices:
        choice = next((c for c in action.choices if c != action.default), None)
        return str(choice), choice
    if action.type is int:
        return "7", 7
    if action.type is float:
        return "7.5", 7.5
    if action.metavar == "YYYY-MM-DD" and callable(action.type):
        return "2026-12-01", action.type("2026-12-01")  # a day (rebuild-statements --day)
    if callable(action.type) and action.type is not str:
        # a converter of the command's own (a count, a size): a whole number it accepts
        return "7", action.type("7")
    return "from-the-environment", "from-the-environment"


def cases() -> list[tuple[str, str, str]]:
    found = []
    for command, action in options():
        match = re.search(r"\[(DAS_[A-Z_]+)\]$", action.help or "")
        # Before the command, --log-level and --log-format fall back to the command's
        # variables (see test_log_options_before_or_after_the_command).
        if match and command:
            found.append((command, action.option_strings[-1], match[1]))
    return found


@pytest.mark.parametrize(("command", "flag", "variable"), cases(), ids=lambda v: str(v))
def test_the_variable_is_read(
    command: str, flag: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(variable, raising=False)
    action = next(a for c, a in options() if c == command and flag in a.option_strings)
    text, expected = sample(action)
    monkeypatch.setenv(variable, text)
    argv = [*command.split(), *MINIMAL_ARGV.get(command, [])]
    args = build_parser().parse_args(argv)
    assert getattr(args, action.dest) == expected, f"{command} {flag} ignores ${variable}"


def test_defaults_are_written_one_way() -> None:
    for command, action in options():
        text = action.help or ""
        if text == argparse.SUPPRESS:
            continue
        flag = action.option_strings[-1]
        assert not re.search(r"\(default [^:]|\(\d+\)", text), f"{command} {flag}: {text}"
        if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "log_level":
            assert "(default: " in text, f"{command} {flag} does not say its default: {text}"


FORMER_SPELLINGS = [
    (["anchor", "--key-id", "alias/x"], "key_id", "alias/x", "--anchor-key-id"),
    (["retention", "--keep", "30d"], "keep", "30d", "--retention-keep"),
    (
        ["decrypt", "--stream", "s", "--max-decompressed-mb", "8"],
        "max_decompressed_mb",
        8,
        "--max-decompressed-mib",
    ),
]


@pytest.mark.parametrize(("argv", "dest", "value", "new"), FORMER_SPELLINGS)
def test_former_spellings_still_work_but_are_not_shown(
    argv: list[str], dest: str, value: object, new: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert getattr(build_parser().parse_args(argv), dest) == value
    renamed = [*argv[:-2], new, argv[-1]]
    assert getattr(build_parser().parse_args(renamed), dest) == value
    command = argv[:2] if argv[0] == "dead-letters" else argv[:1]
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    shown = capsys.readouterr().out
    assert new in shown
    assert f"{argv[-2]} " not in shown.replace(new, "")


# -- logging options, before or after the command -----------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["status"], {}, ("info", "auto")),
        (["--log-level", "debug", "--log-format", "json", "status"], {}, ("debug", "json")),
        (["status", "--log-level", "warning", "--log-format", "text"], {}, ("warning", "text")),
        (["--log-level", "debug", "status", "--log-level", "error"], {}, ("error", "auto")),
        (["status"], {"DAS_LOG_LEVEL": "debug", "DAS_LOG_FORMAT": "text"}, ("debug", "text")),
        (["--log-format", "json", "status"], {"DAS_LOG_FORMAT": "text"}, ("info", "text")),
    ],
)
def test_log_options_before_or_after_the_command(
    argv: list[str], env: dict[str, str], expected: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingest.cli import log_settings

    for name in ("DAS_LOG_LEVEL", "DAS_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert log_settings(build_parser().parse_args(argv)) == expected


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_text_for_people_json_for_machines() -> None:
    import logging

    from ingest.logs import setup_logging

    for stream, fmt, json_expected in [
        (io.StringIO(), "auto", True),
        (_Terminal(), "auto", False),
        (io.StringIO(), "text", False),
        (_Terminal(), "json", True),
    ]:
        setup_logging("info", fmt, stream=stream)
        logging.getLogger("das.test").info("lease taken", extra={"shard": "shardId-1", "sql": "x"})
        line = stream.getvalue().strip()
        assert line.startswith("{") is json_expected, (fmt, line)
        assert "shardId-1" in line
        assert "sql" not in line  # the allow-list holds in both formats
        if not json_expected:
            assert "info" in line
            assert "lease taken  shard=shardId-1" in line
    setup_logging("info", "json")


async def test_log_format_before_the_command_on_a_real_run() -> None:
    from tests.cli_helpers import das_ingest

    result = await das_ingest(
        "--log-format", "text", "--log-level", "debug", "run", "--stream", "s", "--processes", "-1"
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "das-ingest run: error: --processes must be 0 or more"


@pytest.mark.parametrize(
    ("argv", "env", "chunk_bytes", "chunk_records"),
    [
        ([], None, 512 * 1024, 400),
        (["--chunk-kib", "256"], None, 256 * 1024, 200),
        (["--chunk-kib", "512"], None, 512 * 1024, 400),
        ([], "384", 384 * 1024, 300),
        (["--chunk-kib", "16"], "4096", 16 * 1024, 12),
    ],
)
def test_chunk_kib_sets_both_limits_of_a_chunk(
    argv: list[str],
    env: str | None,
    chunk_bytes: int,
    chunk_records: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ingest.commands.run import serve_settings

    monkeypatch.delenv("DAS_CHUNK_KIB", raising=False)
    if env is not None:
        monkeypatch.setenv("DAS_CHUNK_KIB", env)
    args = build_parser().parse_args(["run", "--stream", "s", *argv])
    args.initial_checkpoint = "TRIM_HORIZON"  # run() derives it from --initial-position
    commit = serve_settings(args).worker.shard.commit
    assert (commit.chunk_bytes, commit.chunk_records) == (chunk_bytes, chunk_records)


def test_chunk_kib_default_is_the_commit_settings_default() -> None:
    from ingest.commands.run import DEFAULT_CHUNK_KIB, chunk_records
    from ingest.consumer.committer import CommitSettings

    default = CommitSettings()
    assert default.chunk_bytes == DEFAULT_CHUNK_KIB * 1024
    assert default.chunk_records == chunk_records(DEFAULT_CHUNK_KIB)
