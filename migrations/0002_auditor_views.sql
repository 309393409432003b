-- Views for auditors. They read das.activity_events (and das.statements for Aurora MySQL, where
-- one statement is a MAIN event plus AUX events naming the objects it touched).

-- A statement or login failed when the engine reported an error message or a non-success
-- exit code (PostgreSQL: an SQLSTATE; MySQL: an error number). "", "0" and "00000" are success.
CREATE FUNCTION das.is_failure(error_message text, exit_code text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(error_message, '') <> ''
        OR coalesce(exit_code, '') NOT IN ('', '0', '00000')
$$;

CREATE FUNCTION das.is_login_command(command text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT upper(coalesce(command, '')) IN
        ('CONNECT', 'FAILED_CONNECT', 'AUTH FAILURE', 'AUTHENTICATION FAILURE', 'LOGIN')
$$;

-- Sessions from connect to disconnect, with duration (NULL while still open or if the
-- disconnect was not recorded).
CREATE VIEW das.sessions AS
SELECT
    cluster_id,
    instance_id,
    session_id,
    pid,
    max(db_user_name)                                        AS db_user_name,
    max(database_name)                                       AS database_name,
    max(remote_host)                                         AS remote_host,
    max(client_application)                                  AS client_application,
    max(server_type)                                         AS server_type,
    min(log_time) FILTER (WHERE upper(command) = 'CONNECT')  AS connected_at,
    max(log_time) FILTER (WHERE upper(command) = 'DISCONNECT') AS disconnected_at,
    max(log_time) FILTER (WHERE upper(command) = 'DISCONNECT')
      - min(log_time) FILTER (WHERE upper(command) = 'CONNECT') AS duration,
    min(log_time)                                            AS first_event_at,
    max(log_time)                                            AS last_event_at,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX')     AS statements,
    count(*) FILTER (WHERE class IS DISTINCT FROM 'AUX'
                       AND das.is_failure(error_message, exit_code)) AS failed_statements
FROM das.activity_events
WHERE session_id IS NOT NULL
GROUP BY cluster_id, instance_id, session_id, pid;

-- Failed logins: explicit failure commands, or a connect that reported an error.
CREATE VIEW das.failed_logins AS
SELECT
    log_time, cluster_id, instance_id, db_user_name, database_name, remote_host, remote_port,
    client_application, command, exit_code, error_message, session_id, pid, server_type,
    shard_id, sequence_number, event_index
FROM das.activity_events
WHERE upper(command) IN ('FAILED_CONNECT', 'AUTH FAILURE', 'AUTHENTICATION FAILURE')
   OR (das.is_login_command(command) AND das.is_failure(error_message, exit_code));

-- Failed statements (not logins; for MySQL the MAIN event carries the outcome).
CREATE VIEW das.failed_statements AS
SELECT
    log_time, cluster_id, instance_id, db_user_name, database_name, remote_host, command,
    object_type, object_name, command_text, exit_code, error_message, session_id, pid,
    statement_id, server_type, shard_id, sequence_number, event_index
FROM das.activity_events
WHERE das.is_failure(error_message, exit_code)
  AND NOT das.is_login_command(command)
  AND class IS DISTINCT FROM 'AUX';

-- Schema and permission changes. PostgreSQL marks them class DDL (or ROLE); for MySQL, a
-- statement whose MAIN text or AUX commands are DDL.
CREATE VIEW das.ddl_changes AS
SELECT
    e.log_time, e.cluster_id, e.instance_id, e.db_user_name, e.database_name, e.remote_host,
    e.command, e.object_type, e.object_name, e.command_text,
    das.is_failure(e.error_message, e.exit_code) AS failed,
    e.session_id, e.server_type, e.shard_id, e.sequence_number, e.event_index
FROM das.activity_events e
WHERE e.class IS DISTINCT FROM 'MAIN' AND e.class IS DISTINCT FROM 'AUX'
  AND (e.class IN ('DDL', 'ROLE')
       OR e.command ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE|COMMENT)\M')
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
    s.session_id, 'MySQL', s.main_shard_id, s.main_sequence_number, s.main_event_index
FROM das.statements s
WHERE s.command_text ~* '^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)\M'
   OR EXISTS (SELECT 1 FROM jsonb_array_elements(s.aux) a
              WHERE a->>'command' ~* '^(CREATE|ALTER|DROP|RENAME|TRUNCATE|GRANT|REVOKE)');

-- Everything the users listed in das.privileged_users did.
CREATE VIEW das.privileged_activity AS
SELECT
    e.log_time, e.cluster_id, e.instance_id, e.db_user_name, e.database_name, e.remote_host,
    e.class, e.command, e.object_type, e.object_name, e.command_text,
    das.is_failure(e.error_message, e.exit_code) AS failed,
    e.session_id, e.server_type, e.shard_id, e.sequence_number, e.event_index
FROM das.activity_events e
JOIN das.privileged_users p ON p.db_user_name = e.db_user_name
WHERE e.class IS DISTINCT FROM 'AUX';
