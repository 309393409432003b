"""`das-ingest run --cluster ID` / `--instance ID`: stream and resource id discovered with
DescribeDBClusters (Aurora) or DescribeDBInstances (RDS for Oracle, RDS for SQL Server).

moto's RDS server knows DB clusters and instances but not activity streams. A small HTTP shim in
front of it adds the fields RDS reports once an activity stream is started (as the seed
document's `describe-db-clusters` example shows) after the resource id; everything else is
moto's real answer.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import aiohttp
import boto3
import pytest
from aiohttp import web

from das_dev.devstack import HOST
from tests.cli_helpers import das_ingest
from tests.fleet import Fleet, assert_exactly_once, expected, migrated, options, produce, stored

pytestmark = pytest.mark.usefixtures("aws_env")


def create_cluster(aws_env: dict[str, str]) -> tuple[str, str]:
    rds = boto3.client("rds", endpoint_url=aws_env["AWS_ENDPOINT_URL_RDS"])
    name = f"aurora-{secrets.token_hex(4)}"
    cluster = rds.create_db_cluster(
        DBClusterIdentifier=name,
        Engine="aurora-postgresql",
        MasterUsername="master",
        MasterUserPassword="not-a-real-password-0",
    )["DBCluster"]
    return name, cluster["DbClusterResourceId"]


def create_instance(aws_env: dict[str, str], engine: str = "oracle-ee") -> tuple[str, str]:
    """An RDS DB instance (moto): its identifier and DbiResourceId (``db-…``)."""
    rds = boto3.client("rds", endpoint_url=aws_env["AWS_ENDPOINT_URL_RDS"])
    name = f"rds-{secrets.token_hex(4)}"
    instance = rds.create_db_instance(
        DBInstanceIdentifier=name,
        DBInstanceClass="db.m5.large",
        Engine=engine,
        MasterUsername="admin",
        MasterUserPassword="not-a-real-password-0",
        AllocatedStorage=20,
    )["DBInstance"]
    return name, instance["DbiResourceId"]


@pytest.fixture
async def activity_stream_rds(aws_env: dict[str, str]) -> AsyncIterator[str]:
    """An RDS endpoint whose clusters report a started activity stream."""
    upstream = aws_env["AWS_ENDPOINT_URL_RDS"]

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with (
            aiohttp.ClientSession() as session,
            session.post(upstream + request.path_qs, data=body, headers=headers) as answer,
        ):
            text = await answer.text()
            status = answer.status
        for action, field in (
            (b"Action=DescribeDBClusters", "DbClusterResourceId"),
            (b"Action=DescribeDBInstances", "DbiResourceId"),
        ):
            if action in body and f"<{field}>" in text:
                start = text.index(f"<{field}>") + len(f"<{field}>")
                resource_id = text[start : text.index(f"</{field}>")]
                extra = (
                    f"<ActivityStreamKinesisStreamName>aws-rds-das-{resource_id}"
                    "</ActivityStreamKinesisStreamName><ActivityStreamStatus>started"
                    "</ActivityStreamStatus><ActivityStreamMode>async</ActivityStreamMode>"
                )
                text = text.replace(f"</{field}>", f"</{field}>" + extra, 1)
        return web.Response(text=text, status=status, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://{HOST}:{port}"
    finally:
        await runner.cleanup()


async def test_run_discovers_stream_and_resource_id(
    pg_dsn: str,
    aws_env: dict[str, str],
    activity_stream_rds: str,
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await migrated(pg_dsn)
    name, resource_id = create_cluster(aws_env)
    opts = options(f"aws-rds-das-{resource_id}", count=300, shards=2, instances=2)
    assert opts.resource_id == resource_id  # the KMS encryption context the cluster uses
    await produce(opts)
    monkeypatch.setenv("AWS_ENDPOINT_URL_RDS", activity_stream_rds)
    worker = await fleet.start_args(
        "run",
        "--cluster",
        name,
        "--dsn",
        pg_dsn,
        "--worker-id",
        "discoverer",
        "--processes",
        "0",
        "--lease-seconds",
        "3",
        "--stop-when-idle",
        "1.5",
    )
    assert await worker.wait(90) == 0
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    started = worker.logged("worker started")
    assert started[0]["stream"] == f"aws-rds-das-{resource_id}"
    assert started[0]["resource_id"] == resource_id


async def test_a_cluster_without_an_activity_stream_is_a_clear_error(
    pg_dsn: str, aws_env: dict[str, str]
) -> None:
    name, _ = create_cluster(aws_env)
    result = await das_ingest("run", "--cluster", name, "--dsn", pg_dsn, "--processes", "0")
    assert result.returncode == 2
    assert f"DB cluster '{name}' has no database activity stream" in result.stderr
    assert "start-activity-stream" in result.stderr
    missing = await das_ingest("run", "--cluster", "no-such-cluster", "--dsn", pg_dsn)
    assert missing.returncode == 2
    assert "cannot describe DB cluster 'no-such-cluster': DBClusterNotFoundFault" in missing.stderr
    assert "Traceback" not in missing.stderr + result.stderr


async def test_run_discovers_a_db_instance_stream_and_its_encryption_context(
    pg_dsn: str,
    aws_env: dict[str, str],
    activity_stream_rds: str,
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RDS for Oracle / SQL Server: DescribeDBInstances gives the stream and the DbiResourceId,
    whose data keys KMS binds to {"aws:rds:db-id": id}; every record decrypts (none reaches
    the dead letters at stage kms)."""
    await migrated(pg_dsn)
    name, resource_id = create_instance(aws_env)
    assert resource_id.startswith("db-")
    opts = options(f"aws-rds-das-{resource_id}", count=120, shards=1, instances=2)
    await produce(opts)
    monkeypatch.setenv("AWS_ENDPOINT_URL_RDS", activity_stream_rds)
    worker = await fleet.start_args(
        "run",
        "--instance",
        name,
        "--dsn",
        pg_dsn,
        "--worker-id",
        "instance-discoverer",
        "--processes",
        "0",
        "--lease-seconds",
        "3",
        "--stop-when-idle",
        "1.5",
    )
    assert await worker.wait(90) == 0
    assert_exactly_once(await stored(pg_dsn), expected(opts))
    started = worker.logged("worker started")
    assert started[0]["stream"] == f"aws-rds-das-{resource_id}"
    assert started[0]["resource_id"] == resource_id


async def test_an_instance_without_an_activity_stream_is_a_clear_error(
    pg_dsn: str, aws_env: dict[str, str]
) -> None:
    name, _ = create_instance(aws_env, "sqlserver-se")
    result = await das_ingest("run", "--instance", name, "--dsn", pg_dsn, "--processes", "0")
    assert result.returncode == 2
    assert f"DB instance '{name}' has no database activity stream" in result.stderr
    missing = await das_ingest("run", "--instance", "no-such-instance", "--dsn", pg_dsn)
    assert missing.returncode == 2
    assert "cannot describe DB instance 'no-such-instance': DBInstanceNotFound" in missing.stderr
    assert "Traceback" not in missing.stderr + result.stderr
