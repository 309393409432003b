"""Shard leases in PostgreSQL, modelled on the Kinesis Client Library.

A lease is a small value (:class:`Lease`) with a counter. Every write is conditional on the
counter, and the counter changes whenever ownership changes (take, steal, release), so a worker
that lost a lease can never renew it, checkpoint it or write rows under it. Expiry uses the
database's clock (``now()``): the one clock every worker shares.

Checkpoints are sequence numbers or the sentinels of ``ingest.checkpoint``. A child shard (after
a split or merge) is eligible only once every parent's checkpoint is SHARD_END, so records of one
partition key are read in order across resharding. The values (Lease, ShardInfo) live in
``ingest.lease``.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ingest.checkpoint import TRIM_HORIZON
from ingest.lease import Lease, ShardInfo
from ingest.warehouse.db import warehouse_call

_COLUMNS = "stream_name, shard_id, owner, lease_counter, expires_at, checkpoint, parent_shard_ids"

# A lease is eligible when it is not finished and none of its parents is unfinished.
_ELIGIBLE = """
l.checkpoint <> 'SHARD_END'
AND NOT EXISTS (
    SELECT 1 FROM das.leases p
    WHERE p.stream_name = l.stream_name AND p.shard_id = ANY (l.parent_shard_ids)
      AND p.checkpoint <> 'SHARD_END')
"""


class LeaseStore:
    def __init__(self, pool: asyncpg.Pool, stream_name: str, *, lease_seconds: float) -> None:
        self._pool = pool
        self.stream_name = stream_name
        self.lease_seconds = lease_seconds

    @warehouse_call
    async def sync_shards(self, shards: Sequence[ShardInfo], initial_checkpoint: str) -> int:
        """Create lease rows for shards we have not seen. Children of shards we already had
        leases for start at TRIM_HORIZON, so nothing written after a reshard is skipped; every
        other new shard starts at ``initial_checkpoint`` (with LATEST on a first start, a closed
        parent simply ends at once). Returns how many leases were created."""
        known = {
            r["shard_id"]
            for r in await self._pool.fetch(
                "SELECT shard_id FROM das.leases WHERE stream_name = $1", self.stream_name
            )
        }
        new = [s for s in shards if s.shard_id not in known]
        if not new:
            return 0
        rows = []
        for shard in new:
            has_parent = any(p in known for p in shard.parent_shard_ids)
            rows.append(
                (
                    self.stream_name,
                    shard.shard_id,
                    TRIM_HORIZON if has_parent else initial_checkpoint,
                    list(shard.parent_shard_ids),
                    shard.hash_key_start,
                    shard.hash_key_end,
                )
            )
        await self._pool.executemany(
            """
            INSERT INTO das.leases (stream_name, shard_id, checkpoint, parent_shard_ids,
                                    hash_key_start, hash_key_end)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (stream_name, shard_id) DO NOTHING
            """,
            rows,
        )
        return len(rows)

    @warehouse_call
    async def all_leases(self) -> list[Lease]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM das.leases WHERE stream_name = $1 ORDER BY shard_id",
            self.stream_name,
        )
        return [Lease.from_row(r) for r in rows]

    @warehouse_call
    async def heartbeat_worker(self, worker_id: str, *, ready: bool) -> list[str]:
        """Record that ``worker_id`` is alive; returns the ids of all live workers."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                """
                INSERT INTO das.workers (stream_name, worker_id, ready) VALUES ($1, $2, $3)
                ON CONFLICT (stream_name, worker_id)
                DO UPDATE SET last_seen = now(), ready = EXCLUDED.ready
                """,
                self.stream_name,
                worker_id,
                ready,
            )
            rows = await conn.fetch(
                """
                SELECT worker_id FROM das.workers
                WHERE stream_name = $1 AND last_seen > now() - make_interval(secs => $2)
                ORDER BY worker_id
                """,
                self.stream_name,
                self.lease_seconds,
            )
        return [r["worker_id"] for r in rows]

    @warehouse_call
    async def deregister_worker(self, worker_id: str) -> None:
        await self._pool.execute(
            "DELETE FROM das.workers WHERE stream_name = $1 AND worker_id = $2",
            self.stream_name,
            worker_id,
        )

    @warehouse_call
    async def eligible_leases(self) -> list[tuple[Lease, bool]]:
        """Unfinished leases whose parents are finished, with whether each has expired."""
        rows = await self._pool.fetch(
            f"""
            SELECT {", ".join("l." + c.strip() for c in _COLUMNS.split(","))},
                   (l.owner IS NULL OR l.expires_at IS NULL OR l.expires_at < now()) AS expired
            FROM das.leases l
            WHERE l.stream_name = $1 AND {_ELIGIBLE}
            ORDER BY l.shard_id
            """,
            self.stream_name,
        )
        return [(Lease.from_row(r), bool(r["expired"])) for r in rows]

    @warehouse_call
    async def take(self, lease: Lease, owner: str) -> Lease | None:
        """Take (or steal) ``lease`` as seen; None if someone changed it in between."""
        row = await self._pool.fetchrow(
            f"""
            UPDATE das.leases SET owner = $1, lease_counter = lease_counter + 1,
                   expires_at = now() + make_interval(secs => $2),
                   owner_changes = owner_changes + 1
            WHERE stream_name = $3 AND shard_id = $4 AND lease_counter = $5
              AND checkpoint <> 'SHARD_END'
            RETURNING {_COLUMNS}
            """,
            owner,
            self.lease_seconds,
            self.stream_name,
            lease.shard_id,
            lease.lease_counter,
        )
        return Lease.from_row(row) if row else None

    @warehouse_call
    async def renew(self, owner: str, held: dict[str, int]) -> set[str]:
        """Extend every lease ``owner`` still holds at the given counters; returns those."""
        if not held:
            return set()
        shard_ids = list(held)
        rows = await self._pool.fetch(
            """
            UPDATE das.leases l SET expires_at = now() + make_interval(secs => $1)
            FROM unnest($2::text[], $3::bigint[]) AS h(shard_id, counter)
            WHERE l.stream_name = $4 AND l.shard_id = h.shard_id
              AND l.lease_counter = h.counter AND l.owner = $5
            RETURNING l.shard_id
            """,
            self.lease_seconds,
            shard_ids,
            [held[s] for s in shard_ids],
            self.stream_name,
            owner,
        )
        return {r["shard_id"] for r in rows}

    @warehouse_call
    async def release(self, owner: str, shard_id: str, counter: int) -> bool:
        """Give the lease back (graceful stop, or after SHARD_END) so others take it at once."""
        status = await self._pool.execute(
            """
            UPDATE das.leases SET owner = NULL, expires_at = NULL,
                   lease_counter = lease_counter + 1
            WHERE stream_name = $1 AND shard_id = $2 AND owner = $3 AND lease_counter = $4
            """,
            self.stream_name,
            shard_id,
            owner,
            counter,
        )
        return bool(status == "UPDATE 1")

    @warehouse_call
    async def checkpoint_of(self, shard_id: str) -> str | None:
        value = await self._pool.fetchval(
            "SELECT checkpoint FROM das.leases WHERE stream_name = $1 AND shard_id = $2",
            self.stream_name,
            shard_id,
        )
        return str(value) if value is not None else None
