"""Ground truth: each built-in rule fires on its emulated incident, with the expected group
key, severity and count, and nothing else fires because of it (ingest/emulate/scenarios.py,
replayed through the policy path into a real warehouse).

The incident's alerts are those of the traffic with the incident that the same traffic without
it does not raise (by identity: rule, group key, window). The emulator's background traffic
raises alerts of its own under the pack as shipped (its migration tool GRANTs, its reports read
more than 10,000 rows); what normal traffic raises, with and without a team's exemptions, is
measured over 1M events by ``python -m bench.policy_fp``.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from ingest.alerts.replay import replay
from ingest.emulate.scenarios import SCENARIOS, scenario
from ingest.policy.evaluate import Policy
from ingest.policy.rules import load_rules
from ingest.warehouse.migrate import migrate

COUNT = 20_000
Alert = tuple[Any, ...]


async def _alerts(conn: asyncpg.Connection, name: str | None) -> dict[Alert, Alert]:
    """Replay the traffic (with incident ``name``) into empty policy tables; alerts by
    identity."""
    await conn.execute(
        "TRUNCATE das.alerts, das.alert_outbox, das.alert_acks, das.policy_counters, "
        "das.policy_seen, das.policy_rule_start, das.heartbeats"
    )
    records, _ = scenario(name, count=COUNT)
    await replay(conn, records, Policy(load_rules(None)))
    rows = await conn.fetch(
        "SELECT rule, group_key, window_start, severity, event_count FROM das.alerts"
    )
    return {
        (r["rule"], r["group_key"], r["window_start"]): (
            r["rule"],
            r["group_key"],
            r["severity"],
            r["event_count"],
        )
        for r in rows
    }


@pytest.fixture(scope="module")
async def baseline_dsn(stack: Any) -> Any:
    import secrets

    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(stack.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = stack.postgres.dsn_for(name)
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    normal = await _alerts(conn, None)
    await conn.close()
    yield dsn, normal
    admin = await asyncpg.connect(stack.dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.mark.parametrize("name", SCENARIOS)
async def test_each_builtin_fires_on_its_scenario_and_nothing_else(
    baseline_dsn: tuple[str, dict[Alert, Alert]], name: str
) -> None:
    dsn, normal = baseline_dsn
    _, expected = scenario(name, count=100)
    assert expected, "every scenario has ground truth"
    conn = await asyncpg.connect(dsn)
    try:
        attacked = await _alerts(conn, name)
    finally:
        await conn.close()
    added = sorted(v for k, v in attacked.items() if k not in normal)
    # Exactly the expected alerts (rule, group key, severity), one each...
    assert [a[:3] for a in added] == sorted((e.rule, e.group_key, e.severity) for e in expected)
    # ...each counting at least the incident's events (a threshold's window may also hold a
    # background failed login of the same user)
    want = {(e.rule, e.group_key): e.count for e in expected}
    for rule, key, _, count in added:
        assert want[(rule, key)] <= count <= want[(rule, key)] + 2, (rule, key, count)


def test_scenarios_inject_into_paced_normal_traffic() -> None:
    records, _ = scenario("brute-force", count=2_000)
    events = [e for r in records for e in r.events if e.get("type") == "record"]
    attacker = [e for e in events if e.get("remoteHost") == "203.0.113.7"]
    assert len(attacker) == 20
    # the traffic around it is paced (20 events/s), not microseconds apart
    times = sorted(e["logTime"] for e in events)
    assert times[0].startswith("2026-11-23 09:00:00")
    assert times[-1] >= "2026-11-23 09:01:30"


def test_the_cli_offers_every_scenario() -> None:
    from ingest.emulate.cli import SCENARIO_NAMES
    from ingest.emulate.producer import EmulateOptions
    from ingest.errors import ConfigError

    assert SCENARIO_NAMES == SCENARIOS
    options = EmulateOptions(stream="aws-rds-das-cluster-X", scenario="mass-export", count=500)
    records = list(options.inner_records())
    assert any(
        e.get("dbUserName") == "exfil" and e.get("rowCount") == 250_000
        for r in records
        for e in r.events
    )
    assert {r.doc["clusterId"] for r in records} == {"cluster-X"}
    with pytest.raises(ConfigError, match="scenario must be one of"):
        EmulateOptions(stream="aws-rds-das-cluster-X", scenario="heist")
