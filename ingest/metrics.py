"""Prometheus metrics of the ingester. Names are prefixed ``das_``; no label carries SQL or keys."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per worker, so tests can run several workers in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter(
            "das_events_ingested", "Events committed to the warehouse", registry=r
        )
        self.records = Counter(
            "das_records_ingested",
            "Kinesis records committed (events, heartbeats or dead letters)",
            registry=r,
        )
        self.heartbeats = Counter("das_heartbeats", "Heartbeat events seen", registry=r)
        self.batches = Counter("das_batches_committed", "Batches committed", ["shard"], registry=r)
        self.dead_letters = Counter(
            "das_dead_letters", "Records sent to the dead-letter table", ["stage"], registry=r
        )
        self.lag_ms = Gauge(
            "das_shard_lag_milliseconds",
            "MillisBehindLatest of the last GetRecords",
            ["shard"],
            registry=r,
        )
        self.queue_batches = Gauge(
            "das_queue_batches", "Batches waiting for or in the decode pool", registry=r
        )
        self.queue_bytes = Gauge(
            "das_queue_bytes", "Bytes waiting for or in the decode pool", registry=r
        )
        self.kms_calls = Counter("das_kms_calls", "KMS Decrypt calls", registry=r)
        self.kms_hits = Counter("das_kms_cache_hits", "Data keys served from the cache", registry=r)
        self.kms_refused = Counter(
            "das_kms_refused",
            "Data keys refused for good: by a KMS call (answered_by=kms, once per data key and "
            "context), or from the memory of that refusal (answered_by=cache, per record)",
            ["answered_by"],
            registry=r,
        )
        self.lease_changes = Counter(
            "das_lease_changes",
            "Lease changes: taken, stolen, lost (to another worker), released (given back: "
            "graceful stop, shard end, crash), crashed (consumer), finished (shard end)",
            ["change"],
            registry=r,
        )
        self.leases_held = Gauge("das_leases_held", "Leases this worker holds", registry=r)
        self.retries = Counter(
            "das_transient_retries", "Transient faults retried with backoff", ["target"], registry=r
        )
        self.commit_seconds = Histogram(
            "das_commit_seconds",
            "Duration of a batch transaction",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.anchors = Counter("das_chain_anchors", "Chain heads anchored with KMS", registry=r)
        self.ready = Gauge("das_ready", "1 when the worker is ready (see /readyz)", registry=r)
        self.dependency_healthy = Gauge(
            "das_dependency_healthy",
            "0 while a call to the dependency has been failing or hanging for a few seconds",
            ["dependency"],
            registry=r,
        )

    def lease_change_counts(self) -> dict[str, int]:
        """Lease changes so far by kind (for the summary a worker logs when it stops)."""
        return {
            sample.labels["change"]: int(sample.value)
            for family in self.lease_changes.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        }

    def forget_shard(self, shard_id: str) -> None:
        """Drop per-shard series of a shard this worker no longer holds."""
        with contextlib.suppress(KeyError):
            self.lag_ms.remove(shard_id)
