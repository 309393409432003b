-- Auditor views for all four engines: Aurora PostgreSQL, Aurora MySQL, RDS for Oracle and RDS
-- for SQL Server. Every view names the engine (das.engine) and reads failures with
-- das.event_failed (migration 0006), so one predicate is right whatever the engine.
-- All view definitions live here (0002's are replaced).

DROP VIEW das.sessions, das.failed_logins, das.failed_statements, das.ddl_changes,
    das.privileged_activity;

-- A session opens with CONNECT (Aurora), LOGON (Oracle) or LOGIN SUCCEEDED (SQL Server)...
CREATE FUNCTION das.is_session_start(command text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT upper(coalesce(command, '')) IN ('CONNECT', 'LOGON', 'LOGIN SUCCEEDED')
$$;

-- ... and closes with DISCONNECT, LOGOFF (Oracle; also LOGOFF BY CLEANUP) or LOGOUT.
CREATE FUNCTION das.is_session_end(command text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT upper(coalesce(command, '')) IN ('DISCONNECT', 'LOGOFF', 'LOGOFF BY CLEANUP', 'LOGOUT')
$$;

-- A login attempt, successful or not, of any engine.
CREATE OR REPLACE FUNCTION das.is_login_command(command text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT upper(coalesce(command, '')) IN
        ('CONNECT', 'FAILED_CONNECT', 'AUTH FAILURE', 'AUTHENTICATION FAILURE', 'LOGIN',
         'LOGON', 'LOGIN SUCCEEDED', 'LOGIN FAILED')
$$;

-- A schema or permission change, by the command (Aurora PostgreSQL command tags, Oracle
-- ACTION_NAME, SQL Server audit action names: GRANT/DENY/REVOKE, CREATE/ALTER/DROP of any
-- object, logins and users included, role membership, Oracle AUDIT/NOAUDIT and audit policies).
CREATE FUNCTION das.is_schema_change(command text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(command, '') ~* '^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE|DENY|COMMENT|AUDIT|NOAUDIT|ADD MEMBER|DROP MEMBER|ADD ROLE MEMBER|DROP ROLE MEMBER)\M'
$$;

-- Every event, with what each engine means by its fields: the engine, whether it failed, the
-- Oracle object's schema, and one statement key (SQL Server's hex ids included).
CREATE VIEW das.events AS
SELECT
    e.*,
    das.engine(e.record_version, e.server_type)                   AS engine,
    das.event_failed(e.record_version, e.error_message, e.exit_code) AS failed,
    CASE WHEN e.record_version = '1.3' THEN e.object_type END     AS object_schema,
    coalesce(e.statement_id_text, e.statement_id::text)          AS statement
FROM das.activity_events e;

-- Sessions from login to logout, with duration (NULL while still open or if the logout was not
-- recorded). A failed login opens no session (das.failed_logins lists it).
CREATE VIEW das.sessions AS
SELECT
    das.engine(record_version, server_type)                  AS engine,
    cluster_id,
    instance_id,
    session_id,
    pid,
    max(db_user_name)                                        AS db_user_name,
    max(database_name)                                       AS database_name,
    max(remote_host)                                         AS remote_host,
    max(client_application)                                  AS client_application,
    max(server_type)                                         AS server_type,
    min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)) AS connected_at,
    max(log_time) FILTER (WHERE das.is_session_end(command)) AS disconnected_at,
    max(log_time) FILTER (WHERE das.is_session_end(command))
      - min(log_time) FILTER (WHERE das.is_session_start(command)
        AND NOT das.event_failed(record_version, error_message, exit_code)) AS duration,
    min(log_time)                                            AS first_event_at,
    max(log_time)                                            AS last_event_at,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX')     AS statements,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                       AND das.event_failed(record_version, error_message, exit_code))
                                                             AS failed_statements
FROM das.activity_events
WHERE session_id IS NOT NULL
GROUP BY das.engine(record_version, server_type), cluster_id, instance_id, session_id, pid;

-- Failed logins: explicit failure commands (Aurora FAILED_CONNECT / AUTH FAILURE, SQL Server
-- LOGIN FAILED), or a login that reported a failure (Oracle LOGON with RETURN_CODE 1017, ...).
CREATE VIEW das.failed_logins AS
SELECT
    log_time, cluster_id, instance_id, db_user_name, database_name, remote_host, remote_port,
    client_application, command, exit_code, error_message, session_id, pid, server_type,
    shard_id, sequence_number, event_index,
    das.engine(record_version, server_type) AS engine, command_text
FROM das.activity_events
WHERE upper(command) IN ('FAILED_CONNECT', 'AUTH FAILURE', 'AUTHENTICATION FAILURE',
                         'LOGIN FAILED')
   OR (das.is_login_command(command) AND das.event_failed(record_version, error_message, exit_code));

-- Failed statements (not logins; for MySQL the MAIN event carries the outcome; for SQL Server
-- a failed permission check).
CREATE VIEW das.failed_statements AS
SELECT
    log_time, cluster_id, instance_id, db_user_name, database_name, remote_host, command,
    object_type, object_name, command_text, exit_code, error_message, session_id, pid,
    statement_id, server_type, shard_id, sequence_number, event_index,
    das.engine(record_version, server_type) AS engine, statement_id_text
FROM das.activity_events
WHERE das.event_failed(record_version, error_message, exit_code)
  AND NOT das.is_login_command(command)
  AND class IS DISTINCT FROM 'AUX';

-- Schema and permission changes. PostgreSQL marks them class DDL (or ROLE); Oracle and SQL
-- Server name them in the command; for MySQL, a statement whose MAIN text or AUX commands are
-- DDL.
CREATE VIEW das.ddl_changes AS
SELECT
    e.log_time, e.cluster_id, e.instance_id, e.db_user_name, e.database_name, e.remote_host,
    e.command, e.object_type, e.object_name, e.command_text,
    das.event_failed(e.record_version, e.error_message, e.exit_code) AS failed,
    e.session_id, e.server_type, e.shard_id, e.sequence_number, e.event_index,
    das.engine(e.record_version, e.server_type) AS engine, e.class
FROM das.activity_events e
WHERE e.class IS DISTINCT FROM 'MAIN' AND e.class IS DISTINCT FROM 'AUX'
  AND (e.class IN ('DDL', 'ROLE') OR das.is_schema_change(e.command))
UNION ALL
SELECT
    s.log_time, s.cluster_id, s.instance_id, s.db_user_name, s.database_name, s.remote_host,
    coalesce((SELECT string_agg(DISTINCT a->>'command', ',') FROM jsonb_array_elements(s.aux) a
              WHERE a->>'command' ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)'),
             s.command),
    coalesce(s.object_type, (SELECT min(a->>'object_type') FROM jsonb_array_elements(s.aux) a)),
    coalesce(nullif(s.object_name, ''),
             (SELECT string_agg(DISTINCT a->>'object_name', ',') FROM jsonb_array_elements(s.aux) a)),
    s.command_text,
    das.is_failure(s.error_message, s.exit_code),
    s.session_id, 'MySQL', s.main_shard_id, s.main_sequence_number, s.main_event_index,
    'mysql', 'MAIN'
FROM das.statements s
WHERE s.command_text ~* '^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)\M'
   OR EXISTS (SELECT 1 FROM jsonb_array_elements(s.aux) a
              WHERE a->>'command' ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)');

-- Everything the users listed in das.privileged_users did (Aurora: rdsadmin, postgres, ...;
-- Oracle: SYS, SYSTEM, RDSADMIN; SQL Server: sa, rdsa).
CREATE VIEW das.privileged_activity AS
SELECT
    e.log_time, e.cluster_id, e.instance_id, e.db_user_name, e.database_name, e.remote_host,
    e.class, e.command, e.object_type, e.object_name, e.command_text,
    das.event_failed(e.record_version, e.error_message, e.exit_code) AS failed,
    e.session_id, e.server_type, e.shard_id, e.sequence_number, e.event_index,
    das.engine(e.record_version, e.server_type) AS engine
FROM das.activity_events e
JOIN das.privileged_users p ON p.db_user_name = e.db_user_name
WHERE e.class IS DISTINCT FROM 'AUX';

-- RDS for SQL Server statements: one audit record split over several events (same statementId,
-- i.e. sequence_group_id; substatement_id is the part's sequence number) reassembled, each part
-- once (a part delivered twice counts once).
CREATE VIEW das.sqlserver_statements AS
SELECT
    instance_id,
    session_id,
    statement_id_text                                     AS statement_id,
    min(log_time)                                         AS log_time,
    max(db_user_name)                                     AS db_user_name,
    max(database_name)                                    AS database_name,
    max(remote_host)                                      AS remote_host,
    max(class)                                            AS class,
    max(command)                                          AS command,
    max(object_type)                                      AS object_type,
    max(object_name)                                      AS object_name,
    string_agg(command_text, '' ORDER BY substatement_id) AS command_text,
    count(*)                                              AS parts,
    bool_or(das.event_failed(record_version, error_message, exit_code)) AS failed,
    max(transaction_id)                                   AS transaction_id
FROM (
    SELECT DISTINCT ON (instance_id, session_id, statement_id_text, substatement_id) *
    FROM das.activity_events
    WHERE record_version = '1.4' AND statement_id_text IS NOT NULL
    ORDER BY instance_id, session_id, statement_id_text, substatement_id, log_time,
             sequence_number, event_index
) part
GROUP BY instance_id, session_id, statement_id_text;
