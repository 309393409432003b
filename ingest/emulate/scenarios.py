"""Attacks with known ground truth, injected into normal traffic (pure: no I/O, no clock).

``normal(...)`` is the emulator's traffic (ingest/emulate/traffic.py) paced like a working
database: events spread at ``rate`` events per second in business hours (less in the evening,
at night and at weekends: :func:`activity`) from ``start`` (a Monday, 09:00 UTC, inside the
default change window), instead of the generator's microseconds apart, with a heartbeat from
every instance every 10 s; the generator's schedule (migrations, the nightly ETL job, office
hours) follows that clock. The
generator fails about 3% of its logins, a rate no production database sees (it exists to
exercise the decoder); normal traffic keeps one in ``FAILED_LOGIN_KEEP`` of them, so wrong
passwords still happen, about one every minute or two at the default rate.

``scenario(name, ...)`` is that traffic with one incident injected at ``INCIDENT_AT`` into it
(time-aligned so its alerts' identities are known), and :data:`GROUND_TRUTH` says which
alerts the built-in pack must raise for it: rule, group key, severity, count.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.emulate.rds import ORACLE_VERSION, SQLSERVER_VERSION
from ingest.emulate.traffic import (
    INNER_TYPE,
    MYSQL_VERSION,
    Engine,
    InnerRecord,
    Traffic,
    format_time,
)

SCENARIOS = (
    "brute-force",
    "password-spray",
    "privilege-escalation",
    "mass-export",
    "off-hours-ddl",
    "audit-tampering",
    "stream-stopped",
)
#: Monday 2026-11-23 09:00:00 UTC.
NORMAL_START = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
#: The incident starts this long into the traffic (aligned to a minute, plus 5 s).
INCIDENT_AT = timedelta(minutes=5, seconds=5)
FAILED_LOGIN_KEEP = 50
FAILED_LOGINS = frozenset({"AUTH FAILURE", "FAILED_CONNECT"})
ATTACKER_HOST = "203.0.113.7"
SPRAY_HOST = "198.51.100.9"


@dataclass(frozen=True)
class Expected:
    rule: str
    group_key: str
    severity: str
    #: the alert's event_count at least (events, or rows for mass_read): a threshold's window
    #: may also hold background events of the same group
    count: int


def _us(stamp: datetime) -> int:
    return int(stamp.timestamp()) * 1_000_000 + stamp.microsecond


def _parse_us(text: str) -> int:
    stamp = datetime.strptime(text[:26], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    return _us(stamp)


#: A heartbeat from every instance this often (µs of the paced clock): DAS sends them every few
#: seconds, busy or idle.
HEARTBEAT_US = 10_000_000
_WEEKDAY_OF_EPOCH = 3  # 1970-01-01 was a Thursday (Monday = 0)


def activity(at_us: int) -> float:
    """The share of the peak rate a working database sees at ``at_us`` (UTC): the whole rate on
    weekdays 08:00-18:00, 40% in the early morning and evening (06:00-22:00), 10% at night,
    15% in the daytime at weekends."""
    day, second = divmod(at_us // 1_000_000, 86_400)
    hour = second // 3_600
    if (day + _WEEKDAY_OF_EPOCH) % 7 >= 5:
        return 0.15 if 8 <= hour < 20 else 0.1
    if 8 <= hour < 18:
        return 1.0
    return 0.4 if 6 <= hour < 22 else 0.1


def normal(
    seed: int = 1,
    engine: Engine = "both",
    *,
    instances: int = 2,
    count: int = 10_000,
    events_per_record: int = 10,
    rate: float = 20.0,
    start: datetime = NORMAL_START,
    daily: bool = True,
    cluster_id: str | None = None,
    stop_instance_after: timedelta | None = None,
) -> Iterator[InnerRecord]:
    """The generator's records with their events re-timed from ``start``: ``rate`` events per
    second at the busiest hours, less by :func:`activity` of the time of day and week (unless
    ``daily`` is false: always ``rate``), most failed logins removed, and a heartbeat record
    from every instance every 10 s of that clock. The generator follows the same clock for its
    schedule (migrations in the deploy slot, the nightly ETL job, office hours:
    ingest/emulate/traffic.py). ``stop_instance_after``: the last instance goes silent (no
    events, no heartbeats) that long after ``start``, as when its activity stream is stopped."""
    clock = _us(start)

    def wall_clock() -> int:
        return clock

    traffic = Traffic(
        seed, engine, instances=instances, heartbeat_every=0, cluster_id=cluster_id,
        wall_clock=wall_clock,
    )  # fmt: skip
    versions = {
        "postgres": traffic.pg_version, "mysql": MYSQL_VERSION, "oracle": ORACLE_VERSION,
        "sqlserver": SQLSERVER_VERSION,
    }  # fmt: skip
    version_of = {
        instance: versions[traffic.engine_of(index)]
        for index, instance in enumerate(traffic.instance_ids)
    }
    stop_us = None if stop_instance_after is None else _us(start + stop_instance_after)
    silent = traffic.instance_ids[-1]
    failures = itertools.count()
    last_beat = dict.fromkeys(traffic.instance_ids, clock)
    for record in traffic.records(events_per_record, count):
        kept: list[dict[str, Any]] = []
        for event in record.events:
            if event.get("command") in FAILED_LOGINS and next(failures) % FAILED_LOGIN_KEEP:
                continue
            clock += int(1_000_000 / (rate * (activity(clock) if daily else 1.0)))
            kept.append(_retimed(event, clock))
        for instance, beat in last_beat.items():
            while clock - beat >= HEARTBEAT_US:
                beat += HEARTBEAT_US
                if stop_us is not None and instance == silent and beat >= stop_us:
                    continue
                heartbeat = {"type": "heartbeat", "logTime": format_time(beat)}
                doc = {
                    "type": INNER_TYPE, "clusterId": traffic.cluster_id, "instanceId": instance,
                    "databaseActivityEventList": [heartbeat],
                }  # fmt: skip
                yield InnerRecord(version_of[instance], doc, instance, 0, 1)
            last_beat[instance] = beat
        if not kept:
            continue
        if stop_us is not None and record.instance_id == silent and clock >= stop_us:
            continue
        doc = {**record.doc, "databaseActivityEventList": kept}
        yield InnerRecord(record.version, doc, record.partition_key, len(kept), 0)


def _retimed(event: dict[str, Any], log_us: int) -> dict[str, Any]:
    out = dict(event)
    old = _parse_us(event["logTime"])
    out["logTime"] = format_time(log_us)
    for key in ("startTime", "endTime"):
        value = event.get(key)
        if isinstance(value, str) and value:
            out[key] = format_time(log_us + (_parse_us(value) - old))
    return out


def _pg_event(at_us: int, user: str, host: str, command: str, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "record",
        "class": fields.pop("class_", "MISC"),
        "clientApplication": "psql",
        "command": command,
        "commandText": None,
        "databaseName": "shop",
        "dbProtocol": "Postgres 3.0",
        "dbUserName": user,
        "errorMessage": None,
        "exitCode": None,
        "logTime": format_time(at_us),
        "netProtocol": "TCP",
        "objectName": None,
        "objectType": None,
        "paramList": [],
        "pid": 4242,
        "remoteHost": host,
        "remotePort": "50000",
        "rowCount": None,
        "serverHost": "172.31.9.9",
        "serverType": "PostgreSQL",
        "serverVersion": "2.3.1",
        "serviceName": "Amazon Aurora PostgreSQL-Compatible edition",
        "sessionId": "6a1b2c3d.1092",
        "startTime": format_time(at_us - 500),
        "statementId": 1,
        "substatementId": 1,
        "transactionId": None,
    }
    event.update(fields)
    return event


def incident(name: str, at: datetime) -> tuple[list[list[dict[str, Any]]], list[Expected]]:
    """The incident's events (in records, PostgreSQL-shaped) and the alerts it must raise."""
    t = _us(at)
    second = 1_000_000
    if name == "brute-force":
        events = [
            _pg_event(t + i * second, "admin", ATTACKER_HOST, "AUTH FAILURE",
                      exitCode="28P01",
                      errorMessage='password authentication failed for user "admin"')
            for i in range(20)
        ]  # fmt: skip
        return [events[:10], events[10:]], [
            Expected("brute_force_login", "user=admin", "high", 5),
            Expected("brute_force_login", f"remote_host={ATTACKER_HOST}", "high", 5),
        ]
    if name == "password-spray":
        users = [f"user{i:02d}" for i in range(12)]
        events = [
            _pg_event(t + i * 3 * second, user, SPRAY_HOST, "AUTH FAILURE", exitCode="28P01",
                      errorMessage=f'password authentication failed for user "{user}"')
            for i, user in enumerate(users)
        ]  # fmt: skip
        return [events], [Expected("brute_force_login", f"remote_host={SPRAY_HOST}", "high", 5)]
    if name == "privilege-escalation":
        events = [
            _pg_event(t, "intruder", ATTACKER_HOST, "CONNECT", exitCode=None),
            _pg_event(t + second, "intruder", ATTACKER_HOST, "GRANT", class_="ROLE",
                      commandText="GRANT rds_superuser TO intruder", statementId=2),
            _pg_event(t + 2 * second, "intruder", ATTACKER_HOST, "ALTER ROLE", class_="ROLE",
                      commandText="ALTER ROLE intruder CREATEROLE", statementId=3),
        ]  # fmt: skip
        return [events], []  # group key needs the instance: filled in by scenario()
    if name == "mass-export":
        events = [
            _pg_event(t, "exfil", ATTACKER_HOST, "SELECT", class_="READ",
                      commandText="SELECT * FROM public.customers", rowCount=250_000,
                      objectName="public.customers", objectType="TABLE"),
        ]  # fmt: skip
        return [events], [
            Expected("mass_read", "user=exfil", "high", 250_000),
            Expected("mass_read", "user=exfil,statement", "high", 250_000),
        ]
    if name == "off-hours-ddl":
        # Saturday 03:00 UTC, whatever the traffic's own clock says.
        night = _us(datetime(2026, 11, 28, 3, 0, tzinfo=UTC))
        events = [
            _pg_event(night, "night_owl", "10.2.3.4", "DROP TABLE", class_="DDL",
                      commandText="DROP TABLE public.orders_archive"),
        ]  # fmt: skip
        return [events], []
    if name == "audit-tampering":
        events = [
            _pg_event(t, "intruder", ATTACKER_HOST, "ALTER SYSTEM", class_="MISC",
                      commandText="ALTER SYSTEM SET log_statement = 'none'"),
            _pg_event(t + second, "intruder", ATTACKER_HOST, "SET", class_="MISC",
                      commandText="SET pgaudit.log = 'none'", statementId=2),
        ]  # fmt: skip
        return [events], []
    if name == "stream-stopped":
        return [], []
    raise ValueError(f"unknown scenario {name!r} ({', '.join(SCENARIOS)})")


def scenario_names(name: str) -> list[str]:
    """The incidents of a scenario argument: one name, or several joined by commas (each
    once); ValueError for an unknown or repeated one."""
    names = [n.strip() for n in name.split(",")]
    for n in names:
        if n not in SCENARIOS:
            raise ValueError(f"unknown scenario {n!r} ({', '.join(SCENARIOS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"scenario {name!r} names an incident twice")
    return names


def _ground_truth(
    name: str,
    chunks: list[list[dict[str, Any]]],
    expected: list[Expected],
    traffic: Traffic,
    victim: str,
) -> list[Expected]:
    if name in ("privilege-escalation", "audit-tampering", "off-hours-ddl"):
        rule = {
            "privilege-escalation": ("privilege_change", "high"),
            "audit-tampering": ("audit_tampering", "critical"),
            "off-hours-ddl": ("off_hours_ddl", "medium"),
        }[name]
        user = chunks[0][-1]["dbUserName"]
        matching = 1 if name == "off-hours-ddl" else 2
        return [Expected(rule[0], f"user={user},instance={victim}", rule[1], matching)]
    if name == "stream-stopped":
        return [Expected("heartbeat_gap", f"instance={traffic.instance_ids[-1]}", "high", 1)]
    return expected


def scenario(
    name: str | None,
    seed: int = 1,
    *,
    count: int = 40_000,
    events_per_record: int = 10,
    rate: float = 20.0,
    start: datetime = NORMAL_START,
    cluster_id: str | None = None,
) -> tuple[list[InnerRecord], list[Expected]]:
    """Normal PostgreSQL traffic of ``count`` events with the incident ``name`` injected
    ``INCIDENT_AT`` after ``start``; the alerts the built-in pack must raise for it (beyond
    what the same traffic without the incident raises). ``name`` None: the traffic alone.

    ``name`` may join several incidents with commas ("brute-force,mass-export"): all are
    injected at ``INCIDENT_AT``, one after another, each in a session of its own (pid 4242,
    4243, ...), on the two instances in turn (the first on the first, as when alone); their
    actors differ, so the ground truth is the union of theirs."""
    if name is None:
        traffic = Traffic(seed, "postgres", instances=2, cluster_id=cluster_id)
        return list(
            normal(seed, "postgres", instances=2, count=count, events_per_record=events_per_record,
                   rate=rate, start=start, cluster_id=traffic.cluster_id)
        ), []  # fmt: skip
    names = scenario_names(name)
    at = start + INCIDENT_AT
    traffic = Traffic(seed, "postgres", instances=2, cluster_id=cluster_id)
    stop = at - start if "stream-stopped" in names else None
    base = list(
        normal(seed, "postgres", instances=2, count=count, events_per_record=events_per_record,
               rate=rate, start=start, cluster_id=traffic.cluster_id, stop_instance_after=stop)
    )  # fmt: skip
    chunks: list[tuple[str, list[dict[str, Any]]]] = []
    expected: list[Expected] = []
    for index, one in enumerate(names):
        victim = traffic.instance_ids[index % len(traffic.instance_ids)]
        own, truth = incident(one, at)
        if index:
            own = [[{**e, "pid": e["pid"] + index} for e in chunk] for chunk in own]
        chunks.extend((victim, chunk) for chunk in own)
        expected.extend(_ground_truth(one, own, truth, traffic, victim))
    injected = [
        InnerRecord(
            "1.1",
            {"type": INNER_TYPE, "clusterId": traffic.cluster_id, "instanceId": victim,
             "databaseActivityEventList": chunk},
            victim, len(chunk), 0,
        )
        for victim, chunk in chunks
    ]  # fmt: skip
    # Insert the incident where the traffic's clock passes it, on the victim's partition key.
    at_us = _us(at)
    out: list[InnerRecord] = []
    pending = list(injected)
    for record in base:
        if pending and _first_time(record) >= at_us:
            out.extend(pending)
            pending = []
        out.append(record)
    out.extend(pending)
    return out, expected


def _first_time(record: InnerRecord) -> int:
    for event in record.events:
        return _parse_us(event["logTime"])
    return 0
