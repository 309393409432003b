"""The worker's parts apart from it: the lease renewer and readiness (fakes, no servers)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from ingest.consumer.dependencies import DependencyHealth
from ingest.consumer.readiness import Readiness
from ingest.consumer.renewer import LeaseRenewer
from ingest.metrics import Metrics

# -- the renewer -------------------------------------------------------------------------------


@dataclass
class FakeConsumer:
    counter: int
    ended: bool = False
    lost: bool = False
    told: int = 0

    def lose(self) -> None:
        self.lost = True
        self.told += 1


@dataclass
class FakeStore:
    live: list[str] = field(default_factory=lambda: ["a", "b"])
    #: shard ids the database renews (the others changed hands)
    renews: set[str] = field(default_factory=set)
    heartbeats: list[tuple[str, bool]] = field(default_factory=list)
    renewed: list[dict[str, int]] = field(default_factory=list)

    async def heartbeat_worker(self, worker_id: str, *, ready: bool) -> list[str]:
        self.heartbeats.append((worker_id, ready))
        return self.live

    async def renew(self, owner: str, held: dict[str, int]) -> set[str]:
        assert owner == "a"
        self.renewed.append(dict(held))
        return {s for s in held if s in self.renews}


def renewer(store: FakeStore, running: dict[str, FakeConsumer]) -> LeaseRenewer:
    return LeaseRenewer(
        store,
        worker_id="a",
        lease_seconds=10.0,
        health=DependencyHealth(),
        held=lambda: running,
        ready=lambda: True,
    )


async def test_renewal_heartbeats_and_renews_what_runs() -> None:
    running = {"s1": FakeConsumer(3), "s2": FakeConsumer(5), "done": FakeConsumer(1, ended=True)}
    store = FakeStore(renews={"s1", "s2"})
    r = renewer(store, running)
    assert not r.heartbeat_done.is_set()
    await r.renew()
    assert store.heartbeats == [("a", True)]
    assert store.renewed == [{"s1": 3, "s2": 5}]  # not the consumer that ended
    assert r.live == ["a", "b"]
    assert r.heartbeat_done.is_set()
    assert not any(c.lost for c in running.values())


async def test_a_lease_not_renewed_is_lost_and_its_consumer_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    running = {"s1": FakeConsumer(3), "s2": FakeConsumer(5)}
    store = FakeStore(renews={"s1"})
    r = renewer(store, running)
    await r.renew()  # the first renewal: more than a lease period since "the last one"
    assert running["s2"].lost
    assert not running["s1"].lost
    (entry,) = [e for e in caplog.records if e.getMessage() == "lease lost at renewal"]
    assert entry.levelno == logging.WARNING
    assert entry.__dict__["reason"] == "expired"
    # Within the lease period, a lease that moved was stolen to balance the fleet: routine.
    caplog.clear()
    running["s3"] = FakeConsumer(7)
    await r.renew()
    (entry,) = [
        e
        for e in caplog.records
        if e.getMessage() == "lease lost at renewal" and e.__dict__["shard"] == "s3"
    ]
    assert entry.levelno == logging.INFO
    assert entry.__dict__["reason"] == "taken by another worker (balancing)"
    # A consumer already told is told again (idempotent) but not logged again.
    assert running["s2"].told == 2
    assert not [e for e in caplog.records if e.__dict__.get("shard") == "s2"]


async def test_a_lease_released_or_retaken_meanwhile_is_no_loss() -> None:
    running = {"s1": FakeConsumer(3)}
    store = FakeStore(renews=set())

    async def renew_and_retake(owner: str, held: dict[str, int]) -> set[str]:
        running["s1"] = FakeConsumer(4)  # released, taken again at a new counter
        return set()

    store.renew = renew_and_retake  # type: ignore[method-assign]
    await renewer(store, running).renew()
    assert not running["s1"].lost


# -- readiness ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def readiness() -> tuple[Readiness, DependencyHealth, Clock, Metrics]:
    clock = Clock()
    health = DependencyHealth(unready_after=5.0, clock=clock)
    metrics = Metrics()
    return Readiness(health, metrics, unready_after=5.0, clock=clock), health, clock, metrics


def is_ready(r: Readiness) -> bool:
    """r.ready, read afresh (mypy would narrow the property between two asserts)."""
    return r.ready


def test_not_ready_until_a_cycle_works() -> None:
    r, _, _, _ = readiness()
    assert not is_ready(r)
    r.cycle_worked()
    assert is_ready(r)


def test_one_failed_cycle_is_no_outage_but_failing_longer_than_the_grace_is() -> None:
    r, _, clock, _ = readiness()
    r.cycle_worked()
    r.cycle_failed()
    clock.now += 4.0
    r.cycle_failed()  # still failing: the outage counts from the first failure
    assert is_ready(r)
    clock.now += 2.0
    assert not is_ready(r)
    r.cycle_worked()
    assert is_ready(r)


def test_an_unhealthy_dependency_or_a_stop_makes_it_unready() -> None:
    r, health, clock, metrics = readiness()
    r.cycle_worked()
    with health.outstanding("kms"):
        clock.now += 6.0
        assert not is_ready(r)
        r.publish()
        assert (
            metrics.registry.get_sample_value("das_dependency_healthy", {"dependency": "kms"}) == 0
        )
    assert is_ready(r)
    r.stopping = True
    assert not is_ready(r)


def test_changes_are_logged_once_with_their_reasons(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r, _, clock, _ = readiness()
    r.cycle_worked()
    r.publish()
    r.publish()
    assert [e.getMessage() for e in caplog.records] == ["ready"]
    r.cycle_failed()
    clock.now += 6.0
    r.stopping = True
    r.publish()
    r.publish()
    messages = [(e.getMessage(), e.__dict__.get("reasons")) for e in caplog.records]
    assert messages == [("ready", None), ("not ready", ["coordinator", "stopping"])]
