"""Policy state and alerts in the warehouse, in the caller's transaction.

The decode processes hand over what a batch's events mean for the rules (a
:class:`~ingest.policy.evaluate.PolicyOutput`: tallies per rule, group and bucket; first
sightings). Here, in the batch's commit transaction:

1. the tallies are added to ``das.policy_counters`` (sorted, so two workers updating the same
   groups never deadlock), and each touched group's sum over the last window is read back: a
   threshold reached makes an alert candidate (a match rule is a threshold of 1). A lock per
   group (``GROUP_LOCKS``) makes a concurrent batch of the same group wait for this one, so
   its sum counts both;
2. sightings are inserted into ``das.policy_seen``; a value the fleet had not seen, after the
   rule's learning period, makes a candidate;
3. candidates are inserted into ``das.alerts`` with their identity (rule, group key, window)
   unique: a batch evaluated again after a crash or a lease takeover finds its alerts there
   and adds none. Each new alert extends the alert chain (ingest.integrity.alerts).

Because all of it commits or rolls back with the batch's events, counters count every stored
batch exactly once and an alert exists iff its events were stored.
"""

from __future__ import annotations

import logging
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ingest.conn import Conn
from ingest.integrity.alerts import LOCK_KEY, AlertFields, alert_hash
from ingest.integrity.canonical import ZERO_HASH
from ingest.policy.evaluate import (
    BUCKETS,
    EventRef,
    PolicyOutput,
    Tally,
    bucket_start,
    window_start,
)
from ingest.policy.rules import Rule, RuleSet

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_REFS = 20

UPSERT_COUNTERS = """
INSERT INTO das.policy_counters AS c (rule, group_key, bucket, amount, events, first_time,
                                      last_time)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::timestamptz[], $7::timestamptz[])
ON CONFLICT (rule, group_key, bucket) DO UPDATE SET
    amount = c.amount + EXCLUDED.amount,
    events = c.events + EXCLUDED.events,
    first_time = least(c.first_time, EXCLUDED.first_time),
    last_time = greatest(c.last_time, EXCLUDED.last_time)
"""

# One transaction-scoped lock per (rule, group) a batch counts for, taken in one order (by
# the lock's number) before its counters: a second worker's batch for the same group waits
# for the first to commit, then its window sum sees both. Without it two batches adding to
# different buckets of one window at the same moment each see only their own part, and an
# incident split between two shards may never reach its threshold.
GROUP_LOCKS = """
SELECT pg_advisory_xact_lock(k) FROM (
    SELECT DISTINCT hashtextextended(rule || chr(31) || group_key, 31) AS k
    FROM unnest($1::text[], $2::text[]) AS t(rule, group_key)
    ORDER BY 1
) AS s
"""

WINDOW_SUMS = """
SELECT t.rule, t.group_key, t.bucket, sum(c.amount)::bigint AS amount,
       min(c.first_time) AS first_time, max(c.last_time) AS last_time
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(rule, group_key, bucket)
JOIN das.policy_counters c
  ON c.rule = t.rule AND c.group_key = t.group_key
 AND c.bucket BETWEEN t.bucket - $4::bigint + 1 AND t.bucket
GROUP BY t.rule, t.group_key, t.bucket
"""

INSERT_SEEN = """
INSERT INTO das.policy_seen (rule, group_key, value, first_seen)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
ON CONFLICT DO NOTHING
RETURNING rule, group_key, value
"""

HEAD = """
SELECT clock_timestamp() AS now,
       (SELECT alert_hash FROM das.alerts ORDER BY id DESC LIMIT 1) AS head
"""

INSERT_ALERT = """
INSERT INTO das.alerts (rule, severity, title, group_key, window_start, first_event_time,
                        last_event_time, event_count, created_at, stream_name, shard_id,
                        cluster_id, instance_id, events, prev_hash, alert_hash)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb, $15, $16)
ON CONFLICT (rule, group_key, window_start) DO NOTHING
RETURNING id
"""


@dataclass
class Candidate:
    """An alert to raise unless its identity exists already."""

    rule: Rule
    group_key: str
    window_start: datetime
    first_event_time: datetime | None
    last_event_time: datetime | None
    event_count: int
    fields: dict[str, Any]
    refs: list[EventRef] = field(default_factory=list)


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def render_title(template: str, values: Mapping[str, Any]) -> str:
    """The title template filled in; unknown or empty fields read ``?``, never an error."""
    clean = _Fields({k: ("?" if v is None or v == "" else v) for k, v in values.items()})
    try:
        return string.Formatter().vformat(template, (), clean)[:500]
    except (ValueError, IndexError, AttributeError, KeyError):
        return template[:500]


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class PolicyRecorder:
    """What the sink calls in a batch's transaction (ingest.warehouse.sink.PolicyRecorder)."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules

    async def record(
        self, conn: Conn, outputs: Sequence[PolicyOutput], stream: str, shard: str
    ) -> dict[str, int]:
        merged = PolicyOutput()
        for output in outputs:
            merged.merge(output)
        await record_policy(conn, merged, self.rules, stream, shard)
        return dict(merged.dropped)


async def record_policy(
    conn: Conn,
    output: PolicyOutput,
    rules: RuleSet,
    stream: str,
    shard: str,
) -> list[int]:
    """Add a batch's tallies and sightings to the shared state; raise the alerts they make.
    Returns the ids of the alerts created (none for identities that existed)."""
    by_name = {r.name: r for r in rules.rules}
    candidates: list[Candidate] = []
    if output.tallies:
        candidates.extend(await _thresholds(conn, output.tallies, by_name))
    if output.sightings:
        candidates.extend(await _first_seen(conn, output, by_name))
    if not candidates:
        return []
    return await insert_alerts(conn, candidates, stream, shard)


async def _thresholds(
    conn: Conn, tallies: Mapping[tuple[str, str, int], Tally], by_name: Mapping[str, Rule]
) -> list[Candidate]:
    keys = sorted(k for k in tallies if k[0] in by_name)
    if not keys:
        return []
    rows = [tallies[k] for k in keys]
    await conn.execute(GROUP_LOCKS, [k[0] for k in keys], [k[1] for k in keys])
    await conn.execute(
        UPSERT_COUNTERS,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [t.amount for t in rows],
        [t.events for t in rows],
        [t.first_time for t in rows],
        [t.last_time for t in rows],
    )
    sums = await conn.fetch(
        WINDOW_SUMS, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], BUCKETS
    )
    # An alert's window is the one holding the first event its sliding sum counts: a burst
    # across a window boundary is one alert however it was batched (a crash or a takeover
    # re-reads records in batches of their own), while an attack going on for longer raises
    # one per window it fills on its own. Per identity, the earliest bucket that reaches it.
    fired: dict[tuple[str, str, datetime], Any] = {}
    for row in sorted(sums, key=lambda r: (r["rule"], r["group_key"], r["bucket"])):
        rule = by_name[row["rule"]]
        if row["amount"] < rule.count:
            continue
        trigger = row["first_time"] or bucket_start(row["bucket"] - BUCKETS + 1, rule.window)
        fired.setdefault((row["rule"], row["group_key"], window_start(trigger, rule.window)), row)
    refs: dict[tuple[str, str], list[EventRef]] = defaultdict(list)
    fields: dict[tuple[str, str], dict[str, Any]] = {}
    for (name, key, _bucket), tally in sorted(tallies.items()):
        refs[(name, key)].extend(tally.refs)
        fields.setdefault((name, key), tally.fields)
    out: list[Candidate] = []
    for (name, key, start), row in fired.items():
        rule = by_name[name]
        out.append(
            Candidate(
                rule, key, start, row["first_time"], row["last_time"], int(row["amount"]),
                fields[(name, key)], refs[(name, key)][:MAX_REFS],
            )
        )  # fmt: skip
    # One statement over a rule's single-event limit alerts on its own (mass_read: >= 10,000
    # rows in one statement), whatever the window's sum.
    for (name, key, _bucket), tally in sorted(tallies.items()):
        limited = by_name.get(name)
        if limited is None or limited.single is None or tally.largest < limited.single:
            continue
        if tally.largest_time is None or tally.largest_ref is None:
            continue
        out.append(
            Candidate(
                limited, f"{key},statement", window_start(tally.largest_time, limited.window),
                tally.largest_time, tally.largest_time, tally.largest, tally.fields,
                [tally.largest_ref],
            )
        )  # fmt: skip
    return out


async def _first_seen(
    conn: Conn, output: PolicyOutput, by_name: Mapping[str, Rule]
) -> list[Candidate]:
    keys = sorted(k for k in output.sightings if k[0] in by_name)
    if not keys:
        return []
    starts: dict[str, datetime] = {}
    for name in sorted({k[0] for k in keys}):
        first = min(output.sightings[k].time for k in keys if k[0] == name)
        started = await conn.fetchval(
            "WITH ins AS (INSERT INTO das.policy_rule_start (rule, started_at) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING started_at) "
            "SELECT started_at FROM ins UNION ALL "
            "SELECT started_at FROM das.policy_rule_start WHERE rule = $1 LIMIT 1",
            name,
            first,
        )
        starts[name] = started
    new = await conn.fetch(
        INSERT_SEEN,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [output.sightings[k].time for k in keys],
    )
    out: list[Candidate] = []
    for row in new:
        key = (row["rule"], row["group_key"], row["value"])
        rule = by_name[key[0]]
        seen = output.sightings[key]
        if seen.time < starts[key[0]] + rule.learning:
            continue  # still learning what is normal
        assert rule.value is not None
        values = {**seen.fields, rule.value: key[2]}
        out.append(
            Candidate(
                rule, f"{key[1]},{rule.value}={key[2]}", _EPOCH, seen.time, seen.time, 1,
                values, [seen.ref],
            )
        )  # fmt: skip
    return out


async def insert_alerts(
    conn: Conn, candidates: Sequence[Candidate], stream: str | None, shard: str | None
) -> list[int]:
    """Insert the candidates whose identity is new, extending the alert chain."""
    # Most candidates of a busy group are alerts raised already (a threshold stays reached
    # for the rest of its window): leave those out before taking the chain's lock, which
    # every alert-raising commit of the fleet waits for.
    existing = await conn.fetch(
        "SELECT rule, group_key, window_start FROM das.alerts "
        "WHERE (rule, group_key, window_start) IN "
        "(SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]))",
        [c.rule.name for c in candidates],
        [c.group_key for c in candidates],
        [c.window_start for c in candidates],
    )
    known = {(r["rule"], r["group_key"], r["window_start"]) for r in existing}
    candidates = [c for c in candidates if (c.rule.name, c.group_key, c.window_start) not in known]
    if not candidates:
        return []
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", LOCK_KEY)
    head = await conn.fetchrow(HEAD)
    assert head is not None
    prev = ZERO_HASH if head["head"] is None else bytes(head["head"])
    created_at: datetime = head["now"]
    ids: list[int] = []
    for c in sorted(candidates, key=lambda c: (c.rule.name, c.group_key, c.window_start)):
        values = {
            **c.fields,
            "rule": c.rule.name,
            "severity": c.rule.severity,
            "count": c.event_count,
            "group": c.group_key,
            "window": _duration(c.rule.window),
            "gap": _duration(c.rule.gap),
        }
        events = [
            {"stream_name": stream, "shard_id": shard, "sequence_number": seq, "event_index": i}
            for seq, i in c.refs
        ]
        fields = AlertFields(
            rule=c.rule.name,
            severity=c.rule.severity,
            title=render_title(c.rule.title, values),
            group_key=c.group_key,
            window_start=c.window_start,
            first_event_time=c.first_event_time,
            last_event_time=c.last_event_time,
            event_count=c.event_count,
            created_at=created_at,
            stream_name=stream,
            shard_id=shard,
            cluster_id=c.fields.get("cluster"),
            instance_id=c.fields.get("instance"),
            events=events,
        )
        digest = alert_hash(prev, fields)
        new_id = await conn.fetchval(
            INSERT_ALERT,
            fields.rule,
            fields.severity,
            fields.title,
            fields.group_key,
            fields.window_start,
            fields.first_event_time,
            fields.last_event_time,
            fields.event_count,
            fields.created_at,
            fields.stream_name,
            fields.shard_id,
            fields.cluster_id,
            fields.instance_id,
            orjson.dumps(events).decode(),
            prev,
            digest,
        )
        if new_id is not None:
            prev = digest
            ids.append(int(new_id))
            log.info(
                "alert raised",
                extra={"rule": fields.rule, "severity": fields.severity, "alert_id": new_id},
            )
    return ids


#: Buckets of a rule older than this many windows before its newest are no longer read.
KEEP_WINDOWS = 4

PRUNE_COUNTERS = """
DELETE FROM das.policy_counters c
USING (SELECT rule, max(bucket) AS newest FROM das.policy_counters GROUP BY rule) AS n
WHERE c.rule = n.rule AND c.bucket < n.newest - $1::bigint
"""


async def prune_counters(conn: Conn) -> int:
    """Delete threshold counters no window can reach any more (older than KEEP_WINDOWS windows
    before their rule's newest bucket, in event time: a backlog read late keeps its own);
    returns how many."""
    status = await conn.execute(PRUNE_COUNTERS, KEEP_WINDOWS * BUCKETS)
    return int(status.split()[-1])
