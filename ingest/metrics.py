"""Prometheus metrics of the ingester, by Prometheus's conventions: names prefixed ``das_``,
base units (seconds, bytes) in the names, a ``stream`` label on every per-shard series (shard ids
repeat across streams), ``das_build_info``, and the process metrics. No label carries SQL or keys.
"""

from __future__ import annotations

import contextlib
import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ingest import __version__


class Metrics:
    """One registry per worker, so tests can run several workers in one process.

    ``stream`` is the Kinesis stream the worker consumes: the value of the ``stream`` label of
    its per-shard and per-stream series.
    """

    def __init__(self, stream: str = "") -> None:
        self.stream = stream
        r = self.registry = CollectorRegistry()
        # process_* (CPU seconds, resident memory, open fds, start time) and python_info.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "das_build_info",
            "Always 1; the labels say which das-ingest runs",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.events = Counter(
            "das_events_ingested", "Events committed to the warehouse", registry=r
        )
        self.records = Counter(
            "das_records_ingested",
            "Kinesis records committed (events, heartbeats or dead letters)",
            registry=r,
        )
        self.heartbeats = Counter("das_heartbeats", "Heartbeat events seen", registry=r)
        self.batches = Counter(
            "das_batches_committed", "Batches committed", ["stream", "shard"], registry=r
        )
        self.dead_letters = Counter(
            "das_dead_letters", "Records sent to the dead-letter table", ["stage"], registry=r
        )
        self.lag = Gauge(
            "das_shard_lag_seconds",
            "How far the shard's reader is behind the stream's tip (MillisBehindLatest of the "
            "last GetRecords, in seconds)",
            ["stream", "shard"],
            registry=r,
        )
        # From the warehouse, refreshed when scraped (see ingest.warehouse.gauges): every worker
        # of a stream reports the same values, so aggregate them with max().
        self.shards = Gauge(
            "das_stream_shards",
            "Shards of the stream known to the lease table, by state (open: not finished)",
            ["stream", "state"],
            registry=r,
        )
        self.unanchored_age = Gauge(
            "das_chain_unanchored_age_seconds",
            "Age of the oldest chain link of the stream that no anchor covers yet (0: none)",
            ["stream"],
            registry=r,
        )
        self.verify_exit_code = Gauge(
            "das_verify_last_exit_code",
            "Exit code of the last `das-ingest verify` of the stream (0 clean, 1 findings, "
            "3 anchors unchecked); absent until one ran",
            ["stream"],
            registry=r,
        )
        self.verify_findings = Gauge(
            "das_verify_last_findings",
            "Findings of the last `das-ingest verify` of the stream",
            ["stream"],
            registry=r,
        )
        self.verify_time = Gauge(
            "das_verify_last_run_timestamp_seconds",
            "When the last `das-ingest verify` of the stream finished (Unix time)",
            ["stream"],
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

    def observe_lag(self, shard_id: str, millis_behind: int) -> None:
        self.lag.labels(self.stream, shard_id).set(millis_behind / 1000)

    def count_batch(self, shard_id: str) -> None:
        self.batches.labels(self.stream, shard_id).inc()

    def forget_shard(self, shard_id: str) -> None:
        """Drop per-shard series of a shard this worker no longer holds."""
        with contextlib.suppress(KeyError):
            self.lag.remove(self.stream, shard_id)
