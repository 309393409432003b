"""Shared fixtures. The local stack is started once per session: it is real servers, not mocks,
and starting it costs a couple of seconds, so tests isolate themselves per database instead."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from das_dev.devstack import LocalStack
from tests.fleet import Fleet

_STRAY_AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that reaches the stack is marked, so `-m "not stack"` runs the pure tests alone.
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """kinesalite, moto (KMS, RDS) and PostgreSQL on 127.0.0.1, for the whole session."""
    with LocalStack() as running:
        yield running


@pytest.fixture
async def pg_dsn(stack: LocalStack) -> AsyncIterator[str]:
    """DSN of a fresh, empty database on the stack's cluster, dropped after the test."""
    assert stack.postgres is not None
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield stack.postgres.dsn_for(name)
    admin = await asyncpg.connect(stack.dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def aws_env(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The stack's AWS/DAS variables in os.environ, for in-process SDK clients."""
    for stray in _STRAY_AWS_VARIABLES:  # a developer's real profile must not leak in
        monkeypatch.delenv(stray, raising=False)
    env = stack.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    """Worker processes started by a test; whatever still runs at teardown is killed."""
    running = Fleet()
    try:
        yield running
    finally:
        await running.close()
