"""RDS for Oracle (record version 1.3) and RDS for SQL Server (1.4) events, built from the
field tables of the Amazon RDS User Guide ("databaseActivityEventList fields for Amazon RDS for
Oracle / for Amazon RDS for SQL Server"), not from AWS's example events (the Oracle one misses a
comma, the SQL Server one has a malformed ``additional_information`` and repeats keys).

Each field table is listed here (``ORACLE_FIELDS``, ``SQLSERVER_FIELDS``) with the column it lands
in; the builders fill every field with a value of the documented type and shape.
"""

from __future__ import annotations

from typing import Any

import orjson

#: Oracle's table: wire field -> column (type: structural).
ORACLE_FIELDS: dict[str, str] = {
    "class": "class",
    "clientApplication": "client_application",
    "command": "command",
    "commandText": "command_text",
    "databaseName": "database_name",
    "dbid": "dbid",
    "dbProtocol": "db_protocol",
    "dbUserName": "db_user_name",
    "endTime": "end_time",
    "engineNativeAuditFields": "engine_native_audit_fields",
    "errorMessage": "error_message",
    "exitCode": "exit_code",
    "logTime": "log_time",
    "netProtocol": "net_protocol",
    "objectName": "object_name",
    "objectType": "object_type",
    "paramList": "param_list",
    "pid": "pid",
    "remoteHost": "remote_host",
    "remotePort": "remote_port",
    "rowCount": "row_count",
    "serverHost": "server_host",
    "serverType": "server_type",
    "serverVersion": "server_version",
    "serviceName": "service_name",
    "sessionId": "session_id",
    "startTime": "start_time",
    "statementId": "statement_id",
    "substatementId": "substatement_id",
    "transactionId": "transaction_id",
}

#: SQL Server's table (``type`` is consumed structurally; statementId is hex text).
SQLSERVER_FIELDS: dict[str, str] = {
    **{k: v for k, v in ORACLE_FIELDS.items() if k != "dbid"},
    "statementId": "statement_id_text",
}

#: UNIFIED_AUDIT_TRAIL columns RDS for Oracle sends with --engine-native-audit-fields-included
#: (a sample of the documented list).
ORACLE_NATIVE: dict[str, Any] = {
    "UNIFIED_AUDIT_POLICIES": "TEST_POL_EVERYTHING",
    "FGA_POLICY_NAME": None,
    "SYSTEM_PRIVILEGE_USED": "CREATE SESSION",
    "AUTHENTICATION_TYPE": "(TYPE=(DATABASE));(CLIENT ADDRESS=((PROTOCOL=tcp)"
    "(HOST=10.0.0.7)(PORT=25440)));",
    "INSTANCE_ID": 1,
    "ENTRY_ID": 12,
    "OS_USERNAME": "rdsdb",
    "TERMINAL": "pts/1",
    "USERHOST": "ip-10-13-0-122",
    "PROXY_SESSIONID": 0,
    "SCN": 5133083,
    "CURRENT_USER": "TEST",
}

#: fn_get_audit_file columns RDS for SQL Server sends with the option (snake_case).
SQLSERVER_NATIVE: dict[str, Any] = {
    "target_database_principal_id": 0,
    "server_principal_id": 2,
    "database_principal_name": "dbo",
    "schema_name": "dbo",
    "is_column_permission": True,
    "object_id": 581577110,
    "server_instance_name": "EC2AMAZ-NFUJJNO",
    "additional_information": '<action_info xmlns="http://schemas.microsoft.com/sqlserver/'
    '2008/sqlaudit_data"><pooled_connection>0</pooled_connection></action_info>',
    "duration_milliseconds": 0,
    "permission_bitmask": "0x00000000000000000000000000000001",
    "connection_id": "AD3A5084-FB83-45C1-8334-E923459A8109",
    "audit_schema_version": 1,
    "server_principal_sid": "0x010500000000000515000000bdc2795e2d0717901ba6998cf4010000",
    "host_name": "EC2AMAZ-NFUJJNO",
}


def oracle_event(**overrides: Any) -> dict[str, Any]:
    """A version 1.3 event: every field of Oracle's table, with its documented type."""
    event: dict[str, Any] = {
        "type": "record",
        "class": "Standard",
        "clientApplication": "JDBC Thin Client",
        "command": "CREATE TABLE",
        "commandText": "CREATE TABLE persons(person_id NUMBER, last_name VARCHAR2(50))",
        "databaseName": "ORCL",
        "dbid": 1559204751,
        "dbProtocol": "oracle",
        "dbUserName": "TEST",
        "endTime": None,
        "engineNativeAuditFields": {},
        "errorMessage": None,
        "exitCode": 0,
        "logTime": "2021-01-15 00:22:49.535239",
        "netProtocol": "tcp",
        "objectName": "PERSONS",
        "objectType": "HR",  # OBJECT_SCHEMA
        "paramList": [],
        "pid": 17687,
        "remoteHost": "10.0.0.7",
        "remotePort": "25440",
        "rowCount": None,
        "serverHost": "10.0.1.5",
        "serverType": "ORACLE",
        "serverVersion": "19.0.0.0.ru-2020-01.rur-2020-01.r1.EE.3",
        "serviceName": "oracle-ee",
        "sessionId": 1894327130,
        "startTime": None,
        "statementId": 142197,
        "substatementId": None,
        "transactionId": "02000800D5030000",
    }
    event.update(overrides)
    return event


def sqlserver_event(**overrides: Any) -> dict[str, Any]:
    """A version 1.4 event: every field of SQL Server's table, with its documented type."""
    event: dict[str, Any] = {
        "class": "SCHEMA",
        "clientApplication": "Microsoft SQL Server Management Studio - Query",
        "command": "ALTER",
        "commandText": "Create table [testDB].[dbo].[TestTable2](textA varchar(6000))",
        "databaseName": "testDB",
        "dbProtocol": "SQLSERVER",
        "dbUserName": "test",
        "endTime": None,
        "engineNativeAuditFields": {},
        "errorMessage": None,
        "exitCode": 1,
        "logTime": "2022-10-06 21:44:38.4120677+00",
        "netProtocol": None,
        "objectName": "dbo",
        "objectType": "SCHEMA",
        "paramList": None,
        "pid": None,
        "remoteHost": "local machine",
        "remotePort": None,
        "rowCount": 0,
        "serverHost": "172.31.30.159",
        "serverType": "SQLSERVER",
        "serverVersion": "15.00.4073.23.v1.R1",
        "serviceName": "sqlserver-ee",
        "sessionId": 62,
        "startTime": None,
        "statementId": "0x03baed90412f564fad640ebe51f89b99",
        "substatementId": 1,
        "transactionId": "4532935",
        "type": "record",
    }
    event.update(overrides)
    return event


def inner_document(instance_id: str, *events: dict[str, Any]) -> bytes:
    """The decrypted document of an RDS instance's record: clusterId is "" (no cluster)."""
    return orjson.dumps(
        {
            "type": "DatabaseActivityMonitoringRecord",
            "clusterId": "",
            "instanceId": instance_id,
            "databaseActivityEventList": list(events),
        }
    )


ORACLE_INSTANCE = "db-ORACLEEXAMPLE0000000000"
SQLSERVER_INSTANCE = "db-4JCWQLUZVFYP7DIWP6JVQ77O3Q"


def oracle_activity() -> list[dict[str, Any]]:
    """An Oracle session as auditors see it: a logon, a failed logon (ORA-01017), a grant, an
    audit policy, SYS at work, a failed statement (ORA-00942), a logoff."""
    session = {"sessionId": 3001, "pid": 4242, "dbUserName": "APP"}
    return [
        oracle_event(command="LOGON", commandText=None, objectName=None, objectType=None,
                     statementId=1, logTime="2024-03-01 10:00:00.000000", **session),
        oracle_event(command="LOGON", commandText=None, objectName=None, objectType=None,
                     exitCode=1017, dbUserName="MALLORY", sessionId=3002, pid=4243,
                     statementId=1, logTime="2024-03-01 10:00:05.000000"),
        oracle_event(command="GRANT", commandText="GRANT SELECT ON HR.EMPLOYEES TO APP",
                     objectName="EMPLOYEES", objectType="HR", statementId=2,
                     logTime="2024-03-01 10:01:00.000000", **session),
        oracle_event(command="CREATE AUDIT POLICY", class_="Standard",
                     commandText="CREATE AUDIT POLICY all_dml ACTIONS DELETE, UPDATE",
                     objectName="ALL_DML", objectType="SYS", statementId=3,
                     logTime="2024-03-01 10:02:00.000000", **session),
        oracle_event(command="SELECT", commandText="SELECT * FROM NOPE", objectName="NOPE",
                     objectType="APP", exitCode=942, statementId=4,
                     logTime="2024-03-01 10:03:00.000000", **session),
        oracle_event(command="ALTER USER", commandText="ALTER USER APP IDENTIFIED BY ***",
                     objectName="APP", objectType=None, dbUserName="SYS", sessionId=9,
                     pid=1, statementId=7, logTime="2024-03-01 10:04:00.000000"),
        oracle_event(command="LOGOFF", commandText=None, objectName=None, objectType=None,
                     statementId=5, logTime="2024-03-01 10:30:00.000000", **session),
    ]  # fmt: skip


def sqlserver_activity() -> list[dict[str, Any]]:
    """A SQL Server session: login, a failed login, a role membership change, a GRANT, a
    statement split over three events, a denied SELECT, logout."""
    session = {"sessionId": 55, "dbUserName": "app"}
    big = "SELECT '" + "x" * 20 + "' AS part_one, " + "'" + "y" * 20 + "' AS part_two"
    parts = [big[:20], big[20:40], big[40:]]
    split = [
        sqlserver_event(class_="OBJECT", command="SELECT", commandText=text, objectName="t",
                        objectType="TABLE", statementId="0xaaaa0000000000000000000000000001",
                        substatementId=n + 1, logTime=f"2024-03-01 10:03:00.000000{n}+00",
                        **session)
        for n, text in enumerate(parts)
    ]  # fmt: skip
    return [
        sqlserver_event(class_="LOGIN", command="LOGIN SUCCEEDED", commandText="Network "
                        "protocol: TCP", objectName="", objectType="LOGIN",
                        statementId="0xaaaa0000000000000000000000000000",
                        logTime="2024-03-01 10:00:00.1234567+00", transactionId="0", **session),
        sqlserver_event(class_="LOGIN", command="LOGIN FAILED", commandText="Login failed for "
                        "user 'mallory'. Reason: Password did not match.", dbUserName="mallory",
                        sessionId=0, exitCode=0, objectName="", objectType="LOGIN",
                        statementId="0x1eb0d1808d34a94b9d3dcf5432750f02",
                        logTime="2024-03-01 10:00:05.7113072+00", transactionId="0"),
        sqlserver_event(class_="SERVER ROLE", command="ADD MEMBER",
                        commandText="ALTER SERVER ROLE sysadmin ADD MEMBER [app]",
                        objectName="sysadmin", objectType="SERVER ROLE", dbUserName="sa",
                        sessionId=51, statementId="0xaaaa00000000000000000000000000a1",
                        logTime="2024-03-01 10:01:00.0000000+00"),
        sqlserver_event(class_="OBJECT", command="GRANT", commandText="GRANT SELECT ON t TO app",
                        objectName="t", objectType="TABLE", dbUserName="sa", sessionId=51,
                        statementId="0xaaaa00000000000000000000000000a2",
                        logTime="2024-03-01 10:02:00.0000000+00"),
        *split,
        sqlserver_event(class_="OBJECT", command="SELECT", commandText="SELECT * FROM secret",
                        objectName="secret", objectType="TABLE", exitCode=0,
                        statementId="0xaaaa0000000000000000000000000002",
                        logTime="2024-03-01 10:04:00.0000000+00", **session),
        sqlserver_event(class_="LOGIN", command="LOGOUT", commandText="", objectName="",
                        objectType="LOGIN", statementId="0xaaaa0000000000000000000000000003",
                        logTime="2024-03-01 10:30:00.0000000+00", **session),
    ]  # fmt: skip


def _class(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``class_=`` in the builders above is the wire field ``class``."""
    for event in events:
        if "class_" in event:
            event["class"] = event.pop("class_")
    return events


def oracle_events() -> list[dict[str, Any]]:
    return _class(oracle_activity())


def sqlserver_events() -> list[dict[str, Any]]:
    return _class(sqlserver_activity())
