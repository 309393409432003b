"""The README's "Configuration" quickstart, run as written against a fresh database of the test
PostgreSQL server: the administrator creates the owner and the database, the owner migrates and
creates the ingester and analyst logins, the ingester's `run` stores a stream's events and the
analyst's `status` shows them. Names that are cluster-wide (roles, the database) get a unique
suffix, since the test server is shared; everything else is the README's text."""

from __future__ import annotations

import re
import secrets
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest

from das_dev.devstack import LocalStack
from tests.cli_helpers import das_ingest
from tests.fleet import Fleet, options, produce
from tests.test_discovery import activity_stream_rds, create_cluster

__all__ = ["activity_stream_rds"]  # the fixture, used by name

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> list[tuple[str, str, str]]:
    """("sql", dsn, script) and ("das-ingest", "", command line) steps, in order."""
    section = README.read_text().split("## Configuration", 1)[1]
    (block,) = re.findall(r"```sh\n(.*?)```", section.split("\n## ", 1)[0], re.S)[:1]
    steps: list[tuple[str, str, str]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("psql "):
            dsn = shlex.split(line)[1]
            assert line.endswith("<<'SQL'")
            script = []
            for body in lines:
                if body == "SQL":
                    break
                script.append(body)
            steps.append(("sql", dsn, "\n".join(script)))
        elif line.startswith("das-ingest "):
            steps.append(("das-ingest", "", line))
    return steps


@pytest.fixture
async def names(stack: LocalStack) -> AsyncIterator[dict[str, str]]:
    suffix = secrets.token_hex(3)
    renamed = {
        name: f"{name}_{suffix}"
        for name in ("das_owner", "audit", "das_ingest", "das_analyst", "ingester", "analyst")
    }
    yield renamed
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{renamed["audit"]}" WITH (FORCE)')
        for role in ("ingester", "analyst", "das_ingest", "das_analyst", "das_owner"):
            await admin.execute(f'DROP ROLE IF EXISTS "{renamed[role]}"')
    finally:
        await admin.close()


def localized(text: str, stack: LocalStack, names: dict[str, str]) -> str:
    """The README's text pointed at the test server, with the unique names."""
    server = urlsplit(stack.dsn)
    text = text.replace("admin@warehouse/postgres", f"{server.username}@warehouse/postgres")
    text = text.replace("@warehouse/", f"@{server.hostname}:{server.port}/")
    for name, unique in names.items():
        text = re.sub(rf"\b{name}\b", unique, text)
    return text


@pytest.mark.usefixtures("aws_env")
async def test_the_readme_quickstart_runs_as_written(
    stack: LocalStack,
    names: dict[str, str],
    aws_env: dict[str, str],
    activity_stream_rds: str,
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = quickstart()
    assert [kind for kind, _, _ in steps] == [
        "sql",
        "das-ingest",
        "sql",
        "das-ingest",
        "das-ingest",
    ]
    cluster, resource_id = create_cluster(aws_env)
    opts = options(f"aws-rds-das-{resource_id}", count=50, shards=1, instances=2)
    await produce(opts)
    monkeypatch.setenv("AWS_ENDPOINT_URL_RDS", activity_stream_rds)
    # migrate names the group roles it creates from these (the README relies on the defaults)
    env = {"DAS_INGEST_ROLE": names["das_ingest"], "DAS_ANALYST_ROLE": names["das_analyst"]}
    for kind, dsn, text in steps:
        if kind == "sql":
            conn = await asyncpg.connect(localized(dsn, stack, names))
            try:
                for statement in filter(str.strip, localized(text, stack, names).split(";")):
                    await conn.execute(statement)
            finally:
                await conn.close()
            continue
        argv = shlex.split(localized(text, stack, names))[1:]
        if argv[0] == "run":
            argv = [a.replace("my-aurora-cluster", cluster) for a in argv]
            # Only so the test ends: stop once caught up.
            worker = await fleet.start_args(
                *argv, "--processes", "0", "--lease-seconds", "3", "--stop-when-idle", "2"
            )
            assert await worker.wait(120) == 0, worker.output
            continue
        if argv[0] == "status":
            argv += ["--json", "--no-lag"]
        result = await das_ingest(*argv, env=env)
        assert result.returncode == 0, (text, result.stderr)
        if argv[0] == "status":
            report = orjson.loads(result.stdout)
            assert report["events"] == opts.count
            assert [s["stream"] for s in report["shards"]] == [opts.stream]
