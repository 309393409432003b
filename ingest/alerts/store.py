"""Policy state and alerts in the warehouse, in the caller's transaction.

The decode processes hand over what a batch's events mean for the rules (a
:class:`~ingest.policy.evaluate.PolicyOutput`: tallies per rule, group and bucket; first
sightings). Here, in the batch's commit transaction:

1. the tallies are added to ``das.policy_counters`` (sorted, so two workers updating the same
   groups never deadlock), and each touched group's sum over the last window is read back: a
   threshold reached makes an alert candidate (a match rule is a threshold of 1). A lock per
   group, taken first, makes a concurrent batch of the same group wait for this one, so its
   sum counts both;
2. sightings are inserted into ``das.policy_seen``; a value the fleet had not seen, after the
   rule's learning period, makes a candidate;
3. candidates are inserted into ``das.alerts`` with their identity (rule, group key, window)
   unique: a batch evaluated again after a crash or a lease takeover finds its alerts there
   and adds none. Each new alert extends the alert chain (ingest.integrity.alerts).

Round trips are what a commit waits for (the machine is shared; every statement waits for
the worker's event loop and PostgreSQL to be scheduled), so steps 1 and 2 are one call of
das.record_policy_state (migration 0040) and step 3 is, per batch, one existence check and,
only when an identity is new, the chain's lock, its head and one multi-row insert.

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
from ingest.errors import IngestError
from ingest.integrity.alerts import LOCK_KEY, AlertFields, alert_hash
from ingest.integrity.canonical import ZERO_HASH
from ingest.policy.evaluate import (
    BUCKETS,
    EventRef,
    PolicyOutput,
    Sighting,
    Tally,
    bucket_start,
    window_start,
)
from ingest.policy.rules import Rule, RuleSet

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_REFS = 20

#: The counters upsert, their window sums, the first seen rules' starts and the first
#: sightings: one call, one round trip (migrations/0040_policy_state_function.sql).
RECORD_STATE = """
SELECT o_kind, o_rule, o_group_key, o_bucket, o_value, o_amount, o_first_time, o_last_time
FROM das.record_policy_state($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                             $6::timestamptz[], $7::timestamptz[], $8::bigint,
                             $9::text[], $10::timestamptz[],
                             $11::text[], $12::text[], $13::text[], $14::timestamptz[])
"""

#: Which of a batch's alert identities exist (before the chain's lock: most do).
EXISTING = """
SELECT rule, group_key, window_start FROM das.alerts
WHERE (rule, group_key, window_start) IN
      (SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]))
"""

#: Under the chain's lock: the time, the chain's head, and which of the candidates (by
#: position) an alert committed since the check before the lock holds already.
HEAD = """
SELECT clock_timestamp() AS now,
       (SELECT alert_hash FROM das.alerts ORDER BY id DESC LIMIT 1) AS head,
       ARRAY(SELECT c.n FROM unnest($1::text[], $2::text[], $3::timestamptz[])
                             WITH ORDINALITY AS c(rule, group_key, window_start, n)
             WHERE EXISTS (SELECT 1 FROM das.alerts a
                           WHERE a.rule = c.rule AND a.group_key = c.group_key
                             AND a.window_start = c.window_start)) AS taken
"""

#: The new alerts of a batch in chain order (ids follow it), one statement.
INSERT_ALERTS = """
INSERT INTO das.alerts (rule, severity, title, group_key, window_start, first_event_time,
                        last_event_time, event_count, created_at, stream_name, shard_id,
                        cluster_id, instance_id, events, prev_hash, alert_hash)
SELECT rule, severity, title, group_key, window_start, first_event_time, last_event_time,
       event_count, $9, $10, $11, cluster_id, instance_id, events::jsonb, prev_hash,
       alert_hash
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
            $6::timestamptz[], $7::timestamptz[], $8::bigint[], $12::text[], $13::text[],
            $14::text[], $15::bytea[], $16::bytea[])
     WITH ORDINALITY AS a(rule, severity, title, group_key, window_start, first_event_time,
                          last_event_time, event_count, cluster_id, instance_id, events,
                          prev_hash, alert_hash, n)
ORDER BY n
ON CONFLICT (rule, group_key, window_start) DO NOTHING
RETURNING id
"""


class AlertChainConflict(IngestError):
    """An alert identity was taken by another transaction although every insert holds the
    chain's lock: the batch's transaction rolls back and is retried."""

    retriable = True


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
        if len(outputs) == 1:
            merged = outputs[0]  # record_policy only reads it (a retried commit reads it again)
        else:
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
    """Add a batch's tallies and sightings to the shared state (one round trip:
    das.record_policy_state); raise the alerts they make. Returns the ids of the alerts
    created (none for identities that existed). ``output`` is not changed."""
    by_name = {r.name: r for r in rules.rules}
    tallies = output.tallies
    sightings = output.sightings
    # Sorted, so two workers updating the same groups never deadlock.
    keys = sorted(k for k in tallies if k[0] in by_name)
    seen_keys = sorted(k for k in sightings if k[0] in by_name)
    if not keys and not seen_keys:
        return []
    first: dict[str, datetime] = {}
    for key in seen_keys:
        stamp = sightings[key].time
        if key[0] not in first or stamp < first[key[0]]:
            first[key[0]] = stamp
    started = sorted(first)
    rows = [tallies[k] for k in keys]
    found = await conn.fetch(
        RECORD_STATE,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [t.amount for t in rows],
        [t.events for t in rows],
        [t.first_time for t in rows],
        [t.last_time for t in rows],
        BUCKETS,
        started,
        [first[name] for name in started],
        [k[0] for k in seen_keys],
        [k[1] for k in seen_keys],
        [k[2] for k in seen_keys],
        [sightings[k].time for k in seen_keys],
    )
    sums = [r for r in found if r["o_kind"] == "sum"]
    starts: dict[str, datetime] = {}
    for row in found:
        if row["o_kind"] == "start":
            starts.setdefault(row["o_rule"], row["o_first_time"])
    new = [r for r in found if r["o_kind"] == "seen"]
    candidates = _thresholds(sums, tallies, by_name) if keys else []
    candidates.extend(_first_seen(new, starts, sightings, by_name))
    if not candidates:
        return []
    return await insert_alerts(conn, candidates, stream, shard)


def _thresholds(
    sums: Sequence[Any],
    tallies: Mapping[tuple[str, str, int], Tally],
    by_name: Mapping[str, Rule],
) -> list[Candidate]:
    """Candidates from the window sums of the batch's groups (and single-event limits)."""
    # An alert's window is the one holding the first event its sliding sum counts: a burst
    # across a window boundary is one alert however it was batched (a crash or a takeover
    # re-reads records in batches of their own), while an attack going on for longer raises
    # one per window it fills on its own. Per identity, the earliest bucket that reaches it.
    fired: dict[tuple[str, str, datetime], Any] = {}
    for row in sorted(sums, key=lambda r: (r["o_rule"], r["o_group_key"], r["o_bucket"])):
        rule = by_name[row["o_rule"]]
        if row["o_amount"] < rule.count:
            continue
        trigger = row["o_first_time"] or bucket_start(row["o_bucket"] - BUCKETS + 1, rule.window)
        fired.setdefault(
            (row["o_rule"], row["o_group_key"], window_start(trigger, rule.window)), row
        )
    refs: dict[tuple[str, str], list[EventRef]] = defaultdict(list)
    fields: dict[tuple[str, str], dict[str, Any]] = {}
    ordered = sorted(tallies.items())
    if fired:
        for (name, key, _bucket), tally in ordered:
            refs[(name, key)].extend(tally.refs)
            fields.setdefault((name, key), tally.fields)
    out: list[Candidate] = []
    for (name, key, start), row in fired.items():
        rule = by_name[name]
        out.append(
            Candidate(
                rule, key, start, row["o_first_time"], row["o_last_time"], int(row["o_amount"]),
                fields[(name, key)], refs[(name, key)][:MAX_REFS],
            )
        )  # fmt: skip
    # One statement over a rule's single-event limit alerts on its own (mass_read: >= 10,000
    # rows in one statement), whatever the window's sum.
    for (name, key, _bucket), tally in ordered:
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


def _first_seen(
    new: Sequence[Any],
    starts: Mapping[str, datetime],
    sightings: Mapping[tuple[str, str, str], Sighting],
    by_name: Mapping[str, Rule],
) -> list[Candidate]:
    """Candidates from the values the fleet had not seen, after each rule's learning."""
    out: list[Candidate] = []
    for row in sorted(new, key=lambda r: (r["o_rule"], r["o_group_key"], r["o_value"])):
        key = (row["o_rule"], row["o_group_key"], row["o_value"])
        rule = by_name[key[0]]
        seen = sightings[key]
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
        EXISTING,
        [c.rule.name for c in candidates],
        [c.group_key for c in candidates],
        [c.window_start for c in candidates],
    )
    known = {(r["rule"], r["group_key"], r["window_start"]) for r in existing}
    fresh: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.rule.name, c.group_key, c.window_start)):
        identity = (c.rule.name, c.group_key, c.window_start)
        if identity not in known:
            known.add(identity)  # the first of equal identities is the one inserted
            fresh.append(c)
    if not fresh:
        return []
    # Every insert into das.alerts holds this lock: under it, the identities found taken
    # below stay taken and the rest stay free until this transaction ends.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", LOCK_KEY)
    head = await conn.fetchrow(
        HEAD,
        [c.rule.name for c in fresh],
        [c.group_key for c in fresh],
        [c.window_start for c in fresh],
    )
    assert head is not None
    taken = set(head["taken"])  # committed since the check before the lock
    fresh = [c for n, c in enumerate(fresh, 1) if n not in taken]
    if not fresh:
        return []
    prev = ZERO_HASH if head["head"] is None else bytes(head["head"])
    created_at: datetime = head["now"]
    rows: list[tuple[AlertFields, str, bytes, bytes]] = []
    for c in fresh:
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
        rows.append((fields, orjson.dumps(events).decode(), prev, digest))
        prev = digest
    found = await conn.fetch(
        INSERT_ALERTS,
        [f.rule for f, *_ in rows],
        [f.severity for f, *_ in rows],
        [f.title for f, *_ in rows],
        [f.group_key for f, *_ in rows],
        [f.window_start for f, *_ in rows],
        [f.first_event_time for f, *_ in rows],
        [f.last_event_time for f, *_ in rows],
        [f.event_count for f, *_ in rows],
        created_at,
        stream,
        shard,
        [f.cluster_id for f, *_ in rows],
        [f.instance_id for f, *_ in rows],
        [events for _, events, _, _ in rows],
        [p for _, _, p, _ in rows],
        [d for *_, d in rows],
    )
    if len(found) != len(rows):
        # Cannot happen while every insert holds the lock; the chain computed above would
        # skip a row, so nothing of this batch may commit (the commit is retried).
        raise AlertChainConflict(
            f"{len(rows) - len(found)} of {len(rows)} alert identities taken under the lock"
        )
    ids = sorted(int(r["id"]) for r in found)
    for (fields, *_), new_id in zip(rows, ids, strict=True):
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
