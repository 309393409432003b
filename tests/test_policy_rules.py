"""The rules compiler and the pure evaluator (ingest/policy): table-driven, no I/O."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ingest.decode.fingerprint import of_statement
from ingest.decode.model import ActivityEvent, DecodedRecord
from ingest.policy.evaluate import (
    BUCKETS,
    Policy,
    PolicyOutput,
    bucket_of,
    policy_for,
    window_start,
)
from ingest.policy.rules import RulesError, load_rules

VERSIONS = {"postgres": "1.1", "mysql": "1.2", "oracle": "1.3", "sqlserver": "1.4"}
#: A Wednesday, 12:00 UTC.
NOON = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def ev(engine: str = "postgres", **fields: Any) -> tuple[ActivityEvent, DecodedRecord]:
    fields.setdefault("log_time", NOON)
    fields.setdefault("db_user_name", "alice")
    fields.setdefault("remote_host", "10.1.2.3")
    event = ActivityEvent(event_index=0, **fields)
    record = DecodedRecord(VERSIONS[engine], "cluster-A", "db-1", [event], [])
    return event, record


def run(policy: Policy, *events: tuple[ActivityEvent, DecodedRecord]) -> PolicyOutput:
    out = PolicyOutput()
    for n, (event, record) in enumerate(events):
        policy.evaluate(event, record, of_statement(event.command_text), (str(n), 0), out)
    return out


def only(text: str) -> Policy:
    return Policy(load_rules(text, builtins=False))


# -- predicates: one rule, one event, does it match ----------------------------------------

MATCH_CASES: list[tuple[str, dict[str, Any], bool]] = [
    # (where, event fields, matches)
    ("{user: alice}", {}, True),
    ("{user: ALICE}", {}, True),  # names compare without case
    ("{user: [bob, carol]}", {}, False),
    ("{user: {not_in: [bob]}}", {}, True),
    ("{user: {regex: '^ali'}}", {}, True),
    ("{user: {prefix: al}}", {}, True),
    ("{remote_host: 10.0.0.0/8}", {}, True),
    ("{remote_host: [192.168.0.0/16, 10.1.2.3]}", {}, True),
    ("{remote_host: {not_in: [10.0.0.0/8]}}", {}, False),
    ("{remote_host: 10.0.0.0/8}", {"remote_host": "localhost"}, False),
    ("{remote_host: localhost}", {"remote_host": "localhost"}, True),
    ("{engine: postgres}", {}, True),
    ("{engine: postgresql}", {}, True),
    ("{engine: mysql}", {}, False),
    ("{class: DDL, command: [CREATE TABLE]}", {"class_": "DDL", "command": "CREATE TABLE"}, True),
    ("{database: shop, object: orders}", {"database_name": "shop", "object_name": "orders"}, True),
    ("{client_app: psql}", {"client_application": "psql"}, True),
    ("{client_app: psql}", {}, False),  # no value: no match
    ("{client_app: {not_in: [psql]}}", {}, True),  # ...but "not" matches it
    ("{failed: true}", {"exit_code": "28P01"}, True),
    ("{failed: true}", {"exit_code": "00000"}, False),
    ("{failed: true}", {"exit_code": "0", "error_message": ""}, False),
    ("{failed: true}", {"error_message": "Access denied"}, True),
    ("{failed: false}", {}, True),
    ("{row_count: {min: 100}}", {"row_count": 100}, True),
    ("{row_count: {min: 100}}", {"row_count": 99}, False),
    ("{row_count: {max: 10}}", {}, False),
    ("{row_count: 5}", {"row_count": 5}, True),
    ("{command_text: {regex: 'pg_sleep'}}", {"command_text": "select pg_sleep(1)"}, True),
    (
        "{fingerprint: 'select * from t where id = ?'}",
        {"command_text": "SELECT * FROM t WHERE id=9"},
        True,
    ),
    ("{fingerprint: {regex: '^grant'}}", {"command_text": "/* x */ GRANT ALL ON t TO bob"}, True),
    ("{time: {between: '09:00-17:00'}}", {}, True),
    ("{time: {outside: '09:00-17:00'}}", {}, False),
    ("{time: {between: '22:00-06:00'}}", {"log_time": NOON.replace(hour=23)}, True),
    ("{time: {between: '22:00-06:00'}}", {"log_time": NOON.replace(hour=3)}, True),
    ("{time: {between: '22:00-06:00'}}", {}, False),
    ("{time: {days: [sat, sun]}}", {}, False),
    ("{time: {days: [wed]}}", {}, True),
    ("{time: {between: '09:00-17:00'}}", {"log_time": None}, False),
    ("{any: [{user: bob}, {remote_host: 10.0.0.0/8}]}", {}, True),
    ("{any: [{user: bob}, {engine: mysql}]}", {}, False),
]


@pytest.mark.parametrize(("where", "fields", "matches"), MATCH_CASES)
def test_match_predicates(where: str, fields: dict[str, Any], matches: bool) -> None:
    policy = only(f"rules: [{{name: r, where: {where}}}]")
    out = run(policy, ev(**fields))
    assert bool(out.tallies) == matches


def test_time_of_day_is_in_the_configured_time_zone() -> None:
    # 12:00 UTC is 21:00 in Tokyo: outside 09:00-17:00 there, inside in UTC.
    tokyo = only(
        "timezone: Asia/Tokyo\nrules: [{name: r, where: {time: {outside: '09:00-17:00'}}}]"
    )
    utc = only("rules: [{name: r, where: {time: {outside: '09:00-17:00'}}}]")
    assert run(tokyo, ev()).tallies
    assert not run(utc, ev()).tallies


# -- rules files: errors name their line -------------------------------------------------------

ERROR_CASES: list[tuple[str, str]] = [
    ("rules:\n  - name: Bad\n", "2: name must be a lower-case identifier"),
    ("rules:\n  - name: a\n    kind: nope\n", "3: kind must be one of"),
    ("rules:\n  - name: a\n    where: {colour: red}\n", "3: unknown field 'colour'"),
    (
        "rules:\n  - name: a\n    where:\n      remote_host: 10.0.0.0/40\n",
        "4: remote_host: '10.0.0.0/40' is not a CIDR",
    ),
    ("rules:\n  - name: a\n    where: {user: {regex: '('}}\n", "3: user: bad regular expression"),
    ("rules:\n  - name: a\n    window: soon\n", "3: 'soon' is not a duration"),
    ("rules:\n  - name: a\n    severity: urgent\n", "3: severity must be one of"),
    (
        "rules:\n  - name: a\n    kind: threshold\n    action: drop\n",
        "4: a threshold rule can only alert",
    ),
    ("rules:\n  - name: a\n  - name: a\n", "3: rule 'a' is defined twice"),
    ("builtins:\n  brute_force: false\n", "2: no built-in rule 'brute_force'"),
    ("timezone: Mars/Olympus\n", "1: unknown time zone 'Mars/Olympus'"),
    ("rules: [\n", "not valid YAML"),
    ("rules:\n  - name: a\n    kind: first_seen\n", "2: a first_seen rule names its value field"),
    ("rules:\n  - name: a\n    where: {time: {between: '9-5'}}\n", "3: '9-5' is not a time span"),
    ("rules:\n  - name: a\n    redact: [command_text]\n", "3: redact is for action: redact"),
    (
        "rules:\n  - name: a\n    action: redact\n    redact: [user]\n",
        "4: redact: 'user' cannot be redacted",
    ),
    ("rules:\n  - name: a\n    where: {engine: db2}\n", "3: engine must be one of"),
    ("rules:\n  - name: a\n    unless:\n      colour: red\n", "4: unknown field 'colour'"),
    ("rules:\n  - name: a\n    where: {time: lunch}\n", "3: time takes"),
]


@pytest.mark.parametrize(("text", "message"), ERROR_CASES)
def test_rules_errors_name_their_line(text: str, message: str) -> None:
    with pytest.raises(RulesError) as info:
        load_rules(text, "rules.yaml")
    assert any(message in e and e.startswith("rules.yaml:") for e in info.value.errors), (
        info.value.errors
    )


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(RulesError) as info:
        load_rules("rules:\n  - name: A\n  - name: b\n    severity: x\n", "f.yaml")
    assert [e.split(":")[1] for e in info.value.errors] == ["2", "4"]


# -- the built-in pack ----------------------------------------------------------------------

BUILTINS = {
    "brute_force_login": ("threshold", "high", 5, timedelta(seconds=60)),
    "privilege_change": ("match", "high", 1, timedelta(minutes=10)),
    "audit_tampering": ("match", "critical", 1, timedelta(minutes=10)),
    "mass_read": ("threshold", "high", 100_000, timedelta(minutes=10)),
    "off_hours_ddl": ("match", "medium", 1, timedelta(hours=1)),
    "new_client_host": ("first_seen", "low", 1, timedelta(minutes=1)),
    "heartbeat_gap": ("stream_health", "high", 1, timedelta(minutes=1)),
}


def test_the_builtin_pack_is_on_by_default_with_its_defaults() -> None:
    rules = load_rules(None).rules
    got = {r.name: (r.kind, r.severity, r.count, r.window) for r in rules}
    assert got == BUILTINS
    assert load_rules(None).by_name("mass_read").single == 10_000
    assert load_rules(None).by_name("heartbeat_gap").gap == timedelta(minutes=5)
    assert load_rules(None).by_name("new_client_host").learning == timedelta(days=1)


TEAM = """
change_window: {days: [mon, tue, wed, thu, fri], hours: "08:00-18:00"}
builtins:
  privilege_change:
    unless: {user: deploy, remote_host: 10.9.0.0/24, time: change_window}
"""
GRANT = {"command_text": "GRANT SELECT ON t TO report_user", "class_": "ROLE"}


@pytest.mark.parametrize(
    ("fields", "alerts"),
    [
        ({"db_user_name": "deploy", "remote_host": "10.9.0.12"}, False),  # the exempted job
        ({"db_user_name": "alice", "remote_host": "10.9.0.12"}, True),  # someone else
        ({"db_user_name": "deploy", "remote_host": "10.1.2.3"}, True),  # from elsewhere
        # outside the file's window (08:00-18:00, not the default 07:00-19:00), at the weekend
        ({"db_user_name": "deploy", "remote_host": "10.9.0.12",
          "log_time": NOON.replace(hour=7, minute=30)}, True),
        ({"db_user_name": "deploy", "remote_host": "10.9.0.12",
          "log_time": NOON + timedelta(days=3)}, True),
    ],
)  # fmt: skip
def test_unless_exempts_only_what_it_names_and_keeps_the_builtins_where(
    fields: dict[str, Any], alerts: bool
) -> None:
    policy = Policy(load_rules(TEAM))
    assert bool(run(policy, ev(**{**GRANT, **fields})).tallies) == alerts
    # the built-in's own where still applies: a SELECT by anyone is no privilege change
    assert not run(policy, ev(command_text="SELECT 1", db_user_name="alice")).tallies
    # a later file replaces an exemption whole (it is a condition, never merged)
    rule = load_rules("builtins:\n  privilege_change: {unless: {user: etl}}\n").by_name(
        "privilege_change"
    )
    assert rule.spec["unless"] == {"user": "etl"}


def test_time_change_window_is_the_files_window_or_the_default() -> None:
    inside = NOON.replace(hour=7, minute=30)  # Wednesday 07:30
    default = only("rules: [{name: r, where: {time: change_window}}]")
    narrow = only(
        "change_window: {hours: '08:00-18:00'}\nrules: [{name: r, where: {time: change_window}}]"
    )
    outside = only("rules: [{name: r, where: {time: outside_change_window}}]")
    assert run(default, ev(log_time=inside)).tallies
    assert not run(narrow, ev(log_time=inside)).tallies
    assert not run(outside, ev(log_time=inside)).tallies
    assert run(outside, ev(log_time=NOON + timedelta(days=3))).tallies  # Saturday


def test_builtins_can_be_disabled_and_tuned() -> None:
    rules = load_rules(
        "builtins:\n  off_hours_ddl: false\n  heartbeat_gap: {enabled: false}\n"
        "  brute_force_login: {count: 10, window: 2m, severity: critical}\n"
    )
    names = [r.name for r in rules.rules]
    assert "off_hours_ddl" not in names
    assert "heartbeat_gap" not in names
    brute = rules.by_name("brute_force_login")
    assert (brute.count, brute.window, brute.severity) == (10, timedelta(minutes=2), "critical")
    assert brute.group_by == (("user",), ("remote_host",))  # untouched settings stay


# Engine-aware built-ins: (rule, engine, event fields) that must match, and that must not.
FIRES: list[tuple[str, str, dict[str, Any]]] = [
    ("brute_force_login", "postgres", {"command": "AUTH FAILURE", "exit_code": "28P01"}),
    ("brute_force_login", "mysql", {"command": "FAILED_CONNECT", "exit_code": "1045"}),
    ("brute_force_login", "oracle", {"command": "LOGON", "exit_code": "1017"}),
    ("brute_force_login", "sqlserver", {"command": "LOGIN FAILED"}),
    # SQL Server's succeeded flag: 0 is a failure
    ("brute_force_login", "sqlserver", {"command": "LOGIN SUCCEEDED", "exit_code": "0"}),
    ("privilege_change", "sqlserver", {"command": "ADD MEMBER", "exit_code": "1"}),
    (
        "privilege_change",
        "sqlserver",
        {"command_text": "DENY SELECT ON t TO eve", "exit_code": "1"},
    ),
    (
        "privilege_change",
        "postgres",
        {"command": "GRANT", "command_text": "GRANT SELECT ON t TO eve"},
    ),
    (
        "privilege_change",
        "mysql",
        {"command": "QUERY", "command_text": "/* c */ grant all on *.* to 'eve'@'%'"},
    ),
    ("privilege_change", "postgres", {"command_text": "ALTER ROLE eve SUPERUSER"}),
    ("privilege_change", "postgres", {"command_text": "CREATE USER eve PASSWORD 'x'"}),
    ("privilege_change", "oracle", {"command_text": "GRANT DBA TO eve"}),
    (
        "privilege_change",
        "sqlserver",
        {"command_text": "ALTER SERVER ROLE sysadmin ADD MEMBER eve"},
    ),
    ("privilege_change", "sqlserver", {"command_text": "EXEC sp_addrolemember 'db_owner', 'eve'"}),
    ("audit_tampering", "postgres", {"command_text": "ALTER SYSTEM SET log_statement = 'none'"}),
    ("audit_tampering", "postgres", {"command_text": "SET pgaudit.log = 'none'"}),
    ("audit_tampering", "postgres", {"command_text": "ALTER ROLE eve SET pgaudit.log TO 'none'"}),
    ("audit_tampering", "postgres", {"command_text": "DROP EXTENSION pgaudit"}),
    ("audit_tampering", "mysql", {"command_text": "SET GLOBAL general_log = 0"}),
    ("audit_tampering", "mysql", {"command_text": "SET @@global.server_audit_logging = OFF"}),
    ("audit_tampering", "mysql", {"command_text": "UNINSTALL PLUGIN server_audit"}),
    ("audit_tampering", "oracle", {"command_text": "NOAUDIT ALL"}),
    ("audit_tampering", "oracle", {"command_text": "DROP AUDIT POLICY pol1"}),
    ("audit_tampering", "oracle", {"command": "NOAUDIT"}),
    ("audit_tampering", "sqlserver", {"command_text": "ALTER SERVER AUDIT a WITH (STATE = OFF)"}),
    ("audit_tampering", "sqlserver", {"command_text": "DROP DATABASE AUDIT SPECIFICATION s"}),
    (
        "off_hours_ddl",
        "postgres",
        {"command_text": "DROP TABLE t", "log_time": NOON.replace(hour=23)},
    ),
    (
        "off_hours_ddl",
        "mysql",
        {"command_text": "ALTER TABLE t ADD c INT", "log_time": NOON + timedelta(days=3)},
    ),
]
SILENT: list[tuple[str, str, dict[str, Any]]] = [
    ("brute_force_login", "postgres", {"command": "CONNECT"}),
    ("brute_force_login", "mysql", {"command": "CONNECT", "exit_code": "0"}),
    ("brute_force_login", "sqlserver", {"command": "LOGIN SUCCEEDED", "exit_code": "1"}),
    ("brute_force_login", "oracle", {"command": "LOGON", "exit_code": "0"}),
    ("privilege_change", "sqlserver", {"command": "GRANT", "exit_code": "0"}),  # refused
    ("privilege_change", "postgres", {"command_text": "SELECT grant_id FROM grants"}),
    ("privilege_change", "postgres", {"command_text": "GRANT x TO y", "error_message": "denied"}),
    ("audit_tampering", "postgres", {"command_text": "SET search_path TO public"}),
    ("audit_tampering", "mysql", {"command_text": "SET autocommit=1"}),
    ("audit_tampering", "mysql", {"command_text": "SELECT * FROM audit_log"}),
    ("audit_tampering", "mysql", {"command_text": "SHOW VARIABLES LIKE 'general_log'"}),
    ("off_hours_ddl", "postgres", {"command_text": "DROP TABLE t"}),  # Wednesday noon
    ("off_hours_ddl", "postgres", {"command_text": "SELECT 1", "log_time": NOON.replace(hour=23)}),
    ("mass_read", "postgres", {"command_text": "SELECT 1", "row_count": 0}),
]


@pytest.mark.parametrize(("rule", "engine", "fields"), FIRES)
def test_builtin_matches(rule: str, engine: str, fields: dict[str, Any]) -> None:
    out = run(policy_for(None), ev(engine, **fields))
    assert rule in {key[0] for key in out.tallies}


@pytest.mark.parametrize(("rule", "engine", "fields"), SILENT)
def test_builtin_stays_silent(rule: str, engine: str, fields: dict[str, Any]) -> None:
    out = run(policy_for(None), ev(engine, **fields))
    assert rule not in {key[0] for key in out.tallies}


def test_threshold_groups_by_each_key_set_and_buckets_by_event_time() -> None:
    policy = policy_for(None)
    failures = [
        ev(command="AUTH FAILURE", exit_code="28P01", log_time=NOON + timedelta(seconds=i),
           db_user_name=user)
        for i, user in enumerate(["a", "b", "c", "a"])
    ]  # fmt: skip
    out = run(policy, *failures)
    brute = {k: v for k, v in out.tallies.items() if k[0] == "brute_force_login"}
    by_group: dict[str, int] = {}
    for (_, key, _), tally in brute.items():
        by_group[key] = by_group.get(key, 0) + tally.amount
    assert by_group == {"user=a": 2, "user=b": 1, "user=c": 1, "remote_host=10.1.2.3": 4}
    tally = brute[("brute_force_login", "user=a", bucket_of(NOON, timedelta(seconds=60)))]
    assert tally.refs == [("0", 0), ("3", 0)]
    assert tally.first_time == NOON
    assert tally.last_time == NOON + timedelta(seconds=3)


def test_sum_thresholds_add_the_field_and_keep_the_largest_event() -> None:
    out = run(
        policy_for(None),
        ev(command_text="SELECT * FROM t", row_count=40),
        ev(command_text="SELECT * FROM t", row_count=12_000),
    )
    ((key, tally),) = [(k, v) for k, v in out.tallies.items() if k[0] == "mass_read"]
    assert key[1] == "user=alice"
    assert (tally.amount, tally.events, tally.largest, tally.largest_ref) == (
        12_040,
        2,
        12_000,
        ("1", 0),
    )


def test_drop_removes_and_counts_redact_rewrites_detection_sees_the_original() -> None:
    policy = Policy(
        load_rules(
            "rules:\n"
            "  - {name: noise, where: {user: rdsadmin}, action: drop}\n"
            "  - {name: pii, where: {database: hr}, action: redact}\n"
            "  - {name: hashed, where: {database: vault}, action: redact,"
            " redact: {command_text: hash}}\n"
            "  - {name: watch_admin, where: {user: rdsadmin}}\n"
        )
    )
    out = PolicyOutput()
    admin, rec = ev(db_user_name="rdsadmin", command_text="SELECT 1")
    assert policy.evaluate(admin, rec, None, ("1", 0), out) is None
    assert out.dropped == {"noise": 1}
    assert "watch_admin" in {k[0] for k in out.tallies}  # a drop cannot hide an event
    hr, rec = ev(database_name="hr", command_text="SELECT * FROM p WHERE ssn = '123'",
                 param_list=["123", 4])  # fmt: skip
    stored = policy.evaluate(hr, rec, of_statement(hr.command_text), ("2", 0), out)
    assert stored is not None
    assert stored.command_text == "SELECT * FROM p WHERE ssn = ?"
    assert stored.param_list == ["?", "?"]
    assert out.redacted == 1
    vault, rec = ev(database_name="vault", command_text="SELECT 'secret'")
    stored = policy.evaluate(vault, rec, None, ("3", 0), out)
    assert stored is not None
    assert stored.command_text is not None
    assert stored.command_text.startswith("sha256:")
    assert "secret" not in stored.command_text


def test_first_seen_records_the_earliest_sighting_per_value() -> None:
    policy = policy_for(None)
    out = run(
        policy,
        ev(command="CONNECT", remote_host="10.9.9.9", log_time=NOON + timedelta(seconds=5)),
        ev(command="CONNECT", remote_host="10.9.9.9", log_time=NOON),
        ev(command="CONNECT", remote_host="10.8.8.8"),
        ev(command="CONNECT", remote_host=""),
    )
    seen = {k: v.time for k, v in out.sightings.items() if k[0] == "new_client_host"}
    assert seen == {
        ("new_client_host", "user=alice", "10.9.9.9"): NOON,
        ("new_client_host", "user=alice", "10.8.8.8"): NOON,
    }


def test_windows_and_buckets() -> None:
    window = timedelta(seconds=60)
    assert window_start(NOON + timedelta(seconds=59), window) == NOON
    assert window_start(NOON + timedelta(seconds=60), window) == NOON + window
    assert bucket_of(NOON + timedelta(seconds=10), window) == bucket_of(NOON, window) + 1
    assert BUCKETS == 6


def test_undated_events_are_not_counted_but_are_still_dropped() -> None:
    policy = Policy(load_rules("rules: [{name: n, action: drop}, {name: a}]", builtins=False))
    out = run(policy, ev(log_time=None))
    assert out.tallies == {}
    assert out.dropped == {"n": 1}


# -- the rules command ----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ingest", *args], capture_output=True, text=True, timeout=60
    )


def test_rules_check_prints_each_error_with_its_line_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: Bad\n  - name: ok\n    where: {colour: red}\n")
    result = _cli("rules", "check", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0].startswith(f"{bad}:2: name must be")
    assert result.stderr.splitlines()[1].startswith(f"{bad}:4: unknown field 'colour'")
    assert "Traceback" not in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("builtins: {off_hours_ddl: false}\nrules: [{name: noise, action: drop}]\n")
    result = _cli("rules", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert "7 rules in effect (6 built-in, 1 from the file)" in result.stdout
    missing = _cli("rules", "check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert len(missing.stderr.splitlines()) == 1


def test_rules_list_shows_the_effective_rules(tmp_path: Path) -> None:
    tuned = tmp_path / "rules.yaml"
    tuned.write_text("builtins: {mass_read: {count: 5000}}\nrules: [{name: noise, action: drop}]\n")
    result = _cli("rules", "list", "--json", "--rules", str(tuned))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in rows] == [*BUILTINS, "noise"]
    mass = next(r for r in rows if r["name"] == "mass_read")
    assert (mass["count"], mass["single"], mass["window"]) == (5000, 10_000, "10m")
    assert rows[-1] == {"name": "noise", "kind": "match", "action": "drop", "builtin": False}


def test_merging_outputs_leaves_them_unchanged() -> None:
    """A commit retried after a transient fault merges the same outputs again."""
    policy = policy_for(None)
    failures = [
        ev(command="AUTH FAILURE", exit_code="28P01", log_time=NOON + timedelta(seconds=i))
        for i in range(3)
    ]
    a, b = run(policy, *failures[:2]), run(policy, failures[2])
    for _ in range(2):
        merged = PolicyOutput()
        merged.merge(a)
        merged.merge(b)
        amounts = {k[1]: t.amount for k, t in merged.tallies.items() if k[0] == "brute_force_login"}
        assert amounts == {"user=alice": 3, "remote_host=10.1.2.3": 3}
    assert sum(t.amount for t in a.tallies.values() if True) == 4  # untouched: 2 per group
