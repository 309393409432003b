"""The lease balance planner, table-driven: joiners, leavers, uneven shards, expired leases."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ingest.consumer.balance import BalancePlan, plan_balance
from ingest.lease import Lease


def lease(shard: int, owner: str | None) -> Lease:
    return Lease("s", f"shard-{shard}", owner, 1, None, "TRIM_HORIZON", ())


def fleet(owners: str) -> list[tuple[Lease, bool]]:
    """One lease per character: a letter is a live owner's unexpired lease, a capital letter
    that owner's expired lease, ``.`` a free lease (never taken, or released)."""
    out = []
    for n, c in enumerate(owners):
        if c == ".":
            out.append((lease(n, None), True))
        else:
            out.append((lease(n, c.lower()), c.isupper()))
    return out


# me is always "a"; "running" are the shards of a's unexpired leases.
CASES = [
    # (name, leases, live workers, max_leases, how many to take, steal from whom)
    ("alone, everything free", "....", "a", None, 4, None),
    ("alone, holding everything", "aaaa", "a", None, 0, None),
    ("two workers, nothing taken yet", "....", "ab", None, 2, None),
    ("uneven shards round up: 5 over 2", ".....", "ab", None, 3, None),
    ("max_leases caps the share", "......", "a", 2, 2, None),
    ("a leaver's expired leases are taken", "aaBB", "a", None, 2, None),
    ("a leaver's leases, shared with a survivor", "aBBBcc", "ac", None, 2, None),
    ("balanced: take nothing", "aabb", "ab", None, 0, None),
    ("a joiner steals from the most loaded", "bbbb", "ab", None, 0, "b"),
    ("a joiner steals from the most loaded of two", "bbbcc", "abc", None, 0, "b"),
    ("(2, 2, 0) with a share of 2 is not balanced", "bbcc", "abc", None, 0, "c"),
    ("(2, 2, 1) with a share of 2 is balanced enough", "aabbc", "abc", None, 0, None),
    ("short by one, the most loaded at the share: no steal", "abbcc", "abc", None, 0, None),
    ("free leases first: no steal while one is free", "bbb.", "ab", None, 1, None),
    ("a leaver's unexpired leases wait for their expiry", "aabb", "a", None, 0, None),
]


@pytest.mark.parametrize(
    ("leases", "live", "max_leases", "takes", "victim"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan(
    leases: str, live: str, max_leases: int | None, takes: int, victim: str | None
) -> None:
    eligible = fleet(leases)
    running = {lease.shard_id for lease, expired in eligible if lease.owner == "a"}
    running -= {lease.shard_id for lease, expired in eligible if expired}
    plan = plan_balance(
        eligible,
        me="a",
        live=list(live),
        running=running,
        max_leases=max_leases,
        rng=random.Random(7),
    )
    assert len(plan.take) == takes
    taken = {lease.shard_id for lease in plan.take}
    assert len(taken) == takes  # no lease twice
    free = {lease.shard_id for lease, expired in eligible if expired}
    assert taken <= free - running  # only expired or free leases, never one we run
    assert plan.victim == victim
    if victim is None:
        assert plan.steal is None
    else:
        assert plan.steal is not None
        assert plan.steal.owner == victim
        assert not plan.take  # steal only when nothing is free


def test_a_lease_we_hold_but_do_not_run_counts_as_free_when_expired() -> None:
    # Our own expired lease (a consumer that ended) is taken again like any other.
    eligible = [(lease(0, "a"), True), (lease(1, "b"), False)]
    plan = plan_balance(eligible, me="a", live=["a", "b"], running=set())
    assert [lease.shard_id for lease in plan.take] == ["shard-0"]


def test_nothing_eligible_means_nothing_to_do() -> None:
    assert plan_balance([], me="a", live=["a", "b"], running=set()) == BalancePlan()


def test_free_leases_are_taken_in_random_order_so_starting_workers_spread() -> None:
    eligible = fleet("........")
    firsts = Counter(
        plan_balance(eligible, me="a", live="ab", running=set(), rng=random.Random(seed))
        .take[0]
        .shard_id
        for seed in range(200)
    )
    assert len(firsts) == 8  # every lease comes first sometimes


def test_the_stolen_lease_is_one_of_the_victims_chosen_at_random() -> None:
    eligible = fleet("bbbb")
    stolen = {
        plan.steal.shard_id
        for seed in range(50)
        if (
            plan := plan_balance(
                eligible, me="a", live="ab", running=set(), rng=random.Random(seed)
            )
        ).steal
        is not None
    }
    assert len(stolen) > 1


def test_a_shard_whose_lost_consumer_still_runs_is_never_stolen_back() -> None:
    # "a" lost shard-0 to "b" (its consumer is still ending, not reaped yet) and is short by
    # one: it may steal shard-1, never shard-0 -- the worker would start a second consumer of
    # the shard and drop the first one, uncounted.
    eligible = fleet("bb")
    stolen = {
        plan.steal.shard_id
        for seed in range(50)
        if (
            plan := plan_balance(
                eligible, me="a", live="ab", running={"shard-0"}, rng=random.Random(seed)
            )
        ).steal
        is not None
    }
    assert stolen == {"shard-1"}


def test_no_steal_when_every_lease_of_the_victim_is_a_shard_we_still_run() -> None:
    eligible = fleet("bbbb")
    running = {"shard-0", "shard-1", "shard-2", "shard-3"}
    assert plan_balance(eligible, me="a", live="ab", running=running) == BalancePlan()
