"""False positives of the built-in rules over normal emulated traffic.

    python -m bench.policy_fp [--events 1000000] [--rate 20] [--dsn DSN]

Replays ``--events`` events of normal Aurora PostgreSQL and MySQL traffic (the emulator's,
paced at ``--rate`` events/s of log time, most of its failed logins removed:
ingest/emulate/scenarios.py) through the policy path into a fresh warehouse (a throwaway
PostgreSQL unless --dsn), then prints the alerts each built-in raised, by severity. Every alert
here is a false positive in the sense that no incident was injected; whether it is a *wrong*
one is for the reader (the emulator's applications GRANT and ALTER ROLE as part of their
normal work, and read thousands of rows).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

import asyncpg

from ingest.alerts.replay import replay
from ingest.emulate.scenarios import normal
from ingest.policy.evaluate import Policy
from ingest.policy.rules import load_rules
from ingest.warehouse.migrate import migrate


async def measure(dsn: str, events: int, rate: float, rules: str | None) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        policy = Policy(load_rules(rules))
        started = time.perf_counter()
        stats = await replay(
            conn,
            normal(7, "both", instances=4, count=events, rate=rate),
            policy,
            batch_records=200,
        )
        elapsed = time.perf_counter() - started
        rows = await conn.fetch(
            "SELECT rule, severity, count(*) AS n FROM das.alerts GROUP BY 1, 2"
        )
        span = await conn.fetchval(
            "SELECT max(last_time) - min(first_time) FROM das.policy_counters"
        )
    finally:
        await conn.close()
    print(
        f"{stats.events} events in {stats.records} records, {span} of log time, replayed in "
        f"{elapsed:.0f} s ({stats.events / elapsed:.0f} events/s)"
    )
    counts = Counter({(r["rule"], r["severity"]): r["n"] for r in rows})
    for rule in policy.rules.rules:
        n = counts.get((rule.name, rule.severity), 0)
        print(f"  {rule.name:<20} {rule.severity:<9} {n:>6} alerts")
    by_severity: Counter[str] = Counter()
    for (_, severity), n in counts.items():
        by_severity[severity] += n
    print("  by severity: " + ", ".join(f"{s} {by_severity.get(s, 0)}" for s in
                                        ("critical", "high", "medium", "low")))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=20.0, help="events/s of log time (20)")
    parser.add_argument("--dsn", help="an empty database (default: a throwaway PostgreSQL)")
    parser.add_argument("--rules", help="a rules file to measure instead of the built-in pack")
    args = parser.parse_args()
    rules = None
    if args.rules:
        with open(args.rules, encoding="utf-8") as f:
            rules = f.read()
    if args.dsn:
        asyncio.run(measure(args.dsn, args.events, args.rate, rules))
        return
    from das_dev.devstack import PostgresCluster

    with PostgresCluster() as cluster:
        asyncio.run(measure(cluster.dsn, args.events, args.rate, rules))


if __name__ == "__main__":
    main()
