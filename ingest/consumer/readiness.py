"""Whether the worker is ready (``/readyz``, ``das_ready``), and the log of its changes.

Ready when the coordinator's cycles work (none yet, or failing for longer than
``unready_after``, is not ready; one failed cycle, say a connection reset, is retried at once
and is no outage), no dependency is unhealthy (a call to Kinesis, KMS or PostgreSQL failing or
hanging for longer than ``unready_after``: see DependencyHealth), and the worker is not
stopping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ingest.consumer.dependencies import DEPENDENCIES, DependencyHealth
from ingest.metrics import Metrics

log = logging.getLogger("ingest.consumer.worker")


class Readiness:
    def __init__(
        self,
        health: DependencyHealth,
        metrics: Metrics,
        *,
        unready_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self._metrics = metrics
        self._unready_after = unready_after
        self._clock = clock
        self._cycled = False
        self._failing_since: float | None = None
        self._was_ready = False
        self.stopping = False

    def cycle_worked(self) -> None:
        self._cycled = True
        self._failing_since = None

    def cycle_failed(self) -> None:
        if self._failing_since is None:
            self._failing_since = self._clock()

    def coordinating(self) -> bool:
        """A cycle has worked, and cycles have not been failing for longer than the grace."""
        if not self._cycled:
            return False
        failing = self._failing_since
        return failing is None or self._clock() - failing <= self._unready_after

    @property
    def ready(self) -> bool:
        return self.coordinating() and not self.stopping and not self.health.unhealthy()

    def publish(self) -> None:
        """Update the dependency gauges and log a change of readiness with its reasons."""
        down = self.health.check()
        for dependency in DEPENDENCIES:
            self._metrics.dependency_healthy.labels(dependency).set(0 if dependency in down else 1)
        coordinating = self.coordinating()
        ready = coordinating and not self.stopping and not down
        if ready == self._was_ready:
            return
        self._was_ready = ready
        if ready:
            log.info("ready")
            return
        reasons = [*down]
        if not coordinating:
            reasons.append("coordinator")
        if self.stopping:
            reasons.append("stopping")
        log.warning("not ready", extra={"reasons": reasons})
