"""Evaluating a batch's events against the compiled rules (pure; runs in the decode processes).

Per event, in this order:

1. every **alert** rule's predicate is tested on the event as received (a drop or redact rule
   cannot hide an event from detection). A match adds to a :class:`Tally` for the rule, the
   group key and the time bucket (a sixth of the rule's window) of the event, or, for a first
   seen rule, a :class:`Sighting`. The warehouse side (ingest.alerts.store) adds the tallies to
   the fleet-wide counters in the batch's transaction and decides which alerts fire.
2. the first **drop** rule that matches removes the event from storage; the batch counts it per
   rule (the chain link records the counts).
3. every **redact** rule that matches rewrites ``command_text`` / ``param_list`` before the
   event is encoded; the fingerprint was taken before, from the original text.

The output is small and picklable: tallies are aggregated per batch, so a busy group costs one
counter update per batch, not one per event.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.decode.fingerprint import Fingerprint, redact
from ingest.decode.model import ActivityEvent, DecodedRecord
from ingest.policy.rules import Rule, RuleSet, load_rules
from ingest.policy.subject import Subject, field_value, subject

#: A window is counted in this many buckets: "N events within W" sums the buckets that overlap
#: the last W (so events up to W + W/BUCKETS apart may count together).
BUCKETS = 6
#: Events referenced by an alert, at most (per batch and group).
MAX_REFS = 20
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: (stream sequence number, event index): where a triggering event is stored.
EventRef = tuple[str, int]


@dataclass(slots=True)
class Tally:
    """Matching events of one rule and group key in one time bucket, within a batch."""

    amount: int = 0
    events: int = 0
    first_time: datetime | None = None
    last_time: datetime | None = None
    refs: list[EventRef] = field(default_factory=list)
    #: field values for the alert's title (the group's and the first event's)
    fields: dict[str, Any] = field(default_factory=dict)
    #: the single largest contribution (for ``single`` thresholds) and its event
    largest: int = 0
    largest_ref: EventRef | None = None
    largest_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Sighting:
    """The earliest event of a batch with a value for a first seen rule's group."""

    time: datetime
    ref: EventRef
    fields: dict[str, Any]


#: (rule, group key, bucket number) -> Tally
TallyKey = tuple[str, str, int]
#: (rule, group key, value) -> Sighting
SightingKey = tuple[str, str, str]


@dataclass(slots=True)
class PolicyOutput:
    tallies: dict[TallyKey, Tally] = field(default_factory=dict)
    sightings: dict[SightingKey, Sighting] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    redacted: int = 0

    def merge(self, other: PolicyOutput) -> None:
        """Add ``other`` to this output (``other`` is left as it was: a commit that is retried
        merges the same outputs again)."""
        for key, tally in other.tallies.items():
            mine = self.tallies.get(key)
            if mine is None:
                self.tallies[key] = dataclasses.replace(
                    tally, refs=list(tally.refs), fields=dict(tally.fields)
                )
            else:
                _add_tally(mine, tally)
        for skey, seen in other.sightings.items():
            if skey not in self.sightings or seen.time < self.sightings[skey].time:
                self.sightings[skey] = seen
        for rule, n in other.dropped.items():
            self.dropped[rule] = self.dropped.get(rule, 0) + n
        self.redacted += other.redacted


def _add_tally(mine: Tally, other: Tally) -> None:
    mine.amount += other.amount
    mine.events += other.events
    if other.first_time and (mine.first_time is None or other.first_time < mine.first_time):
        mine.first_time = other.first_time
    if other.last_time and (mine.last_time is None or other.last_time > mine.last_time):
        mine.last_time = other.last_time
    mine.refs.extend(other.refs[: MAX_REFS - len(mine.refs)])
    if other.largest > mine.largest:
        mine.largest, mine.largest_ref = other.largest, other.largest_ref
        mine.largest_time = other.largest_time


def bucket_of(stamp: datetime, window: timedelta) -> int:
    """The bucket number of a time for a window (buckets of window / BUCKETS since 1970)."""
    width = window.total_seconds() / BUCKETS
    return int(stamp.timestamp() // width) if width > 0 else 0


def bucket_start(bucket: int, window: timedelta) -> datetime:
    return _EPOCH + timedelta(seconds=bucket * window.total_seconds() / BUCKETS)


def window_start(stamp: datetime, window: timedelta) -> datetime:
    """The start of the window-long interval holding ``stamp``: an alert's identity."""
    seconds = window.total_seconds()
    n = int((stamp - _EPOCH).total_seconds() // seconds) if seconds > 0 else 0
    return _EPOCH + timedelta(seconds=n * seconds)


def group_key(keys: tuple[str, ...], s: Subject) -> tuple[str, dict[str, Any]] | None:
    """``user=bob,remote_host=10.0.0.1`` and the values; None when a key field is empty (an
    event without a user cannot be counted for "one user")."""
    if not keys:
        return "*", {}
    if len(keys) == 1:
        (name,) = keys
        one = field_value(s, name)
        if one is None or one == "":
            return None
        return f"{name}={one}", {name: one}
    values: dict[str, Any] = {}
    for key in keys:
        value = field_value(s, key)
        if value is None or value == "":
            return None
        values[key] = value
    return ",".join(f"{k}={values[k]}" for k in keys), values


class Policy:
    """A rule set compiled for the decode processes."""

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self.alerting = tuple(r for r in rules.rules if r.action == "alert" and r.per_event)
        self.dropping = tuple(r for r in rules.rules if r.action == "drop")
        self.redacting = tuple(r for r in rules.rules if r.action == "redact")

    def new_output(self) -> PolicyOutput:
        return PolicyOutput()

    def evaluate(
        self,
        event: ActivityEvent,
        record: DecodedRecord,
        fingerprint: Fingerprint | None,
        ref: EventRef,
        out: PolicyOutput,
    ) -> ActivityEvent | None:
        """Record what ``event`` means for the alert rules in ``out``; return the event to
        store (redacted if a redact rule matched) or None if a drop rule removes it."""
        s = subject(event, record, fingerprint)
        stamp = event.log_time
        # Windows are in event time: an undated event cannot be placed (the predicates are
        # pure, so not testing them changes nothing).
        if stamp is not None:
            for rule in self.alerting:
                if not rule.where(s):
                    continue
                if rule.kind == "first_seen":
                    self._sighting(rule, s, stamp, ref, out)
                else:
                    self._tally(rule, s, stamp, ref, out)
        for rule in self.dropping:
            if rule.where(s):
                out.dropped[rule.name] = out.dropped.get(rule.name, 0) + 1
                return None
        for rule in self.redacting:
            if rule.where(s):
                event = redact_event(event, rule.redact)
                out.redacted += 1
                s = subject(event, record, fingerprint)
        return event

    def _tally(
        self, rule: Rule, s: Subject, stamp: datetime, ref: EventRef, out: PolicyOutput
    ) -> None:
        amount = 1
        if rule.sum_field is not None:
            amount = int(field_value(s, rule.sum_field) or 0)
        bucket = bucket_of(stamp, rule.window)
        for keys in rule.group_by:
            found = group_key(keys, s)
            if found is None:
                continue
            key, values = found
            tkey = (rule.name, key, bucket)
            tally = out.tallies.get(tkey)
            if tally is None:
                tally = out.tallies[tkey] = Tally(fields={**title_fields(s), **values})
            tally.amount += amount
            tally.events += 1
            if tally.first_time is None or stamp < tally.first_time:
                tally.first_time = stamp
            if tally.last_time is None or stamp > tally.last_time:
                tally.last_time = stamp
            if len(tally.refs) < MAX_REFS:
                tally.refs.append(ref)
            if amount > tally.largest:
                tally.largest, tally.largest_ref, tally.largest_time = amount, ref, stamp

    def _sighting(
        self, rule: Rule, s: Subject, stamp: datetime, ref: EventRef, out: PolicyOutput
    ) -> None:
        assert rule.value is not None
        value = field_value(s, rule.value)
        if value is None or value == "":
            return
        for keys in rule.group_by:
            found = group_key(keys, s)
            if found is None:
                continue
            key, values = found
            skey = (rule.name, key, str(value))
            seen = out.sightings.get(skey)
            if seen is None or stamp < seen.time:
                out.sightings[skey] = Sighting(stamp, ref, {**title_fields(s), **values})


def title_fields(s: Subject) -> dict[str, Any]:
    """What an alert's title template may use from its first event."""
    fp = s.fingerprint
    return {
        "user": s.event.db_user_name,
        "database": s.event.database_name,
        "remote_host": s.event.remote_host,
        "client_app": s.event.client_application,
        "object": s.event.object_name,
        "command": s.event.command,
        "engine": s.engine,
        "cluster": s.record.cluster_id,
        "instance": s.record.instance_id,
        "fingerprint": fp[0][:200] if fp else None,
    }


def redact_event(event: ActivityEvent, fields: dict[str, str] | Any) -> ActivityEvent:
    """The event with its statement literals (or whole fields, mode ``hash``) replaced."""
    changes: dict[str, Any] = {}
    mode = fields.get("command_text")
    if mode and event.command_text:
        changes["command_text"] = (
            redact(event.command_text) if mode == "literals" else _hashed(event.command_text)
        )
    mode = fields.get("param_list")
    if mode and event.param_list:
        if mode == "literals":
            changes["param_list"] = ["?" for _ in event.param_list]
        else:
            changes["param_list"] = [_hashed(str(p)) for p in event.param_list]
    if not changes:
        return event
    return dataclasses.replace(event, **changes)


def _hashed(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


_compiled: dict[bytes, Policy] = {}


def policy_for(rules_text: str | None, builtins: bool = True) -> Policy:
    """The compiled policy of a rules text, once per process (the text crosses the pool with
    each batch; compiling it costs milliseconds, so it is cached by digest)."""
    key = hashlib.sha256(f"{builtins}:{rules_text or ''}".encode()).digest()
    found = _compiled.get(key)
    if found is None:
        found = _compiled[key] = Policy(load_rules(rules_text, builtins=builtins))
    return found
