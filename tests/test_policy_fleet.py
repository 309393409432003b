"""Every built-in rule's ground truth through a fleet of live ``das-ingest run`` workers.

One 2-shard stream carries every event incident of ingest/emulate/scenarios.py at once, on
both instances (their actors differ, so their ground truths are disjoint) inside normal
traffic; two workers read it, one is SIGKILLed mid-ingest (it has committed part of a shard,
not all of it), a third starts. Each rule must fire exactly its expected alerts (rule, group
key, severity, count), once, name no incident actor in any other alert, and the webhook must
receive every alert exactly once.
``stream-stopped`` runs through live workers too: one instance's heartbeats stop, and
``heartbeat_gap`` raises one alert for it (none for the instance still sending), also after the
worker that raised it is SIGKILLed and another takes its shards over.

It also carries the brute-force fleet test this file replaced: a drop rule removes Aurora's
rdsadmin noise (counted in the chain links), statements get fingerprints, `verify` is clean.

The background traffic raises alerts of its own (measured by ``python -m bench.policy_fp``);
these tests depend only on the incidents' ground truth, not on how many those are.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from ingest.checkpoint import is_after
from ingest.emulate.scenarios import ATTACKER_HOST, SCENARIOS, SPRAY_HOST, scenario
from ingest.emulate.traffic import Traffic
from ingest.integrity.verify import verify_warehouse
from tests.fleet import Fleet, migrated, new_stream, options, produce, wait_until

pytestmark = pytest.mark.usefixtures("aws_env")

EVENT_SCENARIOS = ",".join(s for s in SCENARIOS if s != "stream-stopped")
#: The incidents' own actors: no alert but the expected ones may name them.
ACTORS = re.compile(
    rf"user=(intruder|exfil|night_owl|user\d\d)\b|{re.escape(ATTACKER_HOST)}|"
    rf"{re.escape(SPRAY_HOST)}"
)
SEED = 7
#: Aurora's own monitoring statements, dropped (and counted in the chain links).
NOISE_RULES = """
rules:
  - name: rdsadmin_noise
    where: {user: rdsadmin}
    action: drop
"""
COUNT = 8000  # 400 s of log time: the incidents are 305 s in


class Webhook:
    """A local notifier: every POST it receives, in order."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.url = ""

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(status=200)


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/hook", hook._hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hook.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield hook
    finally:
        await runner.cleanup()


async def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def leases(dsn: str, stream: str) -> dict[str, tuple[str | None, str]]:
    """shard -> (owner, checkpoint)."""
    rows = await fetch(
        dsn, "SELECT shard_id, owner, checkpoint FROM das.leases WHERE stream_name = $1", stream
    )
    return {r["shard_id"]: (r["owner"], r["checkpoint"]) for r in rows}


async def stored_events(dsn: str) -> int:
    return int((await fetch(dsn, "SELECT count(*) AS n FROM das.activity_events"))[0]["n"])


def committed(checkpoint: str) -> bool:
    return checkpoint.isdigit()


async def test_every_event_rule_fires_once_on_its_incident_across_a_fleet_with_a_sigkill(
    pg_dsn: str, fleet: Fleet, webhook: Webhook, tmp_path: Path
) -> None:
    await migrated(pg_dsn)
    stream = new_stream()
    opts = options(stream, scenario=EVENT_SCENARIOS, count=COUNT, shards=2, instances=2,
                   seed=SEED)  # fmt: skip
    records, truth = scenario(EVENT_SCENARIOS, SEED, count=COUNT, cluster_id=opts.resource_id)
    events = [e for r in records for e in r.events if e.get("type") == "record"]
    noise = sum(1 for e in events if e.get("dbUserName") == "rdsadmin")
    assert noise > 0
    total = len(events) - noise  # what is stored
    rules = tmp_path / "rules.yaml"
    rules.write_text(NOISE_RULES)
    instances = Traffic(SEED, "postgres", instances=2).instance_ids
    # heartbeat_gap is on with its default: the emulated clock is days old, so once a shard is
    # read to the tip its instance has been silent for days (one alert each, whoever reads it).
    expected = sorted(
        [(e.rule, e.group_key, e.severity) for e in truth]
        + [("heartbeat_gap", f"instance={i}", "high") for i in instances]
    )
    assert len({(rule, key) for rule, key, _ in expected}) == len(expected) == 10
    await produce(opts)
    extra = ("--rules", str(rules), "--notify", f"webhook={webhook.url}", "--processes", "1",
             "--max-records", "25")  # fmt: skip  # small pages: many commits per shard

    victim = await fleet.start("victim", stream, pg_dsn, *extra)
    survivor = await fleet.start("survivor", stream, pg_dsn, *extra)

    async def victim_committed() -> bool:
        held = await leases(pg_dsn, stream)
        return any(owner == "victim" and committed(cp) for owner, cp in held.values())

    await wait_until(victim_committed, deadline=60, interval=0.05)
    victim.kill()
    await victim.process.wait()
    # What the victim left: its checkpoints (it cannot move them any more), and the events
    # stored so far, not all of them.
    left = {s: cp for s, (owner, cp) in (await leases(pg_dsn, stream)).items() if owner == "victim"}
    at_kill = await stored_events(pg_dsn)
    assert any(committed(cp) for cp in left.values()), left
    assert 0 < at_kill < total, (at_kill, total)
    restarted = await fleet.start("restarted", stream, pg_dsn, *extra)

    async def all_stored() -> bool:
        return await stored_events(pg_dsn) >= total

    await wait_until(all_stored, deadline=90)

    async def gaps_raised() -> bool:
        rows = await fetch(pg_dsn, "SELECT count(*) AS n FROM das.alerts WHERE rule = $1",
                           "heartbeat_gap")  # fmt: skip
        return int(rows[0]["n"]) >= len(instances)

    await wait_until(gaps_raised, deadline=30)
    ids = {r["id"] for r in await fetch(pg_dsn, "SELECT id FROM das.alerts")}

    async def delivered() -> bool:
        return ids <= {a["id"] for a in webhook.received}

    await wait_until(delivered, deadline=30)
    await asyncio.sleep(6)  # another round of every worker: nothing more may arrive
    for worker in (survivor, restarted):
        worker.terminate()
    assert [await w.wait(30) for w in (survivor, restarted)] == [0, 0]

    # The kill was mid-ingest: another worker carried each shard on from the victim's
    # checkpoint to its end.
    final = await leases(pg_dsn, stream)
    for shard in left:
        owner, now = final[shard]
        assert owner != "victim"
        assert committed(now)
    carried_on = [s for s, cp in left.items() if committed(cp) and is_after(final[s][1], cp)]
    assert carried_on, (left, final)
    # Every event stored once, but the dropped noise, which the chain links counted.
    assert await stored_events(pg_dsn) == total
    stored = await fetch(
        pg_dsn,
        "SELECT (SELECT count(*) FROM das.activity_events WHERE db_user_name = 'rdsadmin') AS "
        "admin, (SELECT coalesce(sum(events), 0) FROM das.dropped_events WHERE rule = "
        "'rdsadmin_noise') AS dropped, (SELECT count(*) FROM das.activity_events WHERE "
        "fingerprint IS NOT NULL) AS fingerprinted",
    )
    assert (stored[0]["admin"], stored[0]["dropped"]) == (0, noise)
    assert stored[0]["fingerprinted"] > 0

    alerts = await fetch(
        pg_dsn,
        "SELECT id, rule, group_key, severity, event_count FROM das.alerts ORDER BY id",
    )
    got = sorted((a["rule"], a["group_key"], a["severity"]) for a in alerts
                 if (a["rule"], a["group_key"], a["severity"]) in expected)  # fmt: skip
    # Every expected alert, each exactly once (one row per incident group, in any window)...
    assert got == expected
    counts = {(a["rule"], a["group_key"]): a["event_count"] for a in alerts}
    for e in truth:
        # ...counting the incident's events (a threshold's window may also hold a background
        # failed login of the same user)
        assert e.count <= counts[(e.rule, e.group_key)] <= e.count + 2, e
    # ...and no other alert names an incident's actor: each rule is silent on the others.
    others = [(a["rule"], a["group_key"]) for a in alerts
              if (a["rule"], a["group_key"], a["severity"]) not in expected]  # fmt: skip
    assert not [o for o in others if ACTORS.search(o[1])]
    assert not [o for o in others if o[0] == "heartbeat_gap"]

    # Delivered once each, with its one idempotency key; the outbox agrees.
    delivered_ids = Counter(a["id"] for a in webhook.received)
    assert set(delivered_ids) == {a["id"] for a in alerts}
    assert set(delivered_ids.values()) == {1}
    assert len({a["idempotency_key"] for a in webhook.received}) == len(alerts)
    outbox = await fetch(pg_dsn, "SELECT state, attempts FROM das.alert_outbox")
    assert len(outbox) == len(alerts)
    assert {(r["state"], r["attempts"]) for r in outbox} == {("delivered", 1)}
    conn = await asyncpg.connect(pg_dsn)
    try:
        report = await verify_warehouse(conn, kms=None)
    finally:
        await conn.close()
    assert report.clean, report.findings
    assert report.alerts == len(alerts)


GAP_RULES = """
builtins:
  heartbeat_gap: {gap: 3m}
"""
GAP_COUNT = 14_000  # 700 s of log time


async def test_a_stopped_stream_raises_one_heartbeat_gap_also_after_a_takeover(
    pg_dsn: str, fleet: Fleet, tmp_path: Path
) -> None:
    await migrated(pg_dsn)
    rules = tmp_path / "rules.yaml"
    rules.write_text(GAP_RULES)
    stream = new_stream()
    # A live stream: its 700 s of log time end now. The last instance stops 305 s in, so it
    # has been silent for about 400 s (of stream time and of wall clock); its sibling sends
    # until the end, so it stays within the 3 min gap for as long as this test runs.
    start = datetime.now(UTC) - timedelta(seconds=GAP_COUNT / 20)
    opts = options(stream, scenario="stream-stopped", count=GAP_COUNT, shards=2, instances=2,
                   seed=SEED, start=start)  # fmt: skip
    _, truth = scenario("stream-stopped", SEED, count=100)
    instances = Traffic(SEED, "postgres", instances=2).instance_ids
    assert [(e.rule, e.group_key) for e in truth] == [
        ("heartbeat_gap", f"instance={instances[-1]}")
    ]
    await produce(opts)
    extra = ("--rules", str(rules), "--processes", "1", "--log-level", "debug")
    # Small pages: several rounds of the health check while the shards are still being read,
    # when an instance's last stored heartbeat is not its last one.
    first = await fleet.start("first", stream, pg_dsn, *extra, "--max-records", "25")

    async def gaps() -> list[asyncpg.Record]:
        return await fetch(
            pg_dsn,
            "SELECT group_key, severity, instance_id, window_start FROM das.alerts "
            "WHERE rule = 'heartbeat_gap'",
        )

    async def raised() -> bool:
        return bool(await gaps())

    await wait_until(raised, deadline=60)
    alert = await gaps()
    assert [(a["group_key"], a["severity"], a["instance_id"]) for a in alert] == [
        (f"instance={instances[-1]}", "high", instances[-1])
    ]
    # Another worker takes the shards over from a SIGKILLed one, and judges the same silence.
    second = await fleet.start("second", stream, pg_dsn, *extra)
    first.kill()
    await first.process.wait()

    async def judged_twice_with_every_shard() -> bool:
        held = await leases(pg_dsn, stream)
        checks = [e for e in second.logged("stream health checked") if e.get("shards") == 2]
        return all(owner == "second" for owner, _ in held.values()) and len(checks) >= 2

    await wait_until(judged_twice_with_every_shard, deadline=60)
    second.terminate()
    assert await second.wait(30) == 0
    # The same one alert: none for the instance still sending, none more for the silent one.
    assert await gaps() == alert


async def test_two_workers_committing_halves_of_an_incident_at_once_raise_its_alert(
    pg_dsn: str,
) -> None:
    """Two instances of a cluster (two shards, two workers) each see part of a brute force in
    the same window, and commit at the same moment: the second transaction must count the
    first's failures, or neither reaches the threshold and the alert is lost for good."""
    from ingest.alerts.store import record_policy
    from ingest.policy.evaluate import Policy
    from ingest.policy.rules import load_rules
    from tests.test_alerts_store import evaluate, failed_login

    await migrated(pg_dsn)
    policy = Policy(load_rules(None))
    # 3 failures in the window's first bucket on one shard, 2 in later buckets on the other.
    first = evaluate(policy, [failed_login("mallory", s) for s in (0, 2, 4)])
    second = evaluate(policy, [failed_login("mallory", s) for s in (20, 30)], first_seq=10)
    a = await asyncpg.connect(pg_dsn)
    b = await asyncpg.connect(pg_dsn)
    try:
        tx = a.transaction()
        await tx.start()
        assert await record_policy(a, first, policy.rules, "stream-A", "shardId-0") == []

        async def other_worker() -> list[int]:
            async with b.transaction():
                return await record_policy(b, second, policy.rules, "stream-A", "shardId-1")

        concurrent = asyncio.ensure_future(other_worker())
        await asyncio.sleep(0.5)  # the other worker's batch reaches its policy state meanwhile
        await tx.commit()
        raised = await asyncio.wait_for(concurrent, 30)
        rows = await a.fetch("SELECT rule, group_key, event_count FROM das.alerts ORDER BY id")
    finally:
        await a.close()
        await b.close()
    assert len(raised) == 2
    assert sorted((r["rule"], r["group_key"], r["event_count"]) for r in rows) == [
        ("brute_force_login", "remote_host=10.1.2.3", 5),
        ("brute_force_login", "user=mallory", 5),
    ]


async def test_an_incident_across_a_window_boundary_alerts_once_however_it_is_batched(
    pg_dsn: str,
) -> None:
    """20 failed logins from 12:00:50 to 12:01:09: one alert per group whether one batch holds
    them or a crash, a takeover or a page size splits them (a worker that takes a shard over
    re-reads its records in batches of its own)."""
    from ingest.alerts.store import record_policy
    from ingest.policy.evaluate import Policy
    from ingest.policy.rules import load_rules
    from tests.test_alerts_store import NOON, evaluate, failed_login

    await migrated(pg_dsn)
    policy = Policy(load_rules(None))
    seconds = list(range(50, 70))
    conn = await asyncpg.connect(pg_dsn)
    try:
        for split in (None, 53, 60, 63, 66):
            await conn.execute(
                "TRUNCATE das.alerts, das.alert_outbox, das.alert_acks, das.policy_counters"
            )
            parts = [seconds] if split is None else [seconds[: split - 50], seconds[split - 50 :]]
            for n, part in enumerate(parts):
                events = [failed_login("mallory", s) for s in part]
                out = evaluate(policy, events, first_seq=100 * n)
                async with conn.transaction():
                    await record_policy(conn, out, policy.rules, "stream-A", "shardId-0")
            rows = await conn.fetch("SELECT group_key, window_start FROM das.alerts ORDER BY 1")
            assert [(r["group_key"], r["window_start"]) for r in rows] == [
                ("remote_host=10.1.2.3", NOON),
                ("user=mallory", NOON),
            ], split
    finally:
        await conn.close()
