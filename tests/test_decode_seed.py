"""Every example event of the DAS document decodes, with each value asserted."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import pytest

from ingest.decode import ActivityEvent, decode_record
from ingest.decode.esdk import EsdkDecryptor
from ingest.decode.model import FIELDS
from tests.sealing import seal
from tests.seed_examples import SEED_EXAMPLES

DECRYPTOR = EsdkDecryptor()


def t(text: str) -> datetime:
    """'2019-05-24 00:39:49.940668' in UTC."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


PG: dict[str, Any] = {
    "server_version": "2.3.1",
    "server_type": "PostgreSQL",
    "service_name": "Amazon Aurora PostgreSQL-Compatible edition",
    "server_host": "172.31.3.192",
    "net_protocol": "TCP",
    "db_protocol": "Postgres 3.0",
    "remote_host": "172.31.3.195",
    "client_application": "psql",
    "database_name": "postgres",
    "db_user_name": "rdsadmin",
    "param_list": [],
    "exit_code": None,
    "error_message": None,
    "end_time": None,
    "transaction_id": None,
}
MYSQL = {
    "client_application": None,
    "pid": 2830,
    "remote_host": "localhost",
    "param_list": None,
    "object_type": "TABLE",
    "server_host": "master",
    "server_type": "MySQL",
    "service_name": "Amazon Aurora MySQL",
    "server_version": "MySQL 5.7.12",
    "transaction_id": "0",
    "db_protocol": "MySQL",
    "net_protocol": "TCP",
    "error_message": "",
}

EXPECTED: dict[str, tuple[str, str, dict[str, object]]] = {
    "pg_connect": (
        "cluster-4HNY5V4RRNPKKYB7ICFKE5JBQQ",
        "db-FZJTMYKCXQBUUZ6VLU7NW3ITCM",
        PG
        | {
            "start_time": t("2019-10-30 00:39:49.940668"),
            "log_time": t("2019-10-30 00:39:49.990579"),
            "statement_id": 1,
            "substatement_id": 1,
            "object_type": None,
            "command": "CONNECT",
            "object_name": None,
            "remote_port": "49804",
            "session_id": "5ce5f7f0.474b",
            "row_count": None,
            "command_text": None,
            "pid": 18251,
            "class_": "MISC",
        },
    ),
    "pg_create_table": (
        "cluster-4HNY5V4RRNPKKYB7ICFKE5JBQQ",
        "db-FZJTMYKCXQBUUZ6VLU7NW3ITCM",
        PG
        | {
            "start_time": t("2019-05-24 00:36:54.403455"),
            "log_time": t("2019-05-24 00:36:54.494235"),
            "statement_id": 2,
            "substatement_id": 1,
            "object_type": None,
            "command": "CREATE TABLE",
            "object_name": None,
            "remote_port": "34534",
            "session_id": "5ce73c6f.7e64",
            "row_count": None,
            "command_text": "create table my_table (id serial primary key, name varchar(32));",
            "pid": 32356,
            "class_": "DDL",
        },
    ),
    "pg_select": (
        "cluster-4HNY5V4RRNPKKYB7ICFKE5JBQQ",
        "db-FZJTMYKCXQBUUZ6VLU7NW3ITCM",
        PG
        | {
            "start_time": t("2019-05-24 00:39:49.920564"),
            "log_time": t("2019-05-24 00:39:49.940668"),
            "statement_id": 6,
            "substatement_id": 1,
            "object_type": "TABLE",
            "command": "SELECT",
            "object_name": "public.my_table",
            "remote_port": "34534",
            "session_id": "5ce73c6f.7e64",
            "row_count": 10,
            "command_text": "select * from my_table;",
            "pid": 32356,
            "class_": "READ",
        },
    ),
    "mysql_connect": (
        "cluster-some_id",
        "db-some_id",
        MYSQL
        | {
            "log_time": t("2020-05-22 18:07:13.267214"),
            "db_user_name": "rdsadmin",
            "database_name": "",
            "remote_port": "11053",
            "command": "CONNECT",
            "command_text": "",
            "object_name": "",
            "statement_id": 0,
            "substatement_id": 1,
            "exit_code": "0",
            "session_id": "725121",
            "row_count": 0,
            "start_time": t("2020-05-22 18:07:13.267207"),
            "end_time": t("2020-05-22 18:07:13.267213"),
            "class_": "MAIN",
        },
    ),
    "mysql_create_table_main": (
        "cluster-some_id",
        "db-some_id",
        MYSQL
        | {
            "log_time": t("2020-05-22 18:07:12.250221"),
            "db_user_name": "master",
            "database_name": "test",
            "remote_port": "11054",
            "command": "QUERY",
            "command_text": "CREATE TABLE test1 (id INT)",
            "object_name": "test1",
            "statement_id": 65459278,
            "substatement_id": 1,
            "exit_code": "0",
            "session_id": "725118",
            "row_count": 0,
            "start_time": t("2020-05-22 18:07:12.226384"),
            "end_time": t("2020-05-22 18:07:12.250222"),
            "class_": "MAIN",
        },
    ),
    "mysql_create_table_aux": (
        "cluster-some_id",
        "db-some_id",
        MYSQL
        | {
            "log_time": t("2020-05-22 18:07:12.247182"),
            "db_user_name": "master",
            "database_name": "test",
            "remote_port": "11054",
            "command": "CREATE",
            "command_text": "test1",
            "object_name": "test1",
            "statement_id": 65459278,
            "substatement_id": 2,
            "exit_code": "",
            "session_id": "725118",
            "row_count": 0,
            "start_time": t("2020-05-22 18:07:12.226384"),
            "end_time": t("2020-05-22 18:07:12.247182"),
            "class_": "AUX",
        },
    ),
    "mysql_select_main": (
        "cluster-some_id",
        "db-some_id",
        MYSQL
        | {
            "log_time": t("2020-05-22 18:29:57.986467"),
            "db_user_name": "master",
            "database_name": "test",
            "remote_port": "11054",
            "command": "QUERY",
            "command_text": "SELECT * FROM test1 WHERE id < 28",
            "object_name": "test1",
            "statement_id": 65469218,
            "substatement_id": 1,
            "exit_code": "0",
            "session_id": "726571",
            "row_count": 2,
            "start_time": t("2020-05-22 18:29:57.986364"),
            "end_time": t("2020-05-22 18:29:57.986467"),
            "class_": "MAIN",
        },
    ),
    "mysql_select_aux": (
        "cluster-some_id",
        "db-some_id",
        MYSQL
        | {
            "log_time": t("2020-05-22 18:29:57.986399"),
            "db_user_name": "master",
            "database_name": "test",
            "remote_port": "11054",
            "command": "READ",
            "command_text": "test1",
            "object_name": "test1",
            "statement_id": 65469218,
            "substatement_id": 2,
            "exit_code": "",
            "session_id": "726571",
            "row_count": 0,
            "start_time": t("2020-05-22 18:29:57.986364"),
            "end_time": t("2020-05-22 18:29:57.986399"),
            "class_": "AUX",
        },
    ),
}

ATTRS = ["class_" if f.column == "class" else f.column for f in FIELDS]


def test_every_seed_example_has_an_expectation() -> None:
    assert set(EXPECTED) == set(SEED_EXAMPLES)
    for _cluster, _instance, values in EXPECTED.values():
        # Each expectation names every column: nothing is left to a default.
        assert set(values) == set(ATTRS), set(ATTRS) ^ set(values)


@pytest.mark.parametrize("name", sorted(SEED_EXAMPLES))
def test_seed_example_decodes_exactly(name: str) -> None:
    version, inner = SEED_EXAMPLES[name]
    data_key = os.urandom(32)
    record = decode_record(seal(inner.encode(), data_key, version), data_key, DECRYPTOR)

    cluster_id, instance_id, values = EXPECTED[name]
    assert record.record_version == version
    assert record.cluster_id == cluster_id
    assert record.instance_id == instance_id
    assert record.heartbeats == []
    assert record.record_extra == {}
    assert len(record.events) == 1
    event = record.events[0]
    assert isinstance(event, ActivityEvent)
    assert event.event_index == 0
    for attr in ATTRS:
        assert getattr(event, attr) == values[attr], attr
    assert event.extra == {}
    assert event.anomalies == ()
    for stamp in (event.log_time, event.start_time, event.end_time):
        assert stamp is None or stamp.utcoffset() is not None


def test_mysql_aux_logtime_precedes_main_in_the_seed() -> None:
    """The seed's own MAIN/AUX pair has AUX earlier: correlation must not rely on order."""
    main = EXPECTED["mysql_create_table_main"][2]["log_time"]
    aux = EXPECTED["mysql_create_table_aux"][2]["log_time"]
    assert isinstance(main, datetime)
    assert isinstance(aux, datetime)
    assert aux < main
