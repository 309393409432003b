"""The "Audit overview" Grafana dashboard (deploy/grafana/dashboards/das-audit.json): every
panel query runs as the analyst on a warehouse with several day partitions, filters by the time
picker, and its plan (EXPLAIN) reads no day partition outside the selected days."""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from tests.fleet import migrated
from tests.grafana_sql import expand

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "das-audit.json"

#: Seven days of partitions; the time picker selects the middle two.
FIRST_DAY = datetime(2026, 11, 20, tzinfo=UTC)
DAYS = 7
#: The streams picked in the stream variable.
STREAMS = ("aws-rds-das-cluster-A", "aws-rds-das-db-B")
SELECTED = (FIRST_DAY + timedelta(days=3), FIRST_DAY + timedelta(days=5) - timedelta(seconds=1))


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["rawSql"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def scans(plan: Any) -> list[dict[str, Any]]:
    """Every plan node that reads a relation."""
    found: list[dict[str, Any]] = []
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.append(plan)
        for value in plan.values():
            found += scans(value)
    elif isinstance(plan, list):
        for value in plan:
            found += scans(value)
    return found


def index_names(plan: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(plan, dict):
        if "Index Name" in plan:
            found.add(plan["Index Name"])
        for value in plan.values():
            found |= index_names(value)
    elif isinstance(plan, list):
        for value in plan:
            found |= index_names(value)
    return found


def relations(plan: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(plan, dict):
        if "Relation Name" in plan:
            found.add(plan["Relation Name"])
        for value in plan.values():
            found |= relations(value)
    elif isinstance(plan, list):
        for value in plan:
            found |= relations(value)
    return found


def test_the_dashboard_covers_the_audit_questions_and_is_provisioned() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "Audit overview"
    sources = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert sources == {"${warehouse}"}  # no hard-coded uid
    source, stream = dashboard["templating"]["list"]
    assert source["type"] == "datasource"
    # the stream variable reads the warehouse, many streams at once (several clusters may
    # share one warehouse), and every panel is cut by it
    assert stream["name"] == "stream"
    assert stream["datasource"]["uid"] == "${warehouse}"
    assert stream["multi"] is True
    assert stream["includeAll"] is True
    text = " ".join(sql for _, sql in panel_queries())
    for view in (
        "das.failed_logins",
        "das.ddl_changes",
        "das.privileged_activity",
        "das.failed_statements",
        "das.dead_letters",
        "das.alerts",
        "object_name",
        "db_user_name",
    ):
        assert view in text, view
    for title, sql in panel_queries():
        assert "$__timeFilter(" in sql, f"{title}: not bounded by the time picker"
        assert re.search(r"\b(\w+\.)?stream_name IN \(\$stream\)", sql), f"{title}: no stream"


async def test_every_panel_reads_only_the_selected_days(pg_dsn: str) -> None:
    await migrated(pg_dsn)
    owner = await asyncpg.connect(pg_dsn)
    analyst = f"a_{secrets.token_hex(4)}"
    try:
        last = FIRST_DAY + timedelta(days=DAYS - 1)
        await owner.execute("SELECT das.ensure_partitions($1, $2)", FIRST_DAY.date(), last.date())
        await owner.execute(f"CREATE ROLE {analyst} LOGIN IN ROLE das_analyst")
    finally:
        await owner.close()
    days = [(FIRST_DAY + timedelta(days=d)).strftime("%Y%m%d") for d in range(DAYS)]
    partitions = {f"activity_events_p{day}" for day in days} | {"activity_events_default"}
    wanted = {f"activity_events_p{d.strftime('%Y%m%d')}" for d in (SELECTED[0], SELECTED[1])}
    assert len(wanted) == 2
    conn = await asyncpg.connect(
        pg_dsn.replace("postgresql://postgres@", f"postgresql://{analyst}@")
    )
    try:
        (variable,) = [
            v
            for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
            if v["name"] == "stream"
        ]
        await conn.fetch(variable["query"])  # the stream picker works for the analyst too
        for title, sql in panel_queries():
            query = expand(sql, *SELECTED, streams=STREAMS)
            await conn.fetch(query)  # runs as the analyst
            plan = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}"))
            read = relations(plan)
            outside = (read & partitions) - wanted
            assert not outside, f"{title}: reads {sorted(outside)} outside the selected days"
            if (
                "activity_events" in query
                or "das.failed" in query
                or "das.ddl" in query
                or ("das.privileged" in query)
            ):
                assert read & wanted, f"{title}: reads no partition of the selected days"
    finally:
        await conn.close()
        owner = await asyncpg.connect(pg_dsn)
        try:
            await owner.execute(f"DROP OWNED BY {analyst}")
            await owner.execute(f"DROP ROLE {analyst}")
        finally:
            await owner.close()


async def test_the_alerts_panel_reads_das_alerts_through_its_created_at_index(pg_dsn: str) -> None:
    # das.alerts is not partitioned: the time picker must reach it through an index on
    # created_at, never a scan of every alert ever raised. With sequential scans priced out,
    # a query the index cannot serve (a function of created_at, another column) still scans.
    await migrated(pg_dsn)
    (sql,) = [sql for _, sql in panel_queries() if "das.alerts" in sql]
    conn = await asyncpg.connect(pg_dsn)
    try:
        indexed = {
            r["name"]
            for r in await conn.fetch(
                "SELECT c.relname AS name FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                "WHERE i.indrelid = 'das.alerts'::regclass AND a.attname = 'created_at'"
            )
        }
        assert indexed, "das.alerts has no index that leads with created_at"
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = json.loads(
                await conn.fetchval(
                    f"EXPLAIN (FORMAT JSON) {expand(sql, *SELECTED, streams=STREAMS)}"
                )
            )
        (alerts,) = [n for n in scans(plan) if n["Relation Name"] == "alerts"]
        assert alerts["Node Type"] in {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}, alerts
        used = index_names(plan)
        assert used & indexed, f"the alerts panel uses none of {sorted(indexed)}: {used}"
    finally:
        await conn.close()
