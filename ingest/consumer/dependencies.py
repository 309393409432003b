"""Whether the worker's dependencies (Kinesis, KMS, PostgreSQL) work right now, as its own calls
see them.

Every call the worker makes to a dependency -- a shard consumer's GetRecords, KMS Decrypt or
commit, the coordinator's and the renewer's lease queries -- is *outstanding* from its first
attempt until it succeeds or is given up, retries with backoff included. A dependency is
unhealthy while one of its calls has been outstanding for longer than ``unready_after``: it has
been failing and retried, or hanging (a stalled connection), for that long. One success ends
that call's outage; a slow but working dependency stays healthy as long as each call finishes
within the grace. Readiness (``/readyz``, ``das_ready``) is false while any dependency is
unhealthy.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DEPENDENCIES = ("kinesis", "kms", "postgres")


@dataclass
class DependencyHealth:
    unready_after: float = 5.0
    clock: Callable[[], float] = time.monotonic
    #: dependency -> call id -> monotonic time of its first attempt
    _outstanding: dict[str, dict[int, float]] = field(default_factory=dict)
    #: dependency -> since when it is unhealthy (as last reported by check())
    _down_since: dict[str, float] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @contextmanager
    def outstanding(self, dependency: str) -> Iterator[None]:
        """``with health.outstanding("kms"): <attempts and retries until success>``"""
        if dependency not in DEPENDENCIES:
            raise ValueError(f"unknown dependency {dependency!r}")
        call = next(self._ids)
        calls = self._outstanding.setdefault(dependency, {})
        calls[call] = self.clock()
        try:
            yield
        finally:
            del calls[call]

    def unhealthy(self) -> list[str]:
        """Dependencies with a call outstanding for longer than ``unready_after``."""
        now = self.clock()
        return [
            dependency
            for dependency in DEPENDENCIES
            if any(
                now - since > self.unready_after
                for since in self._outstanding.get(dependency, {}).values()
            )
        ]

    def oldest(self, dependency: str) -> float | None:
        """Seconds the oldest outstanding call to ``dependency`` has been going on."""
        calls = self._outstanding.get(dependency)
        if not calls:
            return None
        return self.clock() - min(calls.values())

    def check(self) -> list[str]:
        """:meth:`unhealthy`, logging each dependency that turned unhealthy or healthy again
        since the last check (names and durations only)."""
        down = self.unhealthy()
        now = self.clock()
        for dependency in down:
            if dependency not in self._down_since:
                failing = self.oldest(dependency) or 0.0
                self._down_since[dependency] = now - failing
                log.warning(
                    "dependency unhealthy",
                    extra={"dependency": dependency, "elapsed": round(failing, 1)},
                )
        for dependency in list(self._down_since):
            if dependency not in down:
                since = self._down_since.pop(dependency)
                log.info(
                    "dependency healthy again",
                    extra={"dependency": dependency, "elapsed": round(now - since, 1)},
                )
        return down
