"""Gauges the warehouse knows and no single worker does: the stream's shards, the age of the
chain's unanchored tail, and the last ``verify``. Refreshed when /metrics is scraped, at most
every ``min_interval`` seconds and within a short timeout, so a slow warehouse delays no scrape
for long and a scrape storm costs one round of queries."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ingest.metrics import Metrics

log = logging.getLogger(__name__)

#: Open and finished shards of the stream, from the lease table.
SHARDS_SQL = """
SELECT count(*) FILTER (WHERE checkpoint IS DISTINCT FROM 'SHARD_END') AS open,
       count(*) FILTER (WHERE checkpoint = 'SHARD_END') AS finished
FROM das.leases WHERE stream_name = $1
"""

#: The oldest link of each shard after its last anchor (the anchors index serves the lookup).
UNANCHORED_SQL = """
SELECT coalesce(extract(epoch FROM now() - min(oldest)), 0)::float8
FROM (
    SELECT (SELECT min(l.created_at) FROM das.chain_links l
             WHERE l.stream_name = s.stream_name AND l.shard_id = s.shard_id
               AND l.link_no > coalesce((SELECT max(a.link_no) FROM das.chain_anchors a
                                          WHERE a.stream_name = s.stream_name
                                            AND a.shard_id = s.shard_id), 0)) AS oldest
    FROM das.leases s WHERE s.stream_name = $1
) tails
"""

#: The last verify that covered this stream (or every stream).
VERIFY_SQL = """
SELECT exit_code, findings, extract(epoch FROM finished_at)::float8 AS finished
FROM das.verify_runs WHERE stream_name = $1 OR stream_name IS NULL
ORDER BY finished_at DESC LIMIT 1
"""


class WarehouseGauges:
    def __init__(
        self, db: Any, metrics: Metrics, *, min_interval: float = 10.0, timeout: float = 2.0
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._min_interval = min_interval
        self._timeout = timeout
        self._refreshed = -min_interval
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._refreshed < self._min_interval:
                return
            self._refreshed = time.monotonic()
            try:
                async with asyncio.timeout(self._timeout), self._db.acquire() as conn:
                    await self._query(conn)
            except Exception as exc:  # noqa: BLE001 - metrics must never break a scrape
                # The warehouse is down or slow: the gauges keep their last values;
                # das_dependency_healthy and /readyz report the outage.
                log.debug("warehouse gauges not refreshed", extra={"error": type(exc).__name__})

    async def _query(self, conn: Any) -> None:
        m, stream = self._metrics, self._metrics.stream
        shards = await conn.fetchrow(SHARDS_SQL, stream)
        m.shards.labels(stream, "open").set(shards["open"])
        m.shards.labels(stream, "finished").set(shards["finished"])
        m.unanchored_age.labels(stream).set(await conn.fetchval(UNANCHORED_SQL, stream))
        last = await conn.fetchrow(VERIFY_SQL, stream)
        if last is not None:
            m.verify_exit_code.labels(stream).set(last["exit_code"])
            m.verify_findings.labels(stream).set(last["findings"])
            m.verify_time.labels(stream).set(last["finished"])
