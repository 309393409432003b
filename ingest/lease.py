"""Lease values shared by the Kinesis adapter, the lease store, the sink and the consumer.

Pure values (a leaf module): the lease row as read (:class:`Lease`), what a commit must still
match (:class:`LeaseToken`), and a shard as Kinesis lists it (:class:`ShardInfo`). The store
that reads and writes them is ``ingest.warehouse.leases``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol


class Row(Protocol):
    """A database row read by column name (an asyncpg Record, a dict)."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Lease:
    stream_name: str
    shard_id: str
    owner: str | None
    lease_counter: int
    expires_at: datetime | None
    checkpoint: str
    parent_shard_ids: tuple[str, ...]

    @classmethod
    def from_row(cls, row: Row) -> Lease:
        return cls(
            stream_name=row["stream_name"],
            shard_id=row["shard_id"],
            owner=row["owner"],
            lease_counter=row["lease_counter"],
            expires_at=row["expires_at"],
            checkpoint=row["checkpoint"],
            parent_shard_ids=tuple(row["parent_shard_ids"] or ()),
        )


@dataclass(frozen=True, slots=True)
class LeaseToken:
    """What a commit must still match: the lease as this worker holds it."""

    stream_name: str
    shard_id: str
    owner: str
    lease_counter: int


@dataclass(frozen=True, slots=True)
class ShardInfo:
    shard_id: str
    parent_shard_ids: tuple[str, ...]
    hash_key_start: int | None = None
    hash_key_end: int | None = None
    closed: bool = False
