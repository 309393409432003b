"""Policies end to end: an emulated brute force through Kinesis, KMS and a fleet of real
workers (one SIGKILLed mid-way), into the warehouse and out to a webhook."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from das_dev.devstack import LocalStack
from ingest.emulate.scenarios import ATTACKER_HOST, scenario
from ingest.integrity.verify import verify_warehouse
from tests.fleet import Fleet, migrated, new_stream, options, produce, wait_until

RULES = """
rules:
  - name: rdsadmin_noise
    where: {user: rdsadmin}
    action: drop
"""


async def test_a_brute_force_through_a_fleet_alerts_once_and_is_delivered(
    stack: LocalStack,
    aws_env: dict[str, str],
    pg_dsn: str,
    fleet: Fleet,
    tmp_path: Path,
) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    try:
        await migrated(pg_dsn)
        stream = new_stream()
        opts = options(stream, scenario="brute-force", count=4000, shards=2, instances=2)
        records, _ = scenario("brute-force", opts.seed, count=4000, cluster_id=opts.resource_id)
        events = [e for r in records for e in r.events if e.get("type") == "record"]
        noise = sum(1 for e in events if e.get("dbUserName") == "rdsadmin")
        assert noise > 0
        extra = ("--rules", str(rules), "--notify", f"webhook=http://127.0.0.1:{port}/hook",
                 "--processes", "1")  # fmt: skip
        victim = await fleet.start("victim", stream, pg_dsn, *extra)
        survivor = await fleet.start("survivor", stream, pg_dsn, *extra)
        await produce(opts)

        async def stored(n: int) -> bool:
            conn = await asyncpg.connect(pg_dsn)
            try:
                count = await conn.fetchval("SELECT count(*) FROM das.activity_events")
            finally:
                await conn.close()
            return int(count) >= n

        await wait_until(lambda: stored(500), deadline=90)
        victim.kill()  # SIGKILL mid-stream: its shards are taken over and re-read
        await victim.process.wait()
        restarted = await fleet.start("restarted", stream, pg_dsn, *extra)
        await wait_until(lambda: stored(len(events) - noise), deadline=180)

        async def delivered() -> bool:
            return sum(1 for a in received if a["rule"] == "brute_force_login") >= 2

        await wait_until(delivered, deadline=60)
        for worker in (survivor, restarted):
            worker.terminate()
        assert [await w.wait(30) for w in (survivor, restarted)] == [0, 0]
        conn = await asyncpg.connect(pg_dsn)
        try:
            total = await conn.fetchval("SELECT count(*) FROM das.activity_events")
            admin = await conn.fetchval(
                "SELECT count(*) FROM das.activity_events WHERE db_user_name = 'rdsadmin'"
            )
            dropped = await conn.fetchval(
                "SELECT coalesce(sum(events), 0) FROM das.dropped_events "
                "WHERE rule = 'rdsadmin_noise'"
            )
            brute = await conn.fetch(
                "SELECT group_key, severity, event_count, events::text AS events "
                "FROM das.alerts WHERE rule = 'brute_force_login' ORDER BY group_key"
            )
            fingerprinted = await conn.fetchval(
                "SELECT count(*) FROM das.activity_events WHERE fingerprint IS NOT NULL"
            )
            report = await verify_warehouse(conn, kms=None)
        finally:
            await conn.close()
        # every event stored once, but the dropped noise, which the chain links counted
        assert (total, admin) == (len(events) - noise, 0)
        assert dropped == noise
        assert fingerprinted > 0
        # one alert per group for the incident, whatever worker read it and however often
        assert [(r["group_key"], r["severity"]) for r in brute] == [
            (f"remote_host={ATTACKER_HOST}", "high"),
            ("user=admin", "high"),
        ]
        assert all(r["event_count"] >= 5 for r in brute)
        assert report.clean, report.findings
        assert report.alerts >= 2
        # delivered at least once, each alert always with its one idempotency key
        keys: dict[int, set[str]] = {}
        for alert in received:
            keys.setdefault(alert["id"], set()).add(alert["idempotency_key"])
        assert all(len(k) == 1 for k in keys.values())
        assert {a["group_key"] for a in received if a["rule"] == "brute_force_login"} == {
            f"remote_host={ATTACKER_HOST}",
            "user=admin",
        }
    finally:
        await runner.cleanup()
        await asyncio.sleep(0)
