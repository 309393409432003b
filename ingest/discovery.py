"""``run --cluster`` / ``run --instance``: an activity stream and its resource id, from RDS.

An Aurora cluster's stream is found with ``rds:DescribeDBClusters`` (resource id
``DbClusterResourceId``, ``cluster-…``); an RDS for Oracle or RDS for SQL Server DB instance's
with ``rds:DescribeDBInstances`` (``DbiResourceId``, ``db-…``). The resource id is what KMS binds
the stream's data keys to (see :func:`ingest.kms.encryption_context`).
"""

from __future__ import annotations

from typing import Any

from ingest.aws import aws_client, error_code
from ingest.errors import ConfigError


async def discover_cluster(cluster: str) -> tuple[str, str]:
    """(stream name, resource id) of an Aurora cluster's activity stream."""
    async with aws_client("rds") as rds:
        try:
            response = await rds.describe_db_clusters(DBClusterIdentifier=cluster)
        except Exception as exc:  # noqa: BLE001 - turned into a clear configuration error
            code = error_code(exc) or type(exc).__name__
            raise ConfigError(f"cannot describe DB cluster {cluster!r}: {code}") from None
    return _stream_of("DB cluster", cluster, response.get("DBClusters"), "DbClusterResourceId")


async def discover_instance(instance: str) -> tuple[str, str]:
    """(stream name, resource id) of an RDS DB instance's activity stream (RDS for Oracle,
    RDS for SQL Server)."""
    async with aws_client("rds") as rds:
        try:
            response = await rds.describe_db_instances(DBInstanceIdentifier=instance)
        except Exception as exc:  # noqa: BLE001 - turned into a clear configuration error
            code = error_code(exc) or type(exc).__name__
            raise ConfigError(f"cannot describe DB instance {instance!r}: {code}") from None
    return _stream_of("DB instance", instance, response.get("DBInstances"), "DbiResourceId")


def _stream_of(
    what: str, name: str, found: list[dict[str, Any]] | None, id_field: str
) -> tuple[str, str]:
    if not found:
        raise ConfigError(f"{what} {name!r} not found")
    info = found[0]
    stream = info.get("ActivityStreamKinesisStreamName")
    resource_id = info.get(id_field)
    if not stream or not resource_id:
        status = info.get("ActivityStreamStatus", "stopped")
        raise ConfigError(
            f"{what} {name!r} has no database activity stream (status: {status}); "
            "start one with `aws rds start-activity-stream`"
        )
    return str(stream), str(resource_id)
