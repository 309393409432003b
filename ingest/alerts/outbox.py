"""Delivering alerts: das.alert_outbox, at least once, retried with backoff, never blocking
ingestion.

Alerts are written with their events (ingest.alerts.store); delivery is separate and
asynchronous, so a notifier outage never holds a batch. A :class:`Deliverer` (one per worker;
any number may run, on any workers) repeats:

1. **enqueue**: a ``pending`` outbox row per configured notifier for every alert created within
   ``lookback`` that has none (a notifier added later does not replay the whole history);
2. **claim**: up to ``batch`` due rows, by pushing their ``next_attempt_at`` a ``claim`` into the
   future in one UPDATE ... SKIP LOCKED: another deliverer skips them, and if this one dies
   mid-send they come due again (at least once; receivers drop duplicates by the idempotency
   key);
3. **send** each, outside any transaction, then record the outcome: ``delivered``, or another
   attempt after ``base_delay * 2^(attempts-1)`` (capped at ``max_delay``), or ``failed``
   after ``max_attempts`` or on an error retrying cannot fix (the row keeps ``last_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from ingest.alerts.notifiers import AlertMessage, DeliveryError, Notifier

log = logging.getLogger(__name__)

ENQUEUE = """
INSERT INTO das.alert_outbox (alert_id, notifier)
SELECT a.id, n.name FROM das.alerts a CROSS JOIN unnest($1::text[]) AS n(name)
WHERE a.created_at > now() - $2::interval
ON CONFLICT DO NOTHING
"""

CLAIM = """
UPDATE das.alert_outbox o SET next_attempt_at = now() + $3::interval
FROM (
    SELECT alert_id, notifier FROM das.alert_outbox
    WHERE state = 'pending' AND next_attempt_at <= now() AND notifier = ANY ($1::text[])
    ORDER BY next_attempt_at LIMIT $2
    FOR UPDATE SKIP LOCKED
) AS due
WHERE o.alert_id = due.alert_id AND o.notifier = due.notifier
RETURNING o.alert_id, o.notifier, o.attempts
"""

ALERTS = """
SELECT id, rule, severity, title, group_key, window_start, first_event_time, last_event_time,
       event_count, created_at, stream_name, cluster_id, instance_id, events::text AS events
FROM das.alerts WHERE id = ANY ($1::bigint[])
"""

DELIVERED = """
UPDATE das.alert_outbox SET state = 'delivered', delivered_at = now(), attempts = attempts + 1,
       last_error = NULL
WHERE alert_id = $1 AND notifier = $2 AND state = 'pending'
"""

RETRY = """
UPDATE das.alert_outbox SET attempts = attempts + 1, last_error = $3,
       next_attempt_at = now() + $4::interval,
       state = CASE WHEN $5 THEN 'failed' ELSE 'pending' END
WHERE alert_id = $1 AND notifier = $2 AND state = 'pending'
"""


@dataclass(frozen=True)
class DeliverySettings:
    base_delay: timedelta = timedelta(seconds=2)
    max_delay: timedelta = timedelta(minutes=10)
    max_attempts: int = 12
    claim: timedelta = timedelta(minutes=2)
    batch: int = 50
    lookback: timedelta = timedelta(days=1)
    interval: float = 2.0

    def backoff(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed attempt."""
        seconds = self.base_delay.total_seconds() * 2 ** max(attempts - 1, 0)
        return timedelta(seconds=min(seconds, self.max_delay.total_seconds()))


class DeliveryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.delivered = Counter(
            "das_alerts_delivered", "Alerts delivered, per notifier", ["notifier"], registry=r
        )
        self.failures = Counter(
            "das_alert_delivery_failures",
            "Failed delivery attempts, per notifier; final=true: the alert gave up (failed)",
            ["notifier", "final"],
            registry=r,
        )
        self.pending = Gauge(
            "das_alerts_pending", "Outbox rows still to deliver, per notifier", ["notifier"],
            registry=r,
        )  # fmt: skip


def message(row: Any) -> AlertMessage:
    return AlertMessage(
        id=row["id"], rule=row["rule"], severity=row["severity"], title=row["title"],
        group_key=row["group_key"], window_start=row["window_start"],
        first_event_time=row["first_event_time"], last_event_time=row["last_event_time"],
        event_count=row["event_count"], created_at=row["created_at"],
        stream_name=row["stream_name"], cluster_id=row["cluster_id"],
        instance_id=row["instance_id"], events=orjson.loads(row["events"]),
    )  # fmt: skip


class Deliverer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        notifiers: Sequence[Notifier],
        settings: DeliverySettings = DeliverySettings(),
        metrics: DeliveryMetrics | None = None,
    ) -> None:
        self.pool = pool
        self.notifiers = {n.name: n for n in notifiers}
        self.settings = settings
        self.metrics = metrics or DeliveryMetrics()
        # Every notifier's series exist from the start at 0: Prometheus' increase() cannot see
        # a counter's first step, so a first failure (or give-up) would otherwise go unalerted.
        for name in self.notifiers:
            self.metrics.delivered.labels(name)
            self.metrics.failures.labels(name, "false")
            self.metrics.failures.labels(name, "true")

    async def run_once(self) -> int:
        """One enqueue-claim-send round; returns how many sends were attempted."""
        names = list(self.notifiers)
        if not names:
            return 0
        s = self.settings
        async with self.pool.acquire() as conn:
            await conn.execute(ENQUEUE, names, s.lookback)
            claimed = await conn.fetch(CLAIM, names, s.batch, s.claim)
            rows = await conn.fetch(ALERTS, list({r["alert_id"] for r in claimed}))
        alerts = {r["id"]: message(r) for r in rows}
        for item in claimed:
            await self._deliver(alerts[item["alert_id"]], item["notifier"], item["attempts"])
        await self._gauge()
        return len(claimed)

    async def _deliver(self, alert: AlertMessage, notifier: str, attempts: int) -> None:
        try:
            await self.notifiers[notifier].send(alert)
        except DeliveryError as exc:
            tried = attempts + 1
            final = not exc.can_retry or tried >= self.settings.max_attempts
            self.metrics.failures.labels(notifier, str(final).lower()).inc()
            log.warning(
                "alert delivery failed" + ("; giving up" if final else "; will retry"),
                extra={"alert_id": alert.id, "notifier": notifier, "attempts": tried,
                       "error": str(exc)},
            )  # fmt: skip
            async with self.pool.acquire() as conn:
                await conn.execute(
                    RETRY, alert.id, notifier, str(exc)[:500], self.settings.backoff(tried), final
                )
            return
        self.metrics.delivered.labels(notifier).inc()
        async with self.pool.acquire() as conn:
            await conn.execute(DELIVERED, alert.id, notifier)

    async def _gauge(self) -> None:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT notifier, count(*) AS n FROM das.alert_outbox WHERE state = 'pending' "
                "AND notifier = ANY ($1::text[]) GROUP BY notifier",
                list(self.notifiers),
            )
        counts = {r["notifier"]: r["n"] for r in rows}
        for name in self.notifiers:
            self.metrics.pending.labels(name).set(counts.get(name, 0))

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``; a database or notifier fault is logged and retried on the
        next round, never raised (ingestion must not depend on delivery)."""
        try:
            while not stop.is_set():
                try:
                    busy = await self.run_once()
                except (asyncpg.PostgresError, OSError) as exc:
                    log.warning("alert delivery round failed", extra={"error": type(exc).__name__})
                    busy = 0
                if busy < self.settings.batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.settings.interval)
        finally:
            for notifier in self.notifiers.values():
                await notifier.close()
