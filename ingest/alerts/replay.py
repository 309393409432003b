"""Replaying plaintext DAS documents through the policy path, without Kinesis or KMS.

Each inner document is normalized exactly as the decode processes do (``decode_payload``),
evaluated by the compiled policy, and every ``batch_records`` records the batch's tallies,
sightings and heartbeats are committed to the warehouse with ``record_policy``, as the sink
does with a Kinesis batch. What it cannot show is what the consumer adds around it (leases,
crashes); the end-to-end tests cover that. Used by the scenario tests and by
``python -m bench.policy_fp``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from ingest.alerts.health import check_heartbeats
from ingest.alerts.store import record_policy
from ingest.decode.batch import HeartbeatRow
from ingest.decode.fingerprint import of_statement
from ingest.decode.normalize import decode_payload
from ingest.policy.evaluate import Policy, PolicyOutput
from ingest.warehouse.db import Conn
from ingest.warehouse.sink import upsert_heartbeats


class InnerRecord(Protocol):
    """A plaintext DAS document and its record version (ingest.emulate.traffic.InnerRecord)."""

    @property
    def version(self) -> str: ...

    @property
    def doc(self) -> dict[str, Any]: ...


@dataclass
class ReplayStats:
    records: int = 0
    events: int = 0
    batches: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    alert_ids: list[int] = field(default_factory=list)


async def replay(
    conn: Conn,
    records: Iterable[InnerRecord],
    policy: Policy,
    *,
    stream: str = "replay",
    shard: str = "shardId-000000000000",
    batch_records: int = 100,
    now: datetime | None = None,
) -> ReplayStats:
    """Evaluate ``records`` in batches; finally check stream health at ``now`` (not caught up
    unless ``now`` is given: stream time only)."""
    stats = ReplayStats()
    out = PolicyOutput()
    beats: list[HeartbeatRow] = []
    pending = 0
    for sequence, inner in enumerate(records, start=1):
        stats.records += 1
        record = decode_payload(orjson.dumps(inner.doc), inner.version)
        for event in record.events:
            stats.events += 1
            policy.evaluate(
                event, record, of_statement(event.command_text), (str(sequence), event.event_index),
                out,
            )  # fmt: skip
        beats.extend(
            HeartbeatRow(record.cluster_id, record.instance_id, b.log_time, str(sequence), {})
            for b in record.heartbeats
        )
        pending += 1
        if pending >= batch_records:
            await _commit(conn, policy, out, beats, stream, shard, stats)
            out, beats, pending = PolicyOutput(), [], 0
    await _commit(conn, policy, out, beats, stream, shard, stats)
    stats.alert_ids.extend(
        await check_heartbeats(
            conn, policy.rules, now=now or datetime.now(UTC), caught_up=now is not None
        )
    )
    return stats


async def _commit(
    conn: Conn,
    policy: Policy,
    out: PolicyOutput,
    beats: list[HeartbeatRow],
    stream: str,
    shard: str,
    stats: ReplayStats,
) -> None:
    async with conn.transaction():
        if beats:
            await upsert_heartbeats(conn, stream, shard, beats)
        stats.alert_ids.extend(await record_policy(conn, out, policy.rules, stream, shard))
    for rule, n in out.dropped.items():
        stats.dropped[rule] = stats.dropped.get(rule, 0) + n
    stats.batches += 1
