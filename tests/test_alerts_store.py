"""Policy state and alerts in a real warehouse (ingest/alerts/store.py, migrations 0016)."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ingest.alerts.store import record_policy
from ingest.decode.fingerprint import of_statement
from ingest.decode.model import ActivityEvent, DecodedRecord
from ingest.integrity.alerts import AlertFields, alert_hash
from ingest.integrity.canonical import ZERO_HASH
from ingest.policy.evaluate import Policy, PolicyOutput
from ingest.policy.rules import load_rules
from ingest.warehouse.migrate import migrate

NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def failed_login(user: str, seconds: float, host: str = "10.1.2.3") -> ActivityEvent:
    return ActivityEvent(
        event_index=0,
        command="AUTH FAILURE",
        exit_code="28P01",
        db_user_name=user,
        remote_host=host,
        log_time=NOON + timedelta(seconds=seconds),
    )


def evaluate(policy: Policy, events: list[ActivityEvent], first_seq: int = 0) -> PolicyOutput:
    out = PolicyOutput()
    for n, event in enumerate(events):
        record = DecodedRecord("1.1", "cluster-A", "db-1", [event], [])
        policy.evaluate(
            event, record, of_statement(event.command_text), (str(first_seq + n), 0), out
        )
    return out


async def commit(
    dsn: str, policy: Policy, out: PolicyOutput, shard: str = "shardId-0"
) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            return await record_policy(conn, out, policy.rules, "stream-A", shard)
    finally:
        await conn.close()


async def alerts(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM das.alerts ORDER BY id")]
    finally:
        await conn.close()


@pytest.fixture
async def warehouse(pg_dsn: str) -> str:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return pg_dsn


BRUTE = Policy(load_rules(None))


async def test_a_threshold_fires_once_per_group_and_window_across_batches(warehouse: str) -> None:
    # 3 failures in one batch (shard 0), 2 more in another (shard 1): 5 within 60 s for user
    # mallory, and from host 10.1.2.3.
    first = evaluate(BRUTE, [failed_login("mallory", s) for s in (0, 5, 10)])
    assert await commit(warehouse, BRUTE, first) == []
    second = evaluate(BRUTE, [failed_login("mallory", s) for s in (20, 30)], first_seq=10)
    ids = await commit(warehouse, BRUTE, second, "shardId-1")
    assert len(ids) == 2
    rows = await alerts(warehouse)
    assert {(r["rule"], r["group_key"], r["severity"], r["event_count"]) for r in rows} == {
        ("brute_force_login", "user=mallory", "high", 5),
        ("brute_force_login", "remote_host=10.1.2.3", "high", 5),
    }
    row = next(r for r in rows if r["group_key"] == "user=mallory")
    assert row["title"] == "5 failed logins for user=mallory within 1m"
    assert row["first_event_time"] == NOON
    assert row["last_event_time"] == NOON + timedelta(seconds=30)
    assert row["window_start"] == NOON
    assert (row["cluster_id"], row["instance_id"], row["stream_name"]) == (
        "cluster-A",
        "db-1",
        "stream-A",
    )
    assert '"sequence_number": "10"' in row["events"]
    # A sixth failure in the same window adds no alert; evaluating the same evidence again
    # (a worker that took the shard over re-reads records) adds none either.
    third = evaluate(BRUTE, [failed_login("mallory", 40)], first_seq=20)
    assert await commit(warehouse, BRUTE, third) == []
    assert await commit(warehouse, BRUTE, second, "shardId-1") == []
    assert len(await alerts(warehouse)) == 2


async def test_events_further_apart_than_the_window_do_not_add_up(warehouse: str) -> None:
    spread = evaluate(BRUTE, [failed_login("eve", s * 30, f"10.0.0.{s}") for s in range(5)])
    assert await commit(warehouse, BRUTE, spread) == []
    assert await alerts(warehouse) == []


async def test_concurrent_batches_of_one_incident_raise_one_alert(warehouse: str) -> None:
    """Two workers commit overlapping evidence at once: the unique identity and the counters'
    row locks leave exactly one alert per group."""
    outs = [
        evaluate(BRUTE, [failed_login("trudy", i + 0.1 * k) for i in range(5)], first_seq=k * 10)
        for k in range(4)
    ]
    results = await asyncio.gather(
        *(commit(warehouse, BRUTE, out, f"shardId-{k}") for k, out in enumerate(outs))
    )
    assert sum(len(ids) for ids in results) == 2
    assert sorted(r["group_key"] for r in await alerts(warehouse)) == [
        "remote_host=10.1.2.3",
        "user=trudy",
    ]


async def test_match_single_and_first_seen_rules(warehouse: str) -> None:
    policy = Policy(load_rules("builtins: {new_client_host: {learning: 1h}}"))
    grant = ActivityEvent(
        event_index=0, command="GRANT", command_text="GRANT ALL ON t TO eve",
        db_user_name="eve", log_time=NOON, exit_code="00000",
    )  # fmt: skip
    big = ActivityEvent(
        event_index=0, command="SELECT", command_text="SELECT * FROM customers",
        db_user_name="eve", row_count=50_000, log_time=NOON,
    )  # fmt: skip
    ids = await commit(warehouse, policy, evaluate(policy, [grant, big]))
    rows = await alerts(warehouse)
    assert len(ids) == 2
    assert {(r["rule"], r["group_key"], r["severity"]) for r in rows} == {
        ("privilege_change", "user=eve,instance=db-1", "high"),
        ("mass_read", "user=eve,statement", "high"),
    }
    assert next(r for r in rows if r["rule"] == "privilege_change")["title"] == (
        "privilege change by eve on db-1: grant all on t to eve"
    )

    def connect(host: str, at: timedelta) -> ActivityEvent:
        return ActivityEvent(
            event_index=0, command="CONNECT", db_user_name="bob", remote_host=host,
            log_time=NOON + at, exit_code="00000",
        )  # fmt: skip

    # Learning: hosts seen within the first hour are normal; a new one after it alerts, once.
    learning = [connect("10.0.0.1", timedelta(0)), connect("10.0.0.2", timedelta(minutes=30))]
    assert await commit(warehouse, policy, evaluate(policy, learning)) == []
    later = [connect("10.0.0.2", timedelta(hours=2)), connect("10.6.6.6", timedelta(hours=2))]
    assert len(await commit(warehouse, policy, evaluate(policy, later))) == 1
    assert await commit(warehouse, policy, evaluate(policy, later)) == []
    new = [r for r in await alerts(warehouse) if r["rule"] == "new_client_host"]
    assert [(r["group_key"], r["severity"]) for r in new] == [
        ("user=bob,remote_host=10.6.6.6", "low")
    ]


async def test_the_alert_chain_links_every_alert(warehouse: str) -> None:
    out = evaluate(BRUTE, [failed_login(u, i) for u in ("a", "b") for i in range(5)])
    await commit(warehouse, BRUTE, out)
    rows = await alerts(warehouse)
    assert len(rows) == 3  # user=a, user=b, remote_host=10.1.2.3
    prev = ZERO_HASH
    for r in rows:
        assert bytes(r["prev_hash"]) == prev
        fields = AlertFields(
            r["rule"], r["severity"], r["title"], r["group_key"], r["window_start"],
            r["first_event_time"], r["last_event_time"], r["event_count"], r["created_at"],
            r["stream_name"], r["shard_id"], r["cluster_id"], r["instance_id"],
            __import__("json").loads(r["events"]),
        )  # fmt: skip
        assert alert_hash(prev, fields) == bytes(r["alert_hash"])
        prev = bytes(r["alert_hash"])


async def test_the_ingest_role_appends_alerts_but_cannot_change_them(warehouse: str) -> None:
    admin = await asyncpg.connect(warehouse)
    user = f"u_{secrets.token_hex(4)}"
    await admin.execute(f"CREATE ROLE {user} LOGIN IN ROLE das_ingest")
    ingest_dsn = warehouse.replace("postgresql://postgres@", f"postgresql://{user}@")
    try:
        out = evaluate(BRUTE, [failed_login("x", i) for i in range(5)])
        assert len(await commit(ingest_dsn, BRUTE, out)) == 2
        ingest = await asyncpg.connect(ingest_dsn)
        try:
            for statement in (
                "UPDATE das.alerts SET severity = 'low'",
                "DELETE FROM das.alerts",
                "TRUNCATE das.alerts",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await ingest.execute(statement)
        finally:
            await ingest.close()
    finally:
        await admin.close()


async def test_verify_checks_the_alert_chain(warehouse: str) -> None:
    from ingest.integrity.verify import verify_warehouse

    out = evaluate(BRUTE, [failed_login(u, i) for u in ("a", "b") for i in range(5)])
    await commit(warehouse, BRUTE, out)
    conn = await asyncpg.connect(warehouse)
    try:
        report = await verify_warehouse(conn, kms=None)
        assert report.clean, report.findings
        assert report.alerts == 3
        for statement, kind in (
            ("UPDATE das.alerts SET severity = 'low' WHERE id = 2", "alert_altered"),
            ("DELETE FROM das.alerts WHERE id = 2", "alert_chain_broken"),
        ):
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute(statement)
                report = await verify_warehouse(conn, kms=None)
                assert [f.kind for f in report.findings] == [kind]
                assert (
                    "alert " + ("2" if kind == "alert_altered" else "3")
                    in report.findings[0].detail
                )
            finally:
                await tx.rollback()
    finally:
        await conn.close()


async def test_the_alert_chain_head_is_anchored_with_kms(
    warehouse: str, aws_env: dict[str, str]
) -> None:
    """Hash links alone cannot show the newest alerts removed, nor a whole chain rewritten
    consistently (by whoever may write das.alerts); an anchor of its head can."""
    from ingest.aws import aws_client
    from ingest.integrity.alerts import ANCHOR_STREAM
    from ingest.integrity.anchor import AnchorKey, anchor_alert_head
    from ingest.integrity.verify import verify_warehouse

    out = evaluate(BRUTE, [failed_login(u, i) for u in ("a", "b") for i in range(5)])
    await commit(warehouse, BRUTE, out)
    conn = await asyncpg.connect(warehouse)
    try:
        async with aws_client("kms") as kms:
            key_id = (await kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC"))[
                "KeyMetadata"
            ]["KeyId"]
            key = AnchorKey(kms, key_id)
            anchor = await anchor_alert_head(conn, key)
            assert anchor is not None
            assert (anchor.stream_name, anchor.link_no) == (ANCHOR_STREAM, 3)
            assert await anchor_alert_head(conn, key) is None  # the head is anchored already
            report = await verify_warehouse(conn, kms=kms, anchor_key_id=key_id)
            assert report.clean, report.findings
            assert (report.alerts, report.anchors_checked) == (3, 1)

            async def rewrite_consistently() -> None:
                """Change the first alert and rehash every alert after it."""
                await conn.execute("UPDATE das.alerts SET severity = 'low' WHERE id = 1")
                prev = ZERO_HASH
                for r in await conn.fetch(
                    "SELECT *, events::text AS events FROM das.alerts ORDER BY id"
                ):
                    fields = AlertFields(
                        r["rule"], r["severity"], r["title"], r["group_key"], r["window_start"],
                        r["first_event_time"], r["last_event_time"], r["event_count"],
                        r["created_at"], r["stream_name"], r["shard_id"], r["cluster_id"],
                        r["instance_id"], __import__("json").loads(r["events"]),
                    )  # fmt: skip
                    new = alert_hash(prev, fields)
                    await conn.execute(
                        "UPDATE das.alerts SET prev_hash = $1, alert_hash = $2 WHERE id = $3",
                        prev,
                        new,
                        r["id"],
                    )
                    prev = new

            async def remove_newest() -> None:
                await conn.execute("DELETE FROM das.alerts WHERE id = 3")

            for tamper, kind in (
                (remove_newest, "truncated"),
                (rewrite_consistently, "anchor_mismatch"),
            ):
                tx = conn.transaction()
                await tx.start()
                try:
                    await tamper()
                    # The hash links still agree: only the anchor tells.
                    assert (await verify_warehouse(conn, kms=None)).clean
                    report = await verify_warehouse(conn, kms=kms, anchor_key_id=key_id)
                    assert [(f.kind, f.stream) for f in report.findings] == [(kind, ANCHOR_STREAM)]
                finally:
                    await tx.rollback()
    finally:
        await conn.close()


GAP_CASES = [
    # (instances' last heartbeats in minutes after NOON, now in minutes, caught up, silent)
    ({"a": 10, "b": 10}, 11, False, []),
    ({"a": 10, "b": 4}, 11, False, ["b"]),  # b is 6 min behind its sibling: stream time
    ({"a": 10, "b": 6}, 11, False, []),  # 4 min: within the 5 min gap
    ({"a": 10, "b": 10}, 30, False, []),  # all silent, not caught up: a backlog, not a gap
    ({"a": 10, "b": 10}, 30, True, ["a", "b"]),  # caught up and silent: the wall clock counts
    ({"a": 10}, 14, True, []),
]


@pytest.mark.parametrize(("beats", "now", "caught_up", "silent"), GAP_CASES)
def test_heartbeat_gaps(
    beats: dict[str, int], now: int, caught_up: bool, silent: list[str]
) -> None:
    from ingest.alerts.health import Beat, gaps

    rule = load_rules(None).by_name("heartbeat_gap")
    found = gaps(
        [Beat("c", name, NOON + timedelta(minutes=m)) for name, m in beats.items()],
        rule,
        now=NOON + timedelta(minutes=now),
        caught_up=caught_up,
    )
    assert sorted(b.instance_id for b, _ in found) == silent


async def test_counters_no_window_reaches_are_pruned(warehouse: str) -> None:
    from ingest.alerts.store import prune_counters

    old = evaluate(BRUTE, [failed_login("a", 0)])
    recent = evaluate(BRUTE, [failed_login("b", 3600)])  # an hour later: 60 one-minute windows
    await commit(warehouse, BRUTE, old)
    await commit(warehouse, BRUTE, recent)
    conn = await asyncpg.connect(warehouse)
    try:
        assert await conn.fetchval("SELECT count(*) FROM das.policy_counters") == 4
        assert await prune_counters(conn) == 2  # user=a and its host, an hour back
        left = await conn.fetch("SELECT group_key FROM das.policy_counters ORDER BY group_key")
        assert [r["group_key"] for r in left] == ["remote_host=10.1.2.3", "user=b"]
        assert await prune_counters(conn) == 0
    finally:
        await conn.close()


async def test_an_alert_committed_while_a_batch_waits_for_the_chain_lock_is_not_raised_twice(
    warehouse: str,
) -> None:
    """A batch checks which identities exist before taking the chain's lock; one committed by
    another transaction meanwhile is found again under the lock: the batch inserts only the
    rest, linked after it (one multi-row insert must not break the chain)."""
    from ingest.alerts.store import Candidate, insert_alerts

    rule = BRUTE.rules.by_name("brute_force_login")

    def candidate(group: str) -> Candidate:
        return Candidate(rule, group, NOON, NOON, NOON, 5, {"user": group}, [("1", 0)])

    first = await asyncpg.connect(warehouse)
    second = await asyncpg.connect(warehouse)
    try:
        holder = first.transaction()
        await holder.start()
        assert len(await insert_alerts(first, [candidate("user=x")], "stream-A", "s-1")) == 1

        async def other_batch() -> list[int]:
            async with second.transaction():
                return await insert_alerts(
                    second, [candidate("user=x"), candidate("user=y")], "stream-A", "s-2"
                )

        waiting = asyncio.ensure_future(other_batch())
        for _ in range(100):  # until it waits for the lock (its existence check saw no x)
            if await first.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the second batch never waited for the chain's lock")
        await holder.commit()
        assert len(await asyncio.wait_for(waiting, 30)) == 1
    finally:
        await first.close()
        await second.close()
    rows = await alerts(warehouse)
    assert [(r["group_key"], r["shard_id"]) for r in rows] == [("user=x", "s-1"), ("user=y", "s-2")]
    assert bytes(rows[1]["prev_hash"]) == bytes(rows[0]["alert_hash"])
