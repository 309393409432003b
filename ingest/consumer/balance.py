"""Lease balancing, as a pure plan: which leases to take, and whether to steal one.

Like the KCL's lease taker: a worker's fair share is ceil(eligible leases / live workers)
(capped by ``max_leases``). Short of it, it takes expired or free eligible leases, in random
order so workers starting together do not all race for the same one. Only when none is free
does it steal: one lease of the most loaded other worker, when that worker holds more than the
share, or holds the share while we are short by more than one ((2, 2, 0) with a share of 2 is
not balanced) -- never a lease of a shard it still runs a consumer for (one that lost its lease
and has not ended yet): one consumer per shard and worker. The I/O -- reading the leases,
taking them -- stays with the worker.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from ingest.lease import Lease


@dataclass(frozen=True)
class BalancePlan:
    #: leases to take, in this order (each take may still fail: someone was faster)
    take: list[Lease] = field(default_factory=list)
    #: a lease to steal, and from whom
    steal: Lease | None = None
    victim: str | None = None


def plan_balance(
    eligible: Sequence[tuple[Lease, bool]],
    *,
    me: str,
    live: Collection[str],
    running: Collection[str],
    max_leases: int | None = None,
    rng: random.Random | None = None,
) -> BalancePlan:
    """The plan for worker ``me`` given the eligible leases with whether each has expired,
    the live workers (``me`` counts whether listed or not) and the shards it runs now."""
    choose = rng or random.Random()  # noqa: S311 - spreading workers, not secrets
    workers = max(1, len(set(live) | {me}))
    target = math.ceil(len(eligible) / workers)
    if max_leases is not None:
        target = min(target, max_leases)
    mine = [lease for lease, _ in eligible if lease.owner == me and lease.shard_id in running]
    need = target - len(mine)
    if need <= 0:
        return BalancePlan()
    free = [lease for lease, expired in eligible if expired and lease.shard_id not in running]
    if free:
        choose.shuffle(free)
        return BalancePlan(take=free[:need])
    counts: dict[str, list[Lease]] = {}
    for lease, expired in eligible:
        if not expired and lease.owner and lease.owner != me:
            counts.setdefault(lease.owner, []).append(lease)
    if not counts:
        return BalancePlan()
    victim, theirs = max(counts.items(), key=lambda item: (len(item[1]), item[0]))
    # Never one whose previous consumer of ours is still running (it lost the lease and has
    # not been reaped yet): the worker runs one consumer per shard.
    stealable = [lease for lease in theirs if lease.shard_id not in running]
    if stealable and len(theirs) >= (target if need > 1 else target + 1):
        return BalancePlan(steal=choose.choice(stealable), victim=victim)
    return BalancePlan()
