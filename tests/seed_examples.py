"""The example events of the DAS document (../shared/seed), verbatim.

Aurora PostgreSQL examples are shown in the seed with the outer record wrapped around the
decrypted inner document (record version 1.1); the Aurora MySQL examples show only the inner
document (record version 1.2 per the seed's version notes). Each entry: (version, inner JSON).
"""

SEED_EXAMPLES: dict[str, tuple[str, str]] = {
    "pg_connect": (
        "1.1",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-4HNY5V4RRNPKKYB7ICFKE5JBQQ",
  "instanceId": "db-FZJTMYKCXQBUUZ6VLU7NW3ITCM",
  "databaseActivityEventList": [
    {
      "startTime": "2019-10-30 00:39:49.940668+00",
      "logTime": "2019-10-30 00:39:49.990579+00",
      "statementId": 1,
      "substatementId": 1,
      "objectType": null,
      "command": "CONNECT",
      "objectName": null,
      "databaseName": "postgres",
      "dbUserName": "rdsadmin",
      "remoteHost": "172.31.3.195",
      "remotePort": "49804",
      "sessionId": "5ce5f7f0.474b",
      "rowCount": null,
      "commandText": null,
      "paramList": [],
      "pid": 18251,
      "clientApplication": "psql",
      "exitCode": null,
      "class": "MISC",
      "serverVersion": "2.3.1",
      "serverType": "PostgreSQL",
      "serviceName": "Amazon Aurora PostgreSQL-Compatible edition",
      "serverHost": "172.31.3.192",
      "netProtocol": "TCP",
      "dbProtocol": "Postgres 3.0",
      "type": "record",
      "errorMessage": null
    }
  ]
}
""",
    ),
    "mysql_connect": (
        "1.2",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-some_id",
  "instanceId": "db-some_id",
  "databaseActivityEventList": [
    {
      "logTime": "2020-05-22 18:07:13.267214+00",
      "type": "record",
      "clientApplication": null,
      "pid": 2830,
      "dbUserName": "rdsadmin",
      "databaseName": "",
      "remoteHost": "localhost",
      "remotePort": "11053",
      "command": "CONNECT",
      "commandText": "",
      "paramList": null,
      "objectType": "TABLE",
      "objectName": "",
      "statementId": 0,
      "substatementId": 1,
      "exitCode": "0",
      "sessionId": "725121",
      "rowCount": 0,
      "serverHost": "master",
      "serverType": "MySQL",
      "serviceName": "Amazon Aurora MySQL",
      "serverVersion": "MySQL 5.7.12",
      "startTime": "2020-05-22 18:07:13.267207+00",
      "endTime": "2020-05-22 18:07:13.267213+00",
      "transactionId": "0",
      "dbProtocol": "MySQL",
      "netProtocol": "TCP",
      "errorMessage": "",
      "class": "MAIN"
    }
  ]
}
""",
    ),
    "pg_create_table": (
        "1.1",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-4HNY5V4RRNPKKYB7ICFKE5JBQQ",
  "instanceId": "db-FZJTMYKCXQBUUZ6VLU7NW3ITCM",
  "databaseActivityEventList": [
    {
      "startTime": "2019-05-24 00:36:54.403455+00",
      "logTime": "2019-05-24 00:36:54.494235+00",
      "statementId": 2,
      "substatementId": 1,
      "objectType": null,
      "command": "CREATE TABLE",
      "objectName": null,
      "databaseName": "postgres",
      "dbUserName": "rdsadmin",
      "remoteHost": "172.31.3.195",
      "remotePort": "34534",
      "sessionId": "5ce73c6f.7e64",
      "rowCount": null,
      "commandText": "create table my_table (id serial primary key, name varchar(32));",
      "paramList": [],
      "pid": 32356,
      "clientApplication": "psql",
      "exitCode": null,
      "class": "DDL",
      "serverVersion": "2.3.1",
      "serverType": "PostgreSQL",
      "serviceName": "Amazon Aurora PostgreSQL-Compatible edition",
      "serverHost": "172.31.3.192",
      "netProtocol": "TCP",
      "dbProtocol": "Postgres 3.0",
      "type": "record",
      "errorMessage": null
    }
  ]
}
""",
    ),
    "mysql_create_table_main": (
        "1.2",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-some_id",
  "instanceId": "db-some_id",
  "databaseActivityEventList": [
    {
      "logTime": "2020-05-22 18:07:12.250221+00",
      "type": "record",
      "clientApplication": null,
      "pid": 2830,
      "dbUserName": "master",
      "databaseName": "test",
      "remoteHost": "localhost",
      "remotePort": "11054",
      "command": "QUERY",
      "commandText": "CREATE TABLE test1 (id INT)",
      "paramList": null,
      "objectType": "TABLE",
      "objectName": "test1",
      "statementId": 65459278,
      "substatementId": 1,
      "exitCode": "0",
      "sessionId": "725118",
      "rowCount": 0,
      "serverHost": "master",
      "serverType": "MySQL",
      "serviceName": "Amazon Aurora MySQL",
      "serverVersion": "MySQL 5.7.12",
      "startTime": "2020-05-22 18:07:12.226384+00",
      "endTime": "2020-05-22 18:07:12.250222+00",
      "transactionId": "0",
      "dbProtocol": "MySQL",
      "netProtocol": "TCP",
      "errorMessage": "",
      "class": "MAIN"
    }
  ]
}
""",
    ),
    "mysql_create_table_aux": (
        "1.2",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-some_id",
  "instanceId": "db-some_id",
  "databaseActivityEventList": [
    {
      "logTime": "2020-05-22 18:07:12.247182+00",
      "type": "record",
      "clientApplication": null,
      "pid": 2830,
      "dbUserName": "master",
      "databaseName": "test",
      "remoteHost": "localhost",
      "remotePort": "11054",
      "command": "CREATE",
      "commandText": "test1",
      "paramList": null,
      "objectType": "TABLE",
      "objectName": "test1",
      "statementId": 65459278,
      "substatementId": 2,
      "exitCode": "",
      "sessionId": "725118",
      "rowCount": 0,
      "serverHost": "master",
      "serverType": "MySQL",
      "serviceName": "Amazon Aurora MySQL",
      "serverVersion": "MySQL 5.7.12",
      "startTime": "2020-05-22 18:07:12.226384+00",
      "endTime": "2020-05-22 18:07:12.247182+00",
      "transactionId": "0",
      "dbProtocol": "MySQL",
      "netProtocol": "TCP",
      "errorMessage": "",
      "class": "AUX"
    }
  ]
}
""",
    ),
    "pg_select": (
        "1.1",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-4HNY5V4RRNPKKYB7ICFKE5JBQQ",
  "instanceId": "db-FZJTMYKCXQBUUZ6VLU7NW3ITCM",
  "databaseActivityEventList": [
    {
      "startTime": "2019-05-24 00:39:49.920564+00",
      "logTime": "2019-05-24 00:39:49.940668+00",
      "statementId": 6,
      "substatementId": 1,
      "objectType": "TABLE",
      "command": "SELECT",
      "objectName": "public.my_table",
      "databaseName": "postgres",
      "dbUserName": "rdsadmin",
      "remoteHost": "172.31.3.195",
      "remotePort": "34534",
      "sessionId": "5ce73c6f.7e64",
      "rowCount": 10,
      "commandText": "select * from my_table;",
      "paramList": [],
      "pid": 32356,
      "clientApplication": "psql",
      "exitCode": null,
      "class": "READ",
      "serverVersion": "2.3.1",
      "serverType": "PostgreSQL",
      "serviceName": "Amazon Aurora PostgreSQL-Compatible edition",
      "serverHost": "172.31.3.192",
      "netProtocol": "TCP",
      "dbProtocol": "Postgres 3.0",
      "type": "record",
      "errorMessage": null
    }
  ]
}
""",
    ),
    "mysql_select_main": (
        "1.2",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-some_id",
  "instanceId": "db-some_id",
  "databaseActivityEventList": [
    {
      "logTime": "2020-05-22 18:29:57.986467+00",
      "type": "record",
      "clientApplication": null,
      "pid": 2830,
      "dbUserName": "master",
      "databaseName": "test",
      "remoteHost": "localhost",
      "remotePort": "11054",
      "command": "QUERY",
      "commandText": "SELECT * FROM test1 WHERE id < 28",
      "paramList": null,
      "objectType": "TABLE",
      "objectName": "test1",
      "statementId": 65469218,
      "substatementId": 1,
      "exitCode": "0",
      "sessionId": "726571",
      "rowCount": 2,
      "serverHost": "master",
      "serverType": "MySQL",
      "serviceName": "Amazon Aurora MySQL",
      "serverVersion": "MySQL 5.7.12",
      "startTime": "2020-05-22 18:29:57.986364+00",
      "endTime": "2020-05-22 18:29:57.986467+00",
      "transactionId": "0",
      "dbProtocol": "MySQL",
      "netProtocol": "TCP",
      "errorMessage": "",
      "class": "MAIN"
    }
  ]
}
""",
    ),
    "mysql_select_aux": (
        "1.2",
        """\
{
  "type": "DatabaseActivityMonitoringRecord",
  "clusterId": "cluster-some_id",
  "instanceId": "db-some_id",
  "databaseActivityEventList": [
    {
      "logTime": "2020-05-22 18:29:57.986399+00",
      "type": "record",
      "clientApplication": null,
      "pid": 2830,
      "dbUserName": "master",
      "databaseName": "test",
      "remoteHost": "localhost",
      "remotePort": "11054",
      "command": "READ",
      "commandText": "test1",
      "paramList": null,
      "objectType": "TABLE",
      "objectName": "test1",
      "statementId": 65469218,
      "substatementId": 2,
      "exitCode": "",
      "sessionId": "726571",
      "rowCount": 0,
      "serverHost": "master",
      "serverType": "MySQL",
      "serviceName": "Amazon Aurora MySQL",
      "serverVersion": "MySQL 5.7.12",
      "startTime": "2020-05-22 18:29:57.986364+00",
      "endTime": "2020-05-22 18:29:57.986399+00",
      "transactionId": "0",
      "dbProtocol": "MySQL",
      "netProtocol": "TCP",
      "errorMessage": "",
      "class": "AUX"
    }
  ]
}
""",
    ),
}
