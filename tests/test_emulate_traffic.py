"""The emulated traffic looks like Aurora's: the seed's fields, types, key order and quirks."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any

import pytest

from ingest.decode.model import FIELDS
from ingest.decode.normalize import parse_time
from ingest.emulate.traffic import (
    InnerRecord,
    Traffic,
    event_key,
    format_datetime,
    format_time,
    hash_key,
    marker,
    mysql_escape,
    record_keys,
)
from tests.seed_examples import SEED_EXAMPLES

NoneType = type(None)

# The two field tables of the seed document, with the JSON types Aurora actually sends (the
# examples: sessionId and exitCode are strings although the tables say int).
PG_TYPES: dict[str, tuple[type, ...]] = {
    "class": (str,),
    "clientApplication": (str, NoneType),
    "command": (str,),
    "commandText": (str, NoneType),
    "databaseName": (str,),
    "dbProtocol": (str,),
    "dbUserName": (str,),
    "errorMessage": (str, NoneType),
    "exitCode": (str, NoneType),
    "logTime": (str,),
    "netProtocol": (str,),
    "objectName": (str, NoneType),
    "objectType": (str, NoneType),
    "paramList": (list,),
    "pid": (int,),
    "remoteHost": (str,),
    "remotePort": (str,),
    "rowCount": (int, NoneType),
    "serverHost": (str,),
    "serverType": (str,),
    "serverVersion": (str,),
    "serviceName": (str,),
    "sessionId": (str,),
    "startTime": (str,),
    "statementId": (int,),
    "substatementId": (int,),
    "type": (str,),
}
MYSQL_TYPES: dict[str, tuple[type, ...]] = {
    **PG_TYPES,
    "commandText": (str,),
    "databaseName": (str,),
    "endTime": (str,),
    "errorMessage": (str,),
    "exitCode": (str,),
    "objectName": (str,),
    "paramList": (NoneType,),
    "rowCount": (int,),
    "transactionId": (str,),
}
PG_10_ABSENT = {"errorMessage", "startTime"}
TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00$")
MARKER_RE = re.compile(r"/\* das-emulator:(\d+):(\d+) \*/")


def generate(
    seed: int = 1, count: int = 3000, per_record: int = 7, **kwargs: Any
) -> tuple[Traffic, list[InnerRecord]]:
    traffic = Traffic(seed, **kwargs)
    return traffic, list(traffic.records(per_record, count))


def record_events(records: list[InnerRecord]) -> list[tuple[InnerRecord, int, dict[str, Any]]]:
    return [(r, i, e) for r in records for i, e in enumerate(r.events) if e["type"] == "record"]


def seed_key_order(version: str) -> list[str]:
    for example_version, text in SEED_EXAMPLES.values():
        if example_version == version:
            return list(json.loads(text)["databaseActivityEventList"][0])
    raise AssertionError(version)


def test_same_seed_same_traffic_other_seed_other_traffic() -> None:
    _, first = generate(seed=5)
    _, again = generate(seed=5)
    _, other = generate(seed=6)
    assert [r.doc for r in first] == [r.doc for r in again]
    assert json.dumps([r.doc for r in first]) != json.dumps([r.doc for r in other])


def test_records_are_one_instance_each_with_instance_partition_key() -> None:
    traffic, records = generate(instances=4)
    assert len(set(traffic.instance_ids)) == 4
    assert re.fullmatch(r"cluster-[A-Z2-7]{26}", traffic.cluster_id)
    for record in records:
        assert record.doc["type"] == "DatabaseActivityMonitoringRecord"
        assert list(record.doc) == [
            "type",
            "clusterId",
            "instanceId",
            "databaseActivityEventList",
        ]
        assert record.doc["clusterId"] == traffic.cluster_id
        assert record.partition_key == record.instance_id
        assert re.fullmatch(r"db-[A-Z2-7]{26}", record.instance_id)
        kinds = Counter(e["type"] for e in record.events)
        assert (kinds["record"], kinds["heartbeat"]) == (record.record_events, record.heartbeats)
    assert {r.instance_id for r in records} == set(traffic.instance_ids)


@pytest.mark.parametrize("instances", [2, 3, 4, 8])
def test_instances_spread_evenly_over_the_kinesis_hash_range(instances: int) -> None:
    traffic = Traffic(9, instances=instances)
    slices = [hash_key(i) * instances >> 128 for i in traffic.instance_ids]
    assert slices == list(range(instances))
    # A new 2-shard stream splits the range in halves: both shards get instances.
    assert {hash_key(i) >> 127 for i in traffic.instance_ids} == {0, 1}


def test_count_and_events_per_record_are_exact() -> None:
    _, records = generate(count=1001, per_record=10)
    data = [r for r in records if r.record_events]
    assert sum(r.record_events for r in data) == 1001
    assert [r.record_events for r in data] == [10] * 100 + [1]


def test_both_engines_and_their_versions() -> None:
    traffic, records = generate(instances=4)
    versions = {r.instance_id: r.version for r in records}
    assert [versions[i] for i in traffic.instance_ids] == ["1.1", "1.2", "1.1", "1.2"]
    _, pg_only = generate(engine="postgres", pg_version="1.0")
    assert {r.version for r in pg_only} == {"1.0"}
    _, mysql_only = generate(engine="mysql")
    assert {r.version for r in mysql_only} == {"1.2"}


@pytest.mark.parametrize(("engine", "pg_version"), [("both", "1.1"), ("postgres", "1.0")])
def test_every_field_of_the_tables_with_the_seeds_json_types(engine: str, pg_version: str) -> None:
    _, records = generate(engine=engine, pg_version=pg_version)
    seen: dict[str, set[type]] = defaultdict(set)
    for record, _, event in record_events(records):
        if record.version == "1.2":
            types = MYSQL_TYPES
        else:
            types = {
                k: v
                for k, v in PG_TYPES.items()
                if record.version == "1.1" or k not in PG_10_ABSENT
            }
        assert set(event) == set(types), set(event) ^ set(types)
        expected_order = [
            k
            for k in seed_key_order(record.version if record.version != "1.0" else "1.1")
            if k in types
        ]
        assert list(event) == expected_order
        for name, value in event.items():
            assert isinstance(value, types[name]), (name, value)
            assert not isinstance(value, bool)
            seen[f"{record.version}:{name}"].add(type(value))
        if record.version != "1.2":
            assert all(isinstance(p, str) for p in event["paramList"])
    # Nullable fields really take both shapes somewhere in the traffic.
    for version in {r.version for r in records} - {"1.2"}:
        for name in ("clientApplication", "commandText", "exitCode", "objectName", "rowCount"):
            assert seen[f"{version}:{name}"] == {str if name != "rowCount" else int, NoneType}
    # Together the engines cover every column of the warehouse's field table.
    wires = {f.wire for f in FIELDS}
    if engine == "both":
        assert {k.split(":", 1)[1] for k in seen} == wires | {"type"}


def test_times_are_das_formatted_and_ordered() -> None:
    _, records = generate()
    for _record, _, event in record_events(records):
        for name in ("logTime", "startTime", "endTime"):
            if name in event:
                assert TIME_RE.match(event[name]), event[name]
        assert event["logTime"] >= event.get("startTime", "")
        if "endTime" in event:
            assert event["endTime"] >= event["startTime"]
    assert format_time(1_558_658_389_940_668) == "2019-05-24 00:39:49.940668+00"
    stamp = parse_time("2019-05-24 00:39:49.940668+00")
    assert stamp is not None
    assert format_datetime(stamp) == "2019-05-24 00:39:49.940668+00"


def test_postgres_sessions() -> None:
    _, records = generate(engine="postgres", count=5000)
    sessions: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    commands: Counter[str] = Counter()
    for record, _, event in record_events(records):
        sessions[(record.instance_id, event["sessionId"])].append(event)
        commands[event["command"]] += 1
        epoch_hex, pid_hex = event["sessionId"].split(".")
        assert int(pid_hex, 16) == event["pid"]
        assert int(epoch_hex, 16) > 1_700_000_000
        if event["command"] in ("CONNECT", "DISCONNECT", "AUTH FAILURE"):
            assert event["commandText"] is None
            assert event["class"] == "MISC"
        else:
            assert isinstance(event["commandText"], str)
        assert (event["exitCode"] is None) == (event["errorMessage"] is None)
        if event["exitCode"] is not None:
            assert re.fullmatch(r"[0-9A-Z]{5}", event["exitCode"])
    for events in sessions.values():
        first = events[0]
        assert first["command"] in ("CONNECT", "AUTH FAILURE")
        assert first["statementId"] == 1
        if first["command"] == "AUTH FAILURE":
            assert first["exitCode"] == "28P01"
            assert len(events) == 1
        top = [e["statementId"] for e in events if e["substatementId"] == 1]
        assert top == list(range(1, len(top) + 1))
        for event in events:
            if event["substatementId"] > 1:  # statements run by a function share its id
                assert event["statementId"] in top
    assert {"CONNECT", "DISCONNECT", "AUTH FAILURE", "SELECT", "INSERT", "UPDATE"} <= set(commands)
    assert {"CREATE TABLE", "ALTER ROLE", "GRANT"} <= set(commands)
    classes = {e["class"] for _, _, e in record_events(records)}
    assert {"MISC", "READ", "WRITE", "DDL", "FUNCTION", "ROLE"} <= classes


def test_mysql_main_and_aux() -> None:
    _, records = generate(engine="mysql", count=6000, per_record=5)
    statements: dict[tuple[str, int, str, int], list[tuple[int, int, dict[str, Any]]]] = (
        defaultdict(list)
    )
    position = 0
    record_index: dict[int, int] = {}
    for index, record in enumerate(records):
        for event in record.events:
            if event["type"] != "record":
                continue
            position += 1
            assert event["class"] in ("MAIN", "AUX")
            assert event["substatementId"] == (1 if event["class"] == "MAIN" else 2)
            assert event["paramList"] is None
            if event["statementId"] == 0:
                assert event["command"] in ("CONNECT", "DISCONNECT", "FAILED_CONNECT")
                assert event["commandText"] == ""
                continue
            key = (record.instance_id, event["pid"], event["sessionId"], event["statementId"])
            statements[key].append((position, index, event))
            record_index[position] = index
    orders: Counter[str] = Counter()
    for parts in statements.values():
        mains = [p for p in parts if p[2]["class"] == "MAIN"]
        aux = [p for p in parts if p[2]["class"] == "AUX"]
        assert len(mains) <= 1
        assert len(aux) <= 3
        if not mains:  # the traffic's cut-off may leave a statement without its MAIN
            continue
        main_pos, main_record, main = mains[0]
        for aux_pos, aux_record, event in aux:
            assert event["logTime"] < main["logTime"]  # as in the seed's examples
            assert event["startTime"] == main["startTime"]
            assert event["exitCode"] == ""
            assert event["commandText"] == event["objectName"]
            assert event["objectName"] in main["objectName"].split(",")
            orders["aux first" if aux_pos < main_pos else "main first"] += 1
            if aux_record != main_record:
                orders["other record"] += 1
            if aux_pos > main_pos + len(aux):  # other statements' events came in between
                orders["late"] += 1
    assert all(orders[k] > 0 for k in ("aux first", "main first", "other record", "late")), orders
    commands = Counter(e["command"] for _, _, e in record_events(records))
    assert {"CONNECT", "QUERY", "DISCONNECT", "FAILED_CONNECT"} <= set(commands)
    assert {"READ", "WRITE", "CREATE", "DROP"} <= set(commands)
    failures = [e for _, _, e in record_events(records) if e["exitCode"] not in ("", "0")]
    assert failures
    assert all(e["errorMessage"] for e in failures)
    assert {e["exitCode"] for _, _, e in record_events(records)} >= {"0", "", "1045", "1146"}


def test_mysql_sessions_share_the_server_pid() -> None:
    _traffic, records = generate(engine="mysql", instances=2)
    pids: dict[str, set[int]] = defaultdict(set)
    for record, _, event in record_events(records):
        pids[record.instance_id].add(event["pid"])
        assert event["sessionId"].isdigit()
    assert all(len(p) == 1 for p in pids.values())
    hosts = {r.instance_id: str(r.events[0]["serverHost"]) for r in records if r.record_events}
    assert sorted(hosts.values()) == ["master", "replica-1"]


def test_awkward_sql_text_and_people() -> None:
    _, records = generate(count=5000)
    texts = [e["commandText"] or "" for _, _, e in record_events(records)]
    for needle in ("\n", "\t", "'", '"', "\\", "東京", "🚀"):
        assert any(needle in t for t in texts), needle
    assert any("\\'" in t for t in texts)  # MySQL escapes quotes with a backslash
    assert mysql_escape("""a'b"c\\d""") == """a\\'b\\"c\\\\d"""
    users = {e["dbUserName"] for _, _, e in record_events(records)}
    assert {"rdsadmin", "master"} <= users
    assert len(users - {"rdsadmin", "master"}) >= 3
    apps = {e["clientApplication"] for _, _, e in record_events(records)}
    assert "psql" in apps
    assert None in apps


def test_heartbeat_records_follow_every_kth_record_of_an_instance() -> None:
    _, records = generate(count=2000, per_record=5, heartbeat_every=4)
    since: Counter[str] = Counter()
    data: Counter[str] = Counter()
    beats: Counter[str] = Counter()
    for record in records:
        if record.heartbeats:
            assert record.record_events == 0
            assert record.events == [{"type": "heartbeat", "logTime": record.events[0]["logTime"]}]
            assert TIME_RE.match(record.events[0]["logTime"])
            assert since[record.instance_id] == 4
            since[record.instance_id] = 0
            beats[record.instance_id] += 1
        else:
            assert since[record.instance_id] < 4
            since[record.instance_id] += 1
            data[record.instance_id] += 1
    assert beats == Counter({instance: n // 4 for instance, n in data.items()})
    _, quiet = generate(count=500, heartbeat_every=0)
    assert not any(r.heartbeats for r in quiet)


def test_keys_and_markers_count_every_event_once() -> None:
    traffic, records = generate(count=8000, per_record=9)
    keys = [key for record in records for key in record_keys(record)]
    assert len(keys) == len(set(keys)) == 8000
    assert keys == traffic.expected_keys(9, 8000)
    first = records[0]
    assert event_key(first.instance_id, first.events[0]) == keys[0]
    numbers = []
    for _, _, event in record_events(records):
        found = MARKER_RE.findall(event["commandText"] or "")
        assert len(found) <= 1
        if found:
            seed, n = found[0]
            assert int(seed) == 1
            numbers.append(int(n))
            assert event["commandText"].startswith(marker(1, int(n)))
    assert len(numbers) == len(set(numbers)) > 4000


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="engine"):
        Traffic(1, "db2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"1\.0 or 1\.1"):
        Traffic(1, pg_version="1.2")
    with pytest.raises(ValueError, match="instances"):
        Traffic(1, "both", instances=1)
    with pytest.raises(ValueError, match="instances must be 4"):
        Traffic(1, "all", instances=3)
    with pytest.raises(ValueError, match="events_per_record"):
        next(Traffic(1).records(0))
