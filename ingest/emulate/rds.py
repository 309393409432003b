"""Seeded RDS for Oracle (record version 1.3) and RDS for SQL Server (1.4) traffic (pure).

Built from the RDS User Guide's field tables (the example events there are not valid JSON):

RDS for Oracle (unified auditing, ``UNIFIED_AUDIT_TRAIL``)
    ``class`` is AUDIT_TYPE (Standard; FineGrainedAudit for an FGA policy's reads; Database
    Vault for a realm violation; RMAN_AUDIT; Datapump), ``command`` ACTION_NAME (LOGON, LOGOFF,
    SELECT, GRANT, CREATE USER, ALTER USER, CREATE AUDIT POLICY, ...), ``exitCode`` RETURN_CODE
    (0, or an ORA- number: 1017 for a wrong password, 942 for a missing table), ``objectType``
    the object's *schema*, ``sessionId``/``statementId``/``pid`` numbers, ``transactionId`` a hex
    string, ``dbid`` a number, ``logTime`` EVENT_TIMESTAMP_UTC without a zone, ``paramList``
    ``[]``, ``endTime``/``startTime``/``errorMessage``/``rowCount``/``substatementId`` null.
RDS for SQL Server (SQL Server Audit, ``fn_get_audit_file``)
    ``class`` is the class type (LOGIN, OBJECT, SCHEMA, DATABASE, SERVER ROLE, ...), ``command``
    the action (LOGIN SUCCEEDED, LOGIN FAILED, LOGOUT, SELECT, GRANT, DENY, ADD MEMBER, ALTER),
    ``exitCode`` ``succeeded`` (1, or 0 for a failed login or a denied permission),
    ``statementId`` the hex sequence_group_id, ``substatementId`` the sequence number of a large
    statement split over several events (same statementId and logTime), ``sessionId`` an int,
    ``transactionId`` a numeric string (0 outside a transaction), ``logTime`` with seven
    fraction digits, ``pid``/``remotePort``/``paramList``/``netProtocol`` null.

Both put ``engineNativeAuditFields`` last: ``{}``, or with ``native_fields`` the engine's own
audit columns (UPPERCASE from UNIFIED_AUDIT_TRAIL, snake_case from fn_get_audit_file). An RDS
instance's records have ``clusterId`` "" and the instance's DbiResourceId as ``instanceId``.
"""

from __future__ import annotations

import time
from typing import Any

from ingest.emulate.instance import _Instance

ORACLE_VERSION = "1.3"
SQLSERVER_VERSION = "1.4"

#: SQL Server splits an audit record whose statement exceeds this many characters (4000 in SQL
#: Server; small here so the emulator's statements exercise it).
SQLSERVER_SPLIT = 120


def oracle_time(epoch_us: int) -> str:
    """EVENT_TIMESTAMP_UTC as RDS for Oracle writes it: no zone suffix."""
    seconds, micros = divmod(epoch_us, 1_000_000)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(seconds))}.{micros:06d}"


def sqlserver_time(epoch_us: int, tick: int) -> str:
    """event_time as RDS for SQL Server writes it: seven fraction digits and "+00"."""
    seconds, micros = divmod(epoch_us, 1_000_000)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(seconds))}.{micros:06d}{tick}+00"


class _RdsSession:
    __slots__ = (
        "client",
        "database",
        "host",
        "next_statement",
        "pid",
        "port",
        "session_id",
        "user",
    )

    def __init__(
        self, session_id: int, pid: int | None, user: str, host: str, port: str | None
    ) -> None:
        self.session_id = session_id
        self.pid = pid
        self.user = user
        self.host = host
        self.port = port
        self.client = ""
        self.database = ""
        self.next_statement = 1


class _RdsInstance(_Instance):
    """What both RDS engines share: sessions that log in, work, and log out."""

    def record(self, events: list[dict[str, Any]]) -> Any:
        inner = super().record(events)
        inner.doc["clusterId"] = ""
        return inner

    def heartbeat_record(self) -> Any:
        inner = super().heartbeat_record()
        inner.doc["clusterId"] = ""
        return inner


# --- RDS for Oracle ------------------------------------------------------------------------------

_ORA_USERS = ("APP", "REPORTING", "ETL", "ALICE")
_ORA_PRIVILEGED = ("SYS", "SYSTEM", "RDSADMIN", "ADMIN")
#: (weight, class, command, schema, object, SQL, return code)
_ORA_STATEMENTS: tuple[tuple[int, str, str, str | None, str | None, str, int], ...] = (
    (10, "Standard", "SELECT", "HR", "EMPLOYEES", "SELECT * FROM HR.EMPLOYEES WHERE ID = :1", 0),
    (6, "Standard", "INSERT", "SALES", "ORDERS", "INSERT INTO SALES.ORDERS VALUES (:1, :2)", 0),
    (4, "Standard", "UPDATE", "SALES", "ORDERS", "UPDATE SALES.ORDERS SET TOTAL = :1", 0),
    (3, "FineGrainedAudit", "SELECT", "HR", "SALARIES",
     "SELECT SALARY FROM HR.SALARIES WHERE EMP_ID = :1", 0),
    (2, "Standard", "SELECT", "APP", "NO_SUCH_TABLE", "SELECT * FROM NO_SUCH_TABLE", 942),
    (1, "Standard", "CREATE TABLE", "APP", "PERSONS",
     "CREATE TABLE persons(person_id NUMBER, last_name VARCHAR2(50))", 0),
    (1, "Standard", "GRANT", "HR", "EMPLOYEES", "GRANT SELECT ON HR.EMPLOYEES TO REPORTING", 0),
    (1, "Standard", "REVOKE", "HR", "SALARIES", "REVOKE SELECT ON HR.SALARIES FROM REPORTING", 0),
    (1, "Standard", "CREATE USER", None, "TEMP_USER",
     "CREATE USER TEMP_USER IDENTIFIED BY *****", 0),
    (1, "Standard", "ALTER USER", None, "APP", "ALTER USER APP ACCOUNT UNLOCK", 0),
    (1, "Standard", "CREATE AUDIT POLICY", None, "ALL_DML",
     "CREATE AUDIT POLICY ALL_DML ACTIONS DELETE, INSERT, UPDATE", 0),
    (1, "Database Vault", "SELECT", "HR", "SALARIES", "SELECT * FROM HR.SALARIES", 47401),
    (1, "Datapump", "EXPORT", None, None, "expdp SCHEMAS=SALES", 0),
    (1, "RMAN_AUDIT", "BACKUP", None, None, "BACKUP DATABASE PLUS ARCHIVELOG", 0),
)  # fmt: skip
_ORA_WEIGHTS = tuple(s[0] for s in _ORA_STATEMENTS)


class OracleInstance(_RdsInstance):
    SERVER_VERSION = "19.0.0.0.ru-2024-01.rur-2024-01.r1.EE.3"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version = ORACLE_VERSION
        self.server_host = f"172.31.{self.rng.randint(0, 255)}.{self.rng.randint(2, 254)}"
        self.dbid = self.rng.randint(1_000_000_000, 4_000_000_000)
        self.sessions: list[_RdsSession] = []
        self.next_session = self.rng.randint(100_000, 2_000_000_000)
        self.scn = self.rng.randint(1_000_000, 9_000_000)

    def new_session(self, user: str) -> _RdsSession:
        self.next_session += self.rng.randint(1, 50)
        session = _RdsSession(
            self.next_session, self.rng.randint(1_000, 65_535), user, self.client_ip(), self.port()
        )
        session.client = self.rng.choice(("JDBC Thin Client", "sqlplus@app (TNS V1-V3)", ""))
        return session

    def next_group(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        roll = self.rng.random()
        if not self.sessions or (len(self.sessions) < 4 and roll < 0.08):
            user = self.rng.choice(_ORA_PRIVILEGED + _ORA_USERS + _ORA_USERS)
            session = self.new_session(user)
            self.sessions.append(session)
            return [self.event(session, "Standard", "LOGON", None, None, None)], []
        if roll < 0.11:  # ORA-01017: invalid username/password; logon denied
            session = self.new_session(self.rng.choice(("MALLORY", "SCOTT", "APP")))
            return [self.event(session, "Standard", "LOGON", None, None, None, 1017)], []
        session = self.rng.choice(self.sessions)
        if roll < 0.16 and session.next_statement > 2:
            self.sessions.remove(session)
            return [self.event(session, "Standard", "LOGOFF", None, None, None)], []
        _w, class_, command, schema, name, sql, code = self.rng.choices(
            _ORA_STATEMENTS, _ORA_WEIGHTS
        )[0]
        return [self.event(session, class_, command, schema, name, self.marked(sql), code)], []

    def event(
        self,
        session: _RdsSession,
        class_: str,
        command: str,
        schema: str | None,
        name: str | None,
        sql: str | None,
        code: int = 0,
    ) -> dict[str, Any]:
        statement = session.next_statement
        session.next_statement += 1
        log = self.tick(1, 90_000)
        in_transaction = command in ("INSERT", "UPDATE", "DELETE")
        transaction = f"{self.rng.getrandbits(64):016X}" if in_transaction else "0000000000000000"
        return {
            "class": class_,
            "clientApplication": session.client,
            "command": command,
            "commandText": sql,
            "dbid": self.dbid,
            "databaseName": "ORCL",
            "dbProtocol": "oracle",
            "dbUserName": session.user,
            "endTime": None,
            "errorMessage": None,
            "exitCode": code,
            "logTime": oracle_time(log),
            "netProtocol": "tcp",
            "objectName": name,
            "objectType": schema,
            "paramList": [],
            "pid": session.pid,
            "remoteHost": session.host,
            "remotePort": session.port,
            "rowCount": None,
            "serverHost": self.server_host,
            "serverType": "oracle",
            "serverVersion": self.SERVER_VERSION,
            "serviceName": "oracle-ee",
            "sessionId": session.session_id,
            "startTime": None,
            "statementId": statement,
            "substatementId": None,
            "transactionId": transaction,
            "type": "record",
            "engineNativeAuditFields": self.native(session, class_, command, code),
        }

    def native(self, session: _RdsSession, class_: str, command: str, code: int) -> dict[str, Any]:
        if not self.native_fields:
            return {}
        self.scn += self.rng.randint(1, 500)
        return {
            "UNIFIED_AUDIT_POLICIES": "ORA_LOGON_FAILURES" if code == 1017 else "TEST_POL_ALL",
            "FGA_POLICY_NAME": "SALARY_READS" if class_ == "FineGrainedAudit" else None,
            "DV_RETURN_CODE": code if class_ == "Database Vault" else None,
            "SYSTEM_PRIVILEGE_USED": "CREATE SESSION" if command == "LOGON" else None,
            "AUTHENTICATION_TYPE": f"(TYPE=(DATABASE));(CLIENT ADDRESS=((PROTOCOL=tcp)"
            f"(HOST={session.host})(PORT={session.port})));",
            "CURRENT_USER": session.user,
            "INSTANCE_ID": 1,
            "ENTRY_ID": session.next_statement,
            "OS_USERNAME": "rdsdb",
            "TERMINAL": "unknown",
            "USERHOST": "ip-10-13-0-122",
            "PROXY_SESSIONID": 0,
            "SCN": self.scn,
        }


# --- RDS for SQL Server --------------------------------------------------------------------------

_MS_USERS = ("app", "reporting", "etl", "alice")
_MS_PRIVILEGED = ("sa", "rdsa", "admin")
#: (weight, class, command, object type, object, SQL, succeeded)
_MS_STATEMENTS: tuple[tuple[int, str, str, str, str, str, int], ...] = (
    (10, "OBJECT", "SELECT", "TABLE", "orders", "SELECT * FROM dbo.orders WHERE id = @id", 1),
    (5, "OBJECT", "INSERT", "TABLE", "orders", "INSERT INTO dbo.orders VALUES (@id, @total)", 1),
    (4, "OBJECT", "UPDATE", "TABLE", "orders", "UPDATE dbo.orders SET total = @total", 1),
    (3, "OBJECT", "SELECT", "TABLE", "orders",
     "SELECT o.id, o.total, c.name, c.email, c.address FROM dbo.orders o JOIN dbo.customers c "
     "ON c.id = o.customer_id WHERE o.created_at > DATEADD(day, -30, SYSUTCDATETIME()) "
     "ORDER BY o.total DESC", 1),
    (2, "OBJECT", "SELECT", "TABLE", "salaries", "SELECT * FROM dbo.salaries", 0),  # denied
    (1, "SCHEMA", "ALTER", "SCHEMA", "dbo",
     "CREATE TABLE dbo.persons (id int PRIMARY KEY, name varchar(50))", 1),
    (1, "OBJECT", "GRANT", "TABLE", "orders", "GRANT SELECT ON dbo.orders TO reporting", 1),
    (1, "OBJECT", "DENY", "TABLE", "salaries", "DENY SELECT ON dbo.salaries TO reporting", 1),
    (1, "LOGIN", "ALTER", "LOGIN", "etl", "ALTER LOGIN etl WITH PASSWORD = '******'", 1),
    (1, "SERVER ROLE", "ADD MEMBER", "SERVER ROLE", "sysadmin",
     "ALTER SERVER ROLE sysadmin ADD MEMBER [etl]", 1),
)  # fmt: skip
_MS_WEIGHTS = tuple(s[0] for s in _MS_STATEMENTS)


class SqlServerInstance(_RdsInstance):
    SERVER_VERSION = "15.00.4073.23.v1.R1"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version = SQLSERVER_VERSION
        self.server_host = f"172.31.{self.rng.randint(0, 255)}.{self.rng.randint(2, 254)}"
        self.sessions: list[_RdsSession] = []
        self.used_spids: set[int] = set()
        self.transaction = self.rng.randint(1_000_000, 9_000_000)

    def new_session(self, user: str) -> _RdsSession:
        spid = self.rng.randint(51, 32_767)
        while spid in self.used_spids:  # unique here, so a session id names one session
            spid = self.rng.randint(51, 32_767)
        self.used_spids.add(spid)
        session = _RdsSession(spid, None, user, self.client_ip(), None)
        session.client = self.rng.choice(
            ("Microsoft SQL Server Management Studio - Query", "Core Microsoft SqlClient Data "
             "Provider", "sqlcmd")
        )  # fmt: skip
        session.database = self.rng.choice(("shop", "master"))
        return session

    def next_group(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        roll = self.rng.random()
        if not self.sessions or (len(self.sessions) < 4 and roll < 0.08):
            session = self.new_session(self.rng.choice(_MS_PRIVILEGED + _MS_USERS + _MS_USERS))
            self.sessions.append(session)
            return self.event(session, "LOGIN", "LOGIN SUCCEEDED", "LOGIN", "",
                              "Network protocol: TCP"), []  # fmt: skip
        if roll < 0.11:
            session = _RdsSession(
                0, None, self.rng.choice(("mallory", "sa")), self.client_ip(), None
            )
            text = (f"Login failed for user '{session.user}'. Reason: Password did not match "
                    "that for the login provided.")  # fmt: skip
            return self.event(session, "LOGIN", "LOGIN FAILED", "LOGIN", "", text, 0), []
        session = self.rng.choice(self.sessions)
        if roll < 0.16 and session.next_statement > 2:
            self.sessions.remove(session)
            return self.event(session, "LOGIN", "LOGOUT", "LOGIN", "", ""), []
        _w, class_, command, kind, name, sql, succeeded = self.rng.choices(
            _MS_STATEMENTS, _MS_WEIGHTS
        )[0]
        return self.event(session, class_, command, kind, name, self.marked(sql), succeeded), []

    def event(
        self,
        session: _RdsSession,
        class_: str,
        command: str,
        object_type: str,
        name: str,
        sql: str,
        succeeded: int = 1,
    ) -> list[dict[str, Any]]:
        """One audit record: one event, or several (``substatementId`` 1, 2, ...) sharing the
        statementId and logTime when the statement is longer than :data:`SQLSERVER_SPLIT`."""
        session.next_statement += 1
        log = self.tick(1, 90_000)
        stamp = sqlserver_time(log, self.rng.randint(0, 9))
        group = f"0x{self.rng.getrandbits(128):032x}"
        if command in ("INSERT", "UPDATE"):
            self.transaction += self.rng.randint(1, 40)
            transaction = str(self.transaction)
        else:
            transaction = "0"
        parts = [sql[i : i + SQLSERVER_SPLIT] for i in range(0, len(sql), SQLSERVER_SPLIT)]
        events = []
        for sequence, text in enumerate(parts or [""], start=1):
            events.append(
                {
                    "class": class_,
                    "clientApplication": session.client,
                    "command": command,
                    "commandText": text,
                    "databaseName": session.database,
                    "dbProtocol": "SQLSERVER",
                    "dbUserName": session.user,
                    "endTime": None,
                    "errorMessage": None,
                    "exitCode": succeeded,
                    "logTime": stamp,
                    "netProtocol": None,
                    "objectName": name,
                    "objectType": object_type,
                    "paramList": None,
                    "pid": None,
                    "remoteHost": session.host,
                    "remotePort": None,
                    "rowCount": self.rng.randint(0, 50) if command == "SELECT" else 0,
                    "serverHost": self.server_host,
                    "serverType": "SQLSERVER",
                    "serverVersion": self.SERVER_VERSION,
                    "serviceName": "sqlserver-ee",
                    "sessionId": session.session_id,
                    "startTime": None,
                    "statementId": group,
                    "substatementId": sequence,
                    "transactionId": transaction,
                    "type": "record",
                    "engineNativeAuditFields": self.native(session, sequence),
                }
            )
        return events

    def native(self, session: _RdsSession, sequence: int) -> dict[str, Any]:
        if not self.native_fields:
            return {}
        return {
            "target_database_principal_id": 0,
            "server_principal_id": 2 if session.user == "sa" else 261,
            "database_principal_name": "dbo",
            "schema_name": "dbo",
            "is_column_permission": False,
            "object_id": self.rng.randint(1, 2_000_000_000),
            "server_instance_name": "EC2AMAZ-NFUJJNO",
            "additional_information": "",
            "duration_milliseconds": self.rng.randint(0, 30),
            "permission_bitmask": "0x00000000000000000000000000000001",
            "session_server_principal_name": session.user,
            "connection_id": f"{self.rng.getrandbits(128):032X}",
            "audit_schema_version": 1,
            "sequence_number": sequence,
            "host_name": "EC2AMAZ-NFUJJNO",
        }
