"""Thin Kinesis adapter (aiobotocore): shards, iterators, records, and error classes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from ingest.aws import error_code
from ingest.checkpoint import (
    AT_TIMESTAMP_PREFIX,
    LATEST,
    SHARD_END,
    TRIM_HORIZON,
    is_sequence_number,
)
from ingest.errors import ConfigError, IngestError
from ingest.lease import ShardInfo

THROTTLING_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "KMSThrottlingException",
        "InternalFailure",
        "ServiceUnavailable",
        "InternalServerError",
    }
)


class KinesisError(IngestError):
    pass


class KinesisUnavailableError(KinesisError):
    """Throttling, 5xx or network: back off and retry."""

    retriable = True


class IteratorExpiredError(KinesisError):
    """Shard iterators live 5 minutes: get a fresh one from the last checkpoint. Not retriable
    as such (the same call fails again): the fetcher renews the iterator instead."""


class StreamNotFoundError(KinesisError, ConfigError):
    pass


def classify(exc: BaseException) -> KinesisError:
    code = error_code(exc)
    if code is None:
        return KinesisUnavailableError(f"Kinesis unreachable ({type(exc).__name__})")
    if code == "ExpiredIteratorException":
        return IteratorExpiredError("shard iterator expired")
    if code == "ResourceNotFoundException":
        return StreamNotFoundError(f"Kinesis: {exc}")
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in THROTTLING_CODES or (isinstance(status, int) and status >= 500):
        return KinesisUnavailableError(f"Kinesis {code}")
    return KinesisError(f"Kinesis {code}: {exc}")


class KinesisRecord(NamedTuple):
    """One record of a GetRecords page (a named tuple: built once per record in the event
    loop, it costs a fraction of a frozen dataclass)."""

    sequence_number: str
    data: bytes
    partition_key: str | None
    arrival_time: datetime | None


@dataclass(frozen=True, slots=True)
class RecordsPage:
    records: list[KinesisRecord]
    #: None when the shard is closed and fully read (SHARD_END).
    next_iterator: str | None
    millis_behind_latest: int | None


class KinesisReader:
    """The few Kinesis calls a consumer makes, with errors mapped to our classes."""

    def __init__(self, client: Any, stream_name: str) -> None:
        self._client = client
        self.stream_name = stream_name

    async def list_shards(self) -> list[ShardInfo]:
        shards: list[ShardInfo] = []
        kwargs: dict[str, Any] = {"StreamName": self.stream_name}
        try:
            while True:
                response = await self._client.list_shards(**kwargs)
                shards.extend(_shard_info(s) for s in response.get("Shards", []))
                token = response.get("NextToken")
                if not token:
                    break
                kwargs = {"NextToken": token}
        except Exception as exc:
            raise classify(exc) from exc
        return shards

    async def iterator(self, shard_id: str, checkpoint: str) -> str | None:
        """An iterator just after ``checkpoint`` (a sequence number) or at a sentinel."""
        kwargs: dict[str, Any] = {"StreamName": self.stream_name, "ShardId": shard_id}
        if is_sequence_number(checkpoint):
            kwargs |= {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": checkpoint,
            }
        elif checkpoint == TRIM_HORIZON:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        elif checkpoint == LATEST:
            kwargs["ShardIteratorType"] = "LATEST"
        elif checkpoint.startswith(AT_TIMESTAMP_PREFIX):
            kwargs |= {
                "ShardIteratorType": "AT_TIMESTAMP",
                "Timestamp": datetime.fromisoformat(checkpoint[len(AT_TIMESTAMP_PREFIX) :]),
            }
        elif checkpoint == SHARD_END:
            return None
        else:
            raise KinesisError(f"unknown checkpoint {checkpoint!r} for {shard_id}")
        try:
            response = await self._client.get_shard_iterator(**kwargs)
        except Exception as exc:
            raise classify(exc) from exc
        iterator = response.get("ShardIterator")
        return str(iterator) if iterator else None

    async def get_records(self, iterator: str, limit: int) -> RecordsPage:
        try:
            response = await self._client.get_records(ShardIterator=iterator, Limit=limit)
        except Exception as exc:
            raise classify(exc) from exc
        records = [
            KinesisRecord(
                r["SequenceNumber"],
                bytes(r["Data"]),
                r.get("PartitionKey"),
                r.get("ApproximateArrivalTimestamp"),
            )
            for r in response.get("Records", [])
        ]
        return RecordsPage(
            records=records,
            next_iterator=response.get("NextShardIterator"),
            millis_behind_latest=response.get("MillisBehindLatest"),
        )


async def check_stream(client: Any, stream: str) -> bool:
    """That ``stream`` exists (DescribeStreamSummary): a ConfigError if not, or if Kinesis
    refuses the call; KinesisUnavailableError when Kinesis cannot answer now."""
    try:
        await client.describe_stream_summary(StreamName=stream)
    except Exception as exc:  # noqa: BLE001 - classified right here
        error = classify(exc)
        if error.retriable:
            raise error from None
        if isinstance(error, StreamNotFoundError):
            raise ConfigError(f"Kinesis stream {stream!r} not found") from None
        raise ConfigError(f"cannot describe Kinesis stream {stream!r}: {error}") from None
    return True


def _shard_info(shard: dict[str, Any]) -> ShardInfo:
    parents = tuple(
        p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p
    )
    hash_range = shard.get("HashKeyRange", {})
    seq_range = shard.get("SequenceNumberRange", {})
    return ShardInfo(
        shard_id=shard["ShardId"],
        parent_shard_ids=parents,
        hash_key_start=int(hash_range["StartingHashKey"])
        if "StartingHashKey" in hash_range
        else None,
        hash_key_end=int(hash_range["EndingHashKey"]) if "EndingHashKey" in hash_range else None,
        closed="EndingSequenceNumber" in seq_range,
    )
