"""The exit-code contract (ingest/exitcodes.py), command by command: 0 success, 1 runtime
failure (verify: findings), 2 usage or configuration error, 3 a dependency unavailable. Every
expected error is one line on stderr naming its cause, never a traceback."""

from __future__ import annotations

import argparse

import pytest

from das_dev.devstack import LocalStack, free_port
from ingest.cli import build_parser
from ingest.errors import IngestError, KmsError, KmsUnavailableError
from ingest.exitcodes import EXIT_CODES, FAILURE, UNAVAILABLE, USAGE
from ingest.kinesis import KinesisUnavailableError
from ingest.runtime import run_async
from tests.cli_helpers import Result, das_ingest

#: Variables that would otherwise fill in what a case leaves out (env_default treats "" as unset).
CLEAN_ENV = dict.fromkeys(
    (
        "DAS_STREAM",
        "DAS_CLUSTER",
        "DAS_DSN",
        "DAS_ANCHOR_KEY_ID",
        "DAS_RETENTION_KEEP",
        "DAS_PROCESSES",
    ),
    "",
)

#: (command line, extra environment, text the one line must contain)
USAGE_ERRORS: list[tuple[list[str], dict[str, str], str]] = [
    ([], {}, "give a command"),
    (["no-such-command"], {}, "invalid choice"),
    (["run"], {}, "give --stream NAME, --cluster ID or --instance ID"),
    (["run", "--stream", "s", "--processes", "-1"], {}, "--processes must be 0 or more"),
    (["run", "--stream", "s", "--processes", "x"], {}, "--processes: invalid int value"),
    (["run", "--stream", "s"], {"DAS_PROCESSES": "abc"}, "$DAS_PROCESSES"),
    (["run", "--stream", "s", "--initial-position", "nowhere"], {}, "--initial-position"),
    (["run", "--stream", "s", "--db-pool-size", "1"], {}, "--db-pool-size must be at least 2"),
    (["run", "--stream", "s", "--lease-seconds", "0"], {}, "--lease-seconds"),
    (["run", "--stream", "s", "--chunk-kib", "8"], {}, "--chunk-kib must be from 16 to 4096"),
    (["run", "--stream", "s"], {"DAS_CHUNK_KIB": "5000"}, "--chunk-kib must be from 16 to 4096"),
    (["status", "--dsn", "notadsn"], {}, "invalid warehouse DSN"),
    (["migrate", "--dsn", "postgresql://u@h:notaport/db"], {}, "invalid warehouse DSN"),
    (["verify", "--since", "bogus"], {}, "--since 'bogus' is not ISO 8601"),
    (["verify", "--retention-keep", "90"], {}, "--retention-keep"),
    (["verify", "--max-unanchored-seconds", "soon"], {}, "invalid float value"),
    (["anchor"], {}, "give --anchor-key-id"),
    (["retention"], {}, "--retention-keep"),
    (["retention", "--retention-keep", "90"], {}, "retention '90'"),
    (["dead-letters"], {}, "ACTION"),
    (["dead-letters", "retry"], {}, "one of the arguments --id --stage --all is required"),
    (["dead-letters", "list", "--limit", "many"], {}, "invalid int value"),
    (["rebuild-statements", "--dsn", "notadsn"], {}, "invalid warehouse DSN"),
    (["rebuild-sessions", "--dsn", "notadsn"], {}, "invalid warehouse DSN"),
    (["decrypt"], {}, "one of the arguments --resource-id --stream is required"),
    (["emulate"], {}, "--stream"),
    (["status", "--log-level", "loud"], {}, "invalid choice"),
    (["rules", "check", "/nonexistent/rules.yaml"], {}, "cannot read /nonexistent/rules.yaml"),
    (["alerts", "list", "--since", "yesterday"], {}, "neither an ISO time nor an age"),
    (["alerts", "deliver"], {}, "no notifier"),
    (["alerts", "deliver", "--notify", "pager=x"], {}, "unknown notifier kind 'pager'"),
    (["run", "--stream", "s", "--notify", "webhook"], {}, "--notify: notifier 'webhook'"),
    (["archive", "--to", "s3://bucket/p"], {}, "give --before"),
    (["archive", "--before", "2024-03-01"], {"DAS_ARCHIVE_URL": ""}, "give --to"),
    (
        ["archive", "--to", "s3://bucket/p", "--before", "2024-03-01", "--max-file-mib", "0"],
        {},
        "--max-file-mib",
    ),
    (["verify", "--day", "2024-03-01"], {}, "--day needs --archive"),
]


def assert_one_line(result: Result, code: int, cause: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert cause in lines[0], lines[0]


@pytest.mark.parametrize(
    ("argv", "env", "cause"), USAGE_ERRORS, ids=[" ".join(c[0]) or "none" for c in USAGE_ERRORS]
)
async def test_a_usage_error_exits_2_with_one_line(
    argv: list[str], env: dict[str, str], cause: str
) -> None:
    result = await das_ingest(*argv, env={**CLEAN_ENV, **env})
    assert_one_line(result, USAGE, cause)


def test_every_command_has_a_usage_error_case() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert commands.choices is not None
    tested = {argv[0] for argv, _, _ in USAGE_ERRORS if argv}
    missing = set(commands.choices) - tested - {"stack"}  # `stack`: a developer tool, no options
    assert not missing, f"no exit-code case for {sorted(missing)}"


def test_the_contract_is_in_the_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--help"])
    assert stop.value.code == 0
    assert " ".join(EXIT_CODES.split()) in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--no-lag"],
        ["migrate", "--check"],
        ["verify", "--no-anchors"],
        ["anchor", "--export", "-"],
        ["dead-letters", "list"],
        ["rebuild-statements"],
        ["rebuild-sessions"],
        ["retention", "--retention-keep", "90d", "--dry-run"],
        ["archive", "--to", "s3://bucket/p", "--before", "2024-03-01"],
    ],
    ids=lambda argv: " ".join(argv),
)
async def test_an_unreachable_warehouse_exits_3(argv: list[str]) -> None:
    dsn = f"postgresql://nobody@127.0.0.1:{free_port()}/audit"
    result = await das_ingest(*argv, env={**CLEAN_ENV, "DAS_DSN": dsn})
    assert_one_line(result, UNAVAILABLE, "cannot reach the warehouse")


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--no-lag"],
        ["verify", "--no-anchors"],
        ["anchor", "--export", "-"],
        ["dead-letters", "list"],
        ["rebuild-statements"],
        ["rebuild-sessions"],
    ],
    ids=lambda argv: " ".join(argv),
)
async def test_an_unmigrated_warehouse_is_a_configuration_error(
    stack: LocalStack, pg_dsn: str, argv: list[str]
) -> None:
    result = await das_ingest(*argv, env={**CLEAN_ENV, "DAS_DSN": pg_dsn})
    assert_one_line(result, USAGE, "not migrated")
    assert "das-ingest migrate" in result.stderr


async def test_migrate_check_on_an_unmigrated_warehouse_says_pending(pg_dsn: str) -> None:
    result = await das_ingest("migrate", "--check", env={**CLEAN_ENV, "DAS_DSN": pg_dsn})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr


async def test_an_unreachable_s3_exits_3() -> None:
    """S3 (here a closed port) that cannot answer is a dependency unavailable, not a
    configuration error: the same command may well succeed later."""
    env = {
        **CLEAN_ENV,
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    result = await das_ingest(
        "verify", "--archive", "s3://audit-archive/das", "--no-anchors", env=env
    )
    assert_one_line(result, UNAVAILABLE, "S3 unavailable (S3 unreachable")


async def test_a_missing_bucket_exits_2(stack: LocalStack) -> None:
    """The real (moto) S3 answers that the bucket does not exist: a configuration error."""
    env = {**CLEAN_ENV, **stack.env()}
    result = await das_ingest(
        "verify", "--archive", "s3://no-such-archive-bucket/das", "--no-anchors", env=env
    )
    assert_one_line(result, USAGE, "cannot use bucket no-such-archive-bucket: 404")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (KmsUnavailableError("KMS throttled: ThrottlingException"), UNAVAILABLE),
        (KinesisUnavailableError("Kinesis unreachable: EndpointConnectionError"), UNAVAILABLE),
        (KmsError("AccessDeniedException"), FAILURE),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_a_retriable_error_reaching_the_top_is_a_dependency_unavailable(
    error: IngestError, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever command lets a retriable error through (a dependency unreachable or throttling
    after its retries) exits 3, not 1: the same command may well succeed later."""

    async def fails() -> int:
        raise error

    assert run_async(fails()) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(error) in err
    assert "Traceback" not in err
