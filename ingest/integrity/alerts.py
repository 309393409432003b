"""The alert chain (pure): every row of das.alerts is hash-linked to the one before it.

The alert text is these lines joined with ``\\n``::

    das-alert-v1
    <rule>
    <severity>
    <title>
    <group_key>
    <window_start>            (YYYY-MM-DDTHH:MM:SS.ffffffZ, like every time below)
    <first_event_time or empty>
    <last_event_time or empty>
    <event_count>
    <created_at>
    <stream_name or empty>
    <shard_id or empty>
    <cluster_id or empty>
    <instance_id or empty>
    <events as canonical JSON>

and ``alert_hash = SHA-256(prev_hash || UTF-8 alert text)``, where ``prev_hash`` is the
previous alert's (by id) ``alert_hash``, or 32 zero bytes for the first. Writers take one
advisory lock, so the chain never forks; ``verify`` walks it in id order. Its head is anchored
with KMS as the shard chains' are (``ANCHOR_STREAM``), so neither removing the newest alerts nor
rewriting the whole chain consistently goes unnoticed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from ingest.copytext import canonical_json, canonical_time
from ingest.integrity.canonical import ZERO_HASH

LOCK_KEY = "das.alerts"

#: The alert chain's head is anchored like a shard chain's (das.chain_anchors, exported by
#: ``anchor --export``), under this pseudo stream and shard: the link number is the alert's id,
#: the link hash its ``alert_hash``. A colon cannot occur in a Kinesis stream name, so no
#: stream's chain can be taken for it.
ANCHOR_STREAM = "das:alerts"
ANCHOR_SHARD = "-"


@dataclass(frozen=True)
class AlertFields:
    rule: str
    severity: str
    title: str
    group_key: str
    window_start: datetime
    first_event_time: datetime | None
    last_event_time: datetime | None
    event_count: int
    created_at: datetime
    stream_name: str | None
    shard_id: str | None
    cluster_id: str | None
    instance_id: str | None
    events: Sequence[Mapping[str, Any]]

    def text(self) -> str:
        def t(value: datetime | None) -> str:
            return "" if value is None else canonical_time(value)

        return "\n".join(
            (
                "das-alert-v1", self.rule, self.severity, self.title, self.group_key,
                t(self.window_start), t(self.first_event_time), t(self.last_event_time),
                str(self.event_count), t(self.created_at), self.stream_name or "",
                self.shard_id or "", self.cluster_id or "", self.instance_id or "",
                canonical_json(list(self.events)),
            )
        )  # fmt: skip


def alert_hash(prev: bytes, alert: AlertFields) -> bytes:
    return hashlib.sha256(prev + alert.text().encode()).digest()


def check_rows(rows: Sequence[Any]) -> list[tuple[int, str, str]]:
    """Walk das.alerts rows in id order: (id, kind, detail) for each alert whose stored fields
    do not hash to its ``alert_hash`` (``alert_altered``) or whose ``prev_hash`` is not the
    previous alert's hash (``alert_chain_broken``: alerts removed, inserted or reordered)."""
    problems: list[tuple[int, str, str]] = []
    prev = ZERO_HASH
    for row in rows:
        events = row["events"]
        fields = AlertFields(
            row["rule"], row["severity"], row["title"], row["group_key"], row["window_start"],
            row["first_event_time"], row["last_event_time"], row["event_count"],
            row["created_at"], row["stream_name"], row["shard_id"], row["cluster_id"],
            row["instance_id"], orjson.loads(events) if isinstance(events, str) else events,
        )  # fmt: skip
        stored_prev, stored_hash = bytes(row["prev_hash"]), bytes(row["alert_hash"])
        if stored_prev != prev:
            problems.append(
                (row["id"], "alert_chain_broken", "its prev_hash is not the previous alert's")
            )
        if alert_hash(stored_prev, fields) != stored_hash:
            problems.append(
                (row["id"], "alert_altered", "its fields do not hash to its alert_hash")
            )
        prev = stored_hash
    return problems
