"""Security: least privilege through the ingester itself, no SQL or key material in any log,
TLS to the warehouse, and DSN passwords never printed.

The secrets we look for are real: every commandText of the traffic (the emulator puts a unique
``das-emulator:`` comment in each SQL statement, so even a fragment is found), the plaintext of
every data key in the stream (fetched from KMS by decrypting the blobs, searched as base64 and
hex), and the warehouse password.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from das_dev.devstack import HOST, LocalStack, PostgresCluster, free_port, unprivileged_user
from ingest.consumer.failures import describe
from ingest.emulate.traffic import MARKER_PREFIX
from tests.cli_helpers import Result, das_ingest
from tests.fleet import (
    Fleet,
    assert_exactly_once,
    committed_events,
    expected,
    migrated,
    new_stream,
    options,
    produce,
    stored,
    wait_until,
)
from tests.logscan import (
    assert_no_leaks,
    data_keys,
    key_texts,
    leaks,
    stream_needles,
    stream_records,
)

pytestmark = pytest.mark.usefixtures("aws_env")


async def login_role(dsn: str, group: str, password: str) -> str:
    """A login user in ``group`` with a password; its DSN (the password in the URL)."""
    user = f"u_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}' IN ROLE {group}")
    finally:
        await admin.close()
    with_user = dsn.replace("postgresql://postgres@", f"postgresql://{user}:{password}@")
    assert with_user != dsn
    return with_user


# -- least privilege, through the ingester ------------------------------------------------------


async def test_a_worker_logged_in_as_the_ingest_role_ingests_but_cannot_rewrite(
    fleet: Fleet, pg_dsn: str
) -> None:
    await migrated(pg_dsn)
    ingest_dsn = await login_role(pg_dsn, "das_ingest", secrets.token_hex(8))
    stream = new_stream()
    opts = options(stream, count=800, shards=2, instances=2)
    await produce(opts)
    # Records under another cluster's data keys: the worker must be able to dead-letter them.
    foreign = options(
        stream, count=100, seed=9, shards=2, instances=2, create_stream=False, resource_id="x-1"
    )
    foreign_report = await produce(foreign)
    worker = await fleet.start(
        "least", stream, ingest_dsn, "--processes", "0", "--stop-when-idle", "1.5"
    )
    assert await worker.wait(90) == 0
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    owner = await asyncpg.connect(pg_dsn)
    try:
        letters = await owner.fetchval("SELECT count(*) FROM das.dead_letters WHERE stage = 'kms'")
    finally:
        await owner.close()
    assert letters == foreign_report.records
    same_login = await asyncpg.connect(ingest_dsn)
    try:
        for statement in (
            "UPDATE das.activity_events SET command_text = 'rewritten'",
            "UPDATE das.activity_events SET db_user_name = 'nobody' WHERE event_index = 0",
            "DELETE FROM das.activity_events",
            "DELETE FROM das.activity_events WHERE event_index = 0",
            "TRUNCATE das.activity_events",
            "DELETE FROM das.dead_letters",
            "ALTER TABLE das.activity_events DISABLE TRIGGER ALL",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await same_login.execute(statement)
        # It can see that it wrote them, but not change them.
        assert await same_login.fetchval("SELECT current_user") != "postgres"
    finally:
        await same_login.close()
    assert await committed_events(pg_dsn) == opts.count


# -- no SQL, no keys, no passwords in what the commands print -----------------------------------


async def test_logs_and_output_carry_no_sql_no_data_keys_and_no_password(
    pg_dsn: str, stack: LocalStack, tmp_path: Path
) -> None:
    await migrated(pg_dsn)
    password = f"pw-{secrets.token_hex(8)}"
    dsn = await login_role(pg_dsn, "das_ingest", password)
    analyst_dsn = await login_role(pg_dsn, "das_analyst", password)
    owner_dsn = pg_dsn.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    stream = new_stream()
    resource_id = stream.removeprefix("aws-rds-das-")
    other = f"cluster-ELSEWHERE{secrets.token_hex(3).upper()}"
    debug = ("--log-level", "debug")
    captured: dict[str, str] = {}

    def keep(name: str, result: Result, *, stdout: bool = True) -> Result:
        captured[f"{name} stderr"] = result.stderr
        if stdout:
            captured[f"{name} stdout"] = result.stdout
        return result

    # Traffic through the command line, part of it under another cluster's data keys (so that
    # there are dead letters, KMS refusals and a re-drive to log about).
    common = ("--engine", "both", "--instances", "2", "--events-per-record", "10", *debug)
    made = await das_ingest(
        "emulate", "--stream", stream, "--create-stream", "--shards", "2", "--count", "600",
        "--seed", "31", "--rotate-every", "7", "--no-progress", *common,
    )  # fmt: skip
    assert keep("emulate", made).returncode == 0, made.stderr
    made = await das_ingest(
        "emulate", "--stream", stream, "--resource-id", other, "--count", "200", "--seed", "32",
        "--no-progress", *common,
    )  # fmt: skip
    assert keep("emulate (other cluster)", made).returncode == 0, made.stderr

    ran = await das_ingest(
        "run", "--stream", stream, "--dsn", dsn, "--worker-id", "talkative",
        "--lease-seconds", "3", "--shard-sync-seconds", "2", "--processes", "1",
        "--stop-when-idle", "2", "--metrics-port", "0", *debug,
    )  # fmt: skip
    assert keep("run", ran).returncode == 0, ran.stderr
    assert '"level":"debug"' in ran.stderr  # debug logging was on
    # the worker froze its start-up heap before consuming (ingest.runtime.freeze_startup_heap)
    frozen = re.search(r'"msg":"startup heap frozen".*?"frozen_objects":(\d+)', ran.stderr)
    assert frozen is not None, ran.stderr[-2000:]
    assert int(frozen.group(1)) > 10_000

    records = await asyncio.to_thread(stream_records, stream)
    input_file = tmp_path / "records.jsonl"
    input_file.write_bytes(
        b"\n".join([*records, base64.b64encode(records[0]), b"not a record at all"])
    )
    decrypted = await das_ingest(
        "decrypt", "--stream", stream, str(input_file), "--include-heartbeats", *debug
    )
    # decrypt prints events on stdout by design: only its stderr must be clean.
    keep("decrypt", decrypted, stdout=False)
    assert decrypted.returncode == 1  # the other cluster's records and the junk line fail
    assert MARKER_PREFIX in decrypted.stdout  # ...and the rest did decrypt

    redriven = await das_ingest(
        "dead-letters", "retry", "--all", "--resource-id", other, "--dsn", owner_dsn, *debug
    )
    assert keep("dead-letters retry", redriven).returncode == 0, redriven.stderr
    listed = await das_ingest("dead-letters", "list", "--dsn", owner_dsn, *debug)
    assert keep("dead-letters list", listed).returncode == 0, listed.stderr
    status = await das_ingest("status", "--stream", stream, "--dsn", analyst_dsn, "--json", *debug)
    assert keep("status", status).returncode == 0, status.stderr
    table = await das_ingest("status", "--dsn", owner_dsn, *debug)
    assert keep("status table", table).returncode == 0, table.stderr

    # Everything arrived: the scan below looked at a run that did its work.
    assert await committed_events(pg_dsn) == 800

    needles: dict[str, str] = {MARKER_PREFIX: "SQL (emulator marker)", password: "password"}
    for seed, count, rid in ((31, 600, resource_id), (32, 200, other)):
        traffic = options(stream, count=count, seed=seed, instances=2, resource_id=rid)
        for record in traffic.inner_records():
            for event in record.events:
                text = event.get("commandText")
                if isinstance(text, str) and len(text) >= 16:
                    needles[text] = "SQL (commandText)"
    keys = await asyncio.to_thread(data_keys, records, [resource_id, other])
    for key in keys:
        for text in key_texts(key):
            needles[text] = "data key"
    assert len(needles) > 100
    found = {name: leaks(text, needles) for name, text in captured.items()}
    assert {name: what for name, what in found.items() if what} == {}
    assert sum(len(t) for t in captured.values()) > 10_000  # there was plenty to scan


async def test_database_errors_are_described_without_the_values_they_quote(pg_dsn: str) -> None:
    secret = f"select 'secret-{secrets.token_hex(4)}'"
    conn = await asyncpg.connect(pg_dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as refused:
            await conn.fetchval(f"SELECT $${secret}$$::int")
        with pytest.raises(asyncpg.PostgresError) as argument:
            await conn.fetchval("SELECT $1::int", secret)
    finally:
        await conn.close()
    assert secret in str(refused.value)  # the server quotes the value...
    assert describe(refused.value) == "InvalidTextRepresentationError (SQLSTATE 22P02)"
    assert secret in str(argument.value)  # ...and so does asyncpg's own argument check
    assert describe(argument.value) == "DataError (SQLSTATE 22000)"
    try:
        raise ValueError(secret)
    except ValueError as exc:  # a bug somewhere: its class and place, not its message
        described = describe(exc)
    assert secret not in described
    assert described.startswith("ValueError at test_security.py:")


async def test_a_refused_commit_that_quotes_sql_is_logged_by_class_and_sqlstate(
    fleet: Fleet, pg_dsn: str
) -> None:
    """A database error whose message quotes stored SQL (here a trigger that refuses heartbeat
    rows, quoting an event of the same transaction) crashes the shard's consumer over and over:
    the worker logs each crash by class and SQLSTATE, never the message, and once the cause is
    gone the shard carries on, exactly once."""
    await migrated(pg_dsn)
    stream = new_stream()
    opts = options(stream, count=1200, shards=2, instances=2, heartbeat_every=3)
    await produce(opts)
    owner = await asyncpg.connect(pg_dsn)
    try:
        await owner.execute(
            """
            CREATE FUNCTION das.refuse_heartbeat() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'heartbeat refused after %',
                    (SELECT string_agg(command_text, ' ') FROM das.activity_events);
            END $$;
            CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON das.heartbeats
                FOR EACH ROW EXECUTE FUNCTION das.refuse_heartbeat();
            """
        )
        worker = await fleet.start("refused", stream, pg_dsn, "--processes", "0")

        async def crashed_twice() -> bool:
            return len(worker.logged("shard consumer crashed; releasing its lease")) >= 2

        await wait_until(crashed_twice, deadline=60)
        await owner.execute("DROP TRIGGER refuse ON das.heartbeats")

        async def all_stored() -> bool:
            return await committed_events(pg_dsn) >= opts.count

        await wait_until(all_stored, deadline=60)
    finally:
        await owner.close()
    worker.terminate()
    assert await worker.wait(30) == 0
    crashes = worker.logged("shard consumer crashed; releasing its lease")
    assert {c["error"] for c in crashes} == {"RaiseError (SQLSTATE P0001)"}
    assert worker.stopped_summary()["lease_changes"]["crashed"] == len(crashes)
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    needles = await stream_needles(stream, [opts], [stream.removeprefix("aws-rds-das-")])
    assert_no_leaks({"refused": worker.output}, needles)


async def run_briefly(*args: str, seconds: float, env: dict[str, str] | None = None) -> Result:
    """Run a command; SIGTERM it after ``seconds`` if it is still running (a worker that keeps
    retrying an unreachable warehouse), and return what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    communicating = asyncio.ensure_future(process.communicate())
    done, _ = await asyncio.wait({communicating}, timeout=seconds)
    if not done:
        process.terminate()
    out, err = await asyncio.wait_for(communicating, 30)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def test_dsn_passwords_are_never_printed(pg_dsn: str) -> None:
    await migrated(pg_dsn)
    password = f"s3cr3t-{secrets.token_hex(6)}"
    closed = free_port()
    host_port = pg_dsn.split("@", 1)[1].split("/", 1)[0]
    attempts = {
        "unreachable": f"postgresql://auditor:{password}@{HOST}:{closed}/audit",
        "unknown user": pg_dsn.replace("postgres@", f"nobody_{secrets.token_hex(3)}:{password}@"),
        "unknown database": f"postgresql://postgres:{password}@{host_port}/missing_db",
        "password parameter": f"postgresql://auditor@{HOST}:{closed}/audit?password={password}",
    }
    outputs: dict[str, Result] = {}
    for name, dsn in attempts.items():
        for command in (
            ("run", "--stream", "aws-rds-das-cluster-NOPE", "--dsn", dsn, "--log-level", "debug"),
            ("status", "--dsn", dsn, "--no-lag", "--log-level", "debug"),
            ("dead-letters", "list", "--dsn", dsn),
            ("migrate", "--dsn", dsn),
        ):
            result = await run_briefly(*command, seconds=5)
            outputs[f"{name}: {command[0]}"] = result
            if command[0] != "run":  # a worker may wait for the warehouse to come back
                assert result.returncode != 0, (name, command)
            assert result.stderr, (name, command)
    # The libpq way: PGPASSWORD in the environment.
    env = {"DAS_DSN": "", "PGHOST": HOST, "PGPORT": str(closed), "PGUSER": "auditor"}
    env_result = await das_ingest("status", "--no-lag", env={**env, "PGPASSWORD": password})
    assert env_result.returncode != 0
    outputs["PGPASSWORD: status"] = env_result
    # And when the login works: status with a password in the DSN.
    good = pg_dsn.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")
    outputs["working: status"] = await das_ingest("status", "--dsn", good, "--no-lag")
    assert outputs["working: status"].returncode == 0
    for name, result in outputs.items():
        text = result.stdout + result.stderr
        assert password not in text, f"{name}: {text[-500:]}"
    # The errors still say what went wrong, with the password masked.
    unreachable = outputs["unreachable: status"].stderr
    assert f"postgresql://auditor:***@{HOST}:{closed}/audit" in unreachable


# -- TLS to the warehouse -----------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (P-256), as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    # PostgreSQL insists the key is private to the user it runs as.
    os.chmod(key_path, 0o600)
    run_as = unprivileged_user()
    if run_as is not None:
        os.chown(key_path, run_as.uid, run_as.gid)
        os.chmod(directory, 0o755)
    return cert_path, key_path


@pytest.fixture
def tls_cluster() -> Iterator[tuple[PostgresCluster, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="das-tls-"))
    try:
        cert, key = self_signed(directory)
        settings = {"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}
        with PostgresCluster(settings=settings) as cluster:
            yield cluster, cert
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_the_worker_talks_tls_to_the_warehouse(
    fleet: Fleet, tls_cluster: tuple[PostgresCluster, Path], tmp_path: Path
) -> None:
    cluster, cert = tls_cluster
    database = f"t_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(cluster.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    dsn = cluster.dsn_for(database)
    await migrated(dsn)
    stream = new_stream()
    first = options(stream, count=600, shards=2, instances=2)
    await produce(first)
    worker = await fleet.start("tls", stream, f"{dsn}?sslmode=require", "--processes", "0")
    admin = await asyncpg.connect(f"{dsn}?sslmode=disable")
    try:

        async def all_stored() -> bool:
            return await committed_events(dsn) >= first.count

        await wait_until(all_stored, deadline=90)
        connections = await admin.fetch(
            """
            SELECT s.ssl, s.version FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
            WHERE a.datname = $1 AND a.backend_type = 'client backend'
              AND a.pid <> pg_backend_pid()
            """,
            database,
        )
        plain = await admin.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await admin.close()
    assert plain is False  # the query can tell a plain connection from an encrypted one
    assert len(connections) >= 2  # the worker's pool
    assert all(c["ssl"] for c in connections), connections
    assert all(c["version"].startswith("TLS") for c in connections)
    worker.terminate()
    assert await worker.wait(30) == 0

    # verify-full: the server must prove it is who its certificate says, to our root.
    second = options(stream, count=300, seed=8, shards=2, instances=2, create_stream=False)
    await produce(second)
    verified = f"{dsn}?sslmode=verify-full&sslrootcert={cert}"
    checked = await fleet.start(
        "tls-verified", stream, verified, "--processes", "0", "--stop-when-idle", "1.5"
    )
    assert await checked.wait(90) == 0
    assert_exactly_once(await stored(dsn), expected(first) + expected(second))
    # ...and a certificate from anyone else is refused.
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    stranger_cert, _ = self_signed(stranger)
    refused = await run_briefly(
        "status", "--no-lag", "--dsn", f"{dsn}?sslmode=verify-full&sslrootcert={stranger_cert}",
        seconds=30,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "certificate verify failed" in refused.stderr
