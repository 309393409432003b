"""Stream health rules: an instance that stopped sending heartbeats.

DAS sends a heartbeat from every instance every few seconds, also when the database is idle;
their absence can mean the activity stream was stopped, possibly by the person it audits.
``das.heartbeats`` keeps each instance's latest one (the sink upserts it with its batch).

An instance's gap is measured against the newest heartbeat of its cluster (stream time: its
sibling instances keep the clock going, and a backlog read hours late measures the same), and,
while the shards are caught up, also against the wall clock (a whole cluster gone silent).
The alert's identity is the rule, the instance and its last heartbeat: one alert per silence.

A worker judges only the instances whose last heartbeat came through a shard it has read to
the tip with nothing left to commit (``shards``): an instance on a shard still being read (a
backlog, a shard whose lease is being taken over after a crash) is not silent, only unread, and
judging it against a sibling on a shard further ahead would raise a false alert, and another
one, with a new identity, each time its shard moved on.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ingest.alerts.store import Candidate, insert_alerts
from ingest.conn import Conn
from ingest.policy.rules import Rule, RuleSet


@dataclass(frozen=True)
class Beat:
    cluster_id: str
    instance_id: str
    last: datetime
    #: where the last heartbeat was read
    stream_name: str = ""
    shard_id: str = ""


def gaps(
    beats: Sequence[Beat], rule: Rule, *, now: datetime, caught_up: bool
) -> list[tuple[Beat, datetime]]:
    """(instance, the time its silence is measured against) for every instance silent for
    longer than the rule's gap (pure)."""
    newest: dict[str, datetime] = {}
    for beat in beats:
        if beat.cluster_id not in newest or beat.last > newest[beat.cluster_id]:
            newest[beat.cluster_id] = beat.last
    out: list[tuple[Beat, datetime]] = []
    for beat in beats:
        reference = newest[beat.cluster_id]
        if caught_up and now > reference:
            reference = now
        if reference - beat.last > rule.gap:
            out.append((beat, reference))
    return out


async def check_heartbeats(
    conn: Conn,
    rules: RuleSet,
    *,
    now: datetime,
    caught_up: bool,
    shards: Collection[tuple[str, str]] | None = None,
) -> list[int]:
    """Raise the stream health alerts due now; returns the ids of new alerts. ``shards``: the
    (stream, shard) pairs read to the tip with nothing left to commit; only instances whose
    last heartbeat came through one of them are judged (None: every instance, for a replay
    that has read everything)."""
    health = [r for r in rules.rules if r.kind == "stream_health" and r.action == "alert"]
    if not health or (shards is not None and not shards):
        return []
    rows = await conn.fetch(
        "SELECT cluster_id, instance_id, log_time, stream_name, shard_id FROM das.heartbeats "
        "WHERE log_time IS NOT NULL"
    )
    beats = [
        Beat(r["cluster_id"], r["instance_id"], r["log_time"], r["stream_name"], r["shard_id"])
        for r in rows
    ]
    candidates: list[Candidate] = []
    for rule in health:
        for beat, reference in gaps(beats, rule, now=now, caught_up=caught_up):
            if shards is not None and (beat.stream_name, beat.shard_id) not in shards:
                continue  # its shard is still being read: unread, not silent
            silence = reference - beat.last
            candidates.append(
                Candidate(
                    rule, f"instance={beat.instance_id}", beat.last, beat.last, reference, 1,
                    {"cluster": beat.cluster_id, "instance": beat.instance_id,
                     "silence": str(timedelta(seconds=int(silence.total_seconds())))},
                )
            )  # fmt: skip
    if not candidates:
        return []
    async with conn.transaction():
        return await insert_alerts(conn, candidates, None, None)
