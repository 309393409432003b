"""What every emulated DB instance shares (pure): the inner record, the statement marker, the
time format, and the instance machinery the engines build on (:mod:`ingest.emulate.traffic` for
the Aurora engines, :mod:`ingest.emulate.rds` for RDS for Oracle and RDS for SQL Server)."""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INNER_TYPE = "DatabaseActivityMonitoringRecord"
MARKER_PREFIX = "das-emulator"


@dataclass(frozen=True, slots=True)
class InnerRecord:
    """The plaintext of one Kinesis record, before gzip and encryption."""

    version: str
    doc: dict[str, Any]
    partition_key: str
    record_events: int
    heartbeats: int

    @property
    def instance_id(self) -> str:
        return str(self.doc["instanceId"])

    @property
    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.doc["databaseActivityEventList"]
        return events


def marker(seed: int, n: int) -> str:
    """The SQL comment that tags statement ``n`` of the traffic generated with ``seed``."""
    return f"/* {MARKER_PREFIX}:{seed}:{n} */"


def format_time(epoch_us: int) -> str:
    """Microseconds since the epoch as DAS writes times: '2019-05-24 00:39:49.940668+00'."""
    seconds, micros = divmod(epoch_us, 1_000_000)
    return f"{_format_seconds(seconds)}.{micros:06d}+00"


@functools.lru_cache(maxsize=64)
def _format_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


class _Counter:
    """Statement marker numbers, shared by all instances of one traffic."""

    def __init__(self) -> None:
        self.value = 0

    def next(self) -> int:
        self.value += 1
        return self.value


class _Instance:
    version: str
    native_fields: bool = False
    #: the paced time the caller re-times events to (µs), when it does: Traffic(wall_clock=...)
    wall_clock: Callable[[], int] | None = None

    def __init__(
        self,
        *,
        cluster_id: str,
        instance_id: str,
        index: int,
        rng: random.Random,
        start_us: int,
        seed: int,
        counter: _Counter,
        pg_version: str,
        writer: bool,
    ) -> None:
        self.cluster_id = cluster_id
        self.writer = writer
        self.instance_id = instance_id
        self.index = index
        self.rng = rng
        self.now_us = start_us
        self.seed = seed
        self.counter = counter
        self.pg_version = pg_version
        self.since_heartbeat = 0
        self.buffer: list[dict[str, Any]] = []
        # Events held back to be emitted after the instance's next statement (late AUX).
        self.deferred: list[dict[str, Any]] = []

    def tick(self, low: int = 1, high: int = 400) -> int:
        """Advance the clock by low..high µs (low >= 1 keeps every logTime unique)."""
        self.now_us += self.rng.randint(low, high)
        return self.now_us

    def marked(self, sql: str) -> str:
        return f"{marker(self.seed, self.counter.next())} {sql}"

    def take(self, n: int) -> list[dict[str, Any]]:
        while len(self.buffer) < n:
            group, late = self.next_group()
            self.buffer.extend(group)
            if self.deferred:
                self.buffer.extend(self.deferred)
                self.deferred = []
            self.deferred.extend(late)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def next_group(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The next events in emission order, and events to emit after the next group."""
        raise NotImplementedError

    def record(self, events: list[dict[str, Any]]) -> InnerRecord:
        doc = {
            "type": INNER_TYPE,
            "clusterId": self.cluster_id,
            "instanceId": self.instance_id,
            "databaseActivityEventList": events,
        }
        return InnerRecord(self.version, doc, self.instance_id, len(events), 0)

    def heartbeat_record(self) -> InnerRecord:
        # An idle spell: nothing to report for a few seconds, then a sign of life.
        self.tick(1_000_000, 5_000_000)
        heartbeat = {"type": "heartbeat", "logTime": format_time(self.now_us)}
        doc = {
            "type": INNER_TYPE,
            "clusterId": self.cluster_id,
            "instanceId": self.instance_id,
            "databaseActivityEventList": [heartbeat],
        }
        return InnerRecord(self.version, doc, self.instance_id, 0, 1)

    def client_ip(self) -> str:
        return f"10.{self.rng.randint(0, 3)}.{self.rng.randint(0, 255)}.{self.rng.randint(2, 254)}"

    def port(self) -> str:
        return str(self.rng.randint(1024, 65535))
