"""False positives of the built-in rules over normal emulated traffic.

    python -m bench.policy_fp [--events 1100000] [--rate 3.5] [--rules FILE | --pack-only]
                              [--dsn DSN]

Replays ``--events`` events of normal Aurora PostgreSQL and MySQL traffic (four instances, two of
them writers: ingest/emulate/traffic.py, an online shop's accounts, and
ingest/emulate/scenarios.normal, paced at ``--rate`` events/s of log time in business hours and
less at night and at weekends, most failed logins removed, a heartbeat per instance every 10 s)
through the policy path into a fresh warehouse (a throwaway PostgreSQL unless --dsn), checking
stream health after every batch (stream time), then prints the alerts each rule raised, by
severity.

It measures twice over the same traffic: the built-in pack as shipped, and the pack with the
rules file a team running this shop would deploy (``--rules``, default
bench/policy_fp_rules.yaml: exemptions for the migration tool, the nightly ETL job and the bulk
readers; docs/policies.md says what each one misses). No incident is injected, so every alert is
a false positive in the sense that nothing was attacked; the target is none at critical or high
with the team's file, and the "Checks" lines say whether it was met, and whether the traffic
outlasted ``new_client_host``'s learning period (else that rule was not measured at all).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from bench.procs import machine
from ingest.alerts.replay import replay
from ingest.emulate.scenarios import normal
from ingest.policy.evaluate import Policy
from ingest.policy.rules import RuleSet, load_rules
from ingest.warehouse.migrate import migrate

TEAM_RULES = Path(__file__).with_name("policy_fp_rules.yaml")
SEVERITIES = ("critical", "high", "medium", "low")
BATCH_RECORDS = 200
SEED = 7


class Result:
    def __init__(self, name: str, rules: RuleSet) -> None:
        self.name = name
        self.rules = rules
        self.events = 0
        self.records = 0
        self.health_checks = 0
        self.elapsed = 0.0
        self.first: datetime | None = None
        self.last: datetime | None = None
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def span(self) -> timedelta:
        if self.first is None or self.last is None:
            return timedelta(0)
        return self.last - self.first

    def by_severity(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_, severity), n in self.counts.items():
            out[severity] += n
        return out


async def measure(dsn: str, events: int, rate: float, name: str, rules: RuleSet) -> Result:
    """Replay the traffic in batches of BATCH_RECORDS records; ``replay`` checks stream health
    after each (stream time: an instance silent for the rule's gap while its siblings go on)."""
    result = Result(name, rules)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute(
            "TRUNCATE das.alerts, das.alert_outbox, das.alert_acks, das.policy_counters, "
            "das.policy_seen, das.policy_rule_start, das.heartbeats"
        )
        policy = Policy(rules)
        traffic = normal(SEED, "both", instances=4, count=events, rate=rate)
        started = time.perf_counter()
        while True:
            chunk = list(itertools.islice(traffic, BATCH_RECORDS))
            if not chunk:
                break
            stats = await replay(conn, chunk, policy, batch_records=BATCH_RECORDS)
            result.events += stats.events
            result.records += stats.records
            result.health_checks += 1
            for record in (chunk[0], chunk[-1]):
                stamp = datetime.strptime(
                    record.events[0]["logTime"][:19], "%Y-%m-%d %H:%M:%S"
                ).replace(tzinfo=UTC)
                result.first = stamp if result.first is None else min(result.first, stamp)
                result.last = stamp if result.last is None else max(result.last, stamp)
        result.elapsed = time.perf_counter() - started
        rows = await conn.fetch(
            "SELECT rule, severity, count(*) AS n FROM das.alerts GROUP BY 1, 2"
        )
        result.counts = Counter({(r["rule"], r["severity"]): r["n"] for r in rows})
        for r in await conn.fetch(
            "SELECT rule, title FROM (SELECT rule, title, row_number() OVER "
            "(PARTITION BY rule ORDER BY first_event_time) AS n FROM das.alerts) a WHERE n <= 3"
        ):
            result.examples.setdefault(r["rule"], []).append(r["title"])
    finally:
        await conn.close()
    return result


def report(result: Result) -> None:
    print(
        f"\n{result.name}: {result.events:,} events in {result.records:,} records (heartbeats "
        f"included), {result.span} of log time ({result.first:%a %Y-%m-%d %H:%M} to "
        f"{result.last:%a %Y-%m-%d %H:%M} UTC), stream health checked {result.health_checks:,} "
        f"times, replayed in {result.elapsed:.0f} s ({result.events / result.elapsed:,.0f} "
        "events/s)"
    )
    print(f"  {'rule':<26} {'severity':<9} {'alerts':>7}")
    for rule in result.rules.rules:
        if rule.action != "alert":
            continue
        n = result.counts.get((rule.name, rule.severity), 0)
        print(f"  {rule.name:<26} {rule.severity:<9} {n:>7,}")
        for title in result.examples.get(rule.name, []):
            print(f"      e.g. {title[:110]}")
    by_severity = result.by_severity()
    print("  by severity: " + ", ".join(f"{s} {by_severity.get(s, 0):,}" for s in SEVERITIES))


def checks(team: Result | None, pack: Result | None) -> bool:
    ok = True
    print("\nChecks")
    for result in (team, pack):
        if result is None:
            continue
        learning = max(
            (r.learning for r in result.rules.rules if r.kind == "first_seen"),
            default=timedelta(0),
        )
        passed = result.span > 2 * learning
        ok &= passed
        print(
            f"  {'PASS' if passed else 'FAILED'}  {result.name}: log time {result.span} > twice "
            f"the longest first-seen learning period ({learning}): first-seen rules measured"
        )
        passed = result.events >= 1_000_000
        ok &= passed
        print(
            f"  {'PASS' if passed else 'FAILED'}  {result.name}: {result.events:,} events "
            "(at least 1,000,000)"
        )
    if team is not None:
        severe = {k: n for k, n in team.counts.items() if k[1] in ("critical", "high")}
        passed = not severe
        ok &= passed
        detail = ", ".join(f"{rule} {sev} {n}" for (rule, sev), n in sorted(severe.items()))
        print(
            f"  {'PASS' if passed else 'FAILED'}  {team.name}: no critical or high alerts on "
            f"normal traffic{': ' + detail if detail else ''}"
        )
    return ok


async def run(dsn: str, args: argparse.Namespace) -> bool:
    team = pack = None
    if args.rules is not None:
        team = await measure(
            dsn,
            args.events,
            args.rate,
            f"with {Path(args.rules).name}",
            load_rules(args.rules_text, args.rules),
        )
        report(team)
    if not args.team_only:
        pack = await measure(dsn, args.events, args.rate, "built-in pack", load_rules(None))
        report(pack)
    return checks(team, pack)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_100_000)
    parser.add_argument(
        "--rate", type=float, default=3.5,
        help="events/s of log time in business hours (3.5: a week of log time for 1.1M events)",
    )  # fmt: skip
    parser.add_argument("--dsn", help="an empty database (default: a throwaway PostgreSQL)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--rules", default=str(TEAM_RULES),
        help="the team's rules file (default bench/policy_fp_rules.yaml)",
    )  # fmt: skip
    which.add_argument(
        "--pack-only", dest="rules", action="store_const", const=None,
        help="measure the built-in pack alone",
    )  # fmt: skip
    parser.add_argument(
        "--team-only", action="store_true", help="measure with the rules file alone"
    )
    args = parser.parse_args()
    if args.rules is not None:
        args.rules_text = Path(args.rules).read_text(encoding="utf-8")
    print(f"python -m bench.policy_fp --events {args.events} --rate {args.rate:g}")
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}")
    if args.dsn:
        ok = asyncio.run(run(args.dsn, args))
    else:
        from das_dev.devstack import PostgresCluster

        with PostgresCluster() as cluster:
            ok = asyncio.run(run(cluster.dsn, args))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
